// Streams of responses (docs/architecture.md §1): input-order
// and completion-order streams, lazy sources, back-pressure from a slow
// reader, against a real HTTP server on 127.0.0.1 and the embedded cluster.

#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/gatherer.h"
#include "handlers.h"
#include "http_server.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using testing::DelayHandler;
using testing::HttpReply;
using testing::HttpRequest;
using testing::HttpServer;
using testing::WaitFor;

// A lazy source of `n` statements with random delays; counts what it handed out.
struct CountingSource {
  const HttpServer& server;
  std::uint64_t n;
  std::uint64_t pulled = 0;
  std::mt19937 rng{3};
  unsigned max_delay_ms = 20;
  bool operator()(Statement& out) {
    if (pulled == n) return false;
    out = Get(server.url("/d/" + std::to_string(pulled) + "/" + std::to_string(rng() % (max_delay_ms + 1))));
    ++pulled;
    return true;
  }
};

// GET /big/<i> for i below n; `pulled` counts the statements taken.
struct BigBodySource {
  const HttpServer& server;
  std::uint64_t n;
  std::uint64_t pulled = 0;
  bool operator()(Statement& out) {
    if (pulled == n) return false;
    out = Get(server.url("/big/" + std::to_string(pulled++)));
    return true;
  }
};

TEST(StreamTest, InputOrderFromALazySourceIsCompleteAndBounded) {
  HttpServer server(DelayHandler);
  Options o{.workers = 32, .log_level = 40};
  o.reorder_buffer = 200;
  Gatherer g(o);
  CountingSource source{server, 3000};
  std::uint64_t expected = 0;
  for (auto& item : g.stream(std::ref(source))) {
    ASSERT_EQ(item.index, expected) << "out of order";
    ASSERT_TRUE(item.response.ok()) << item.response.error->message;
    ASSERT_EQ(item.response.body, "body-" + std::to_string(expected));
    // The source is pulled only as the window frees: never more than the
    // reorder span ahead of what the reader has.
    ASSERT_LE(source.pulled, expected + 200);
    ++expected;
  }
  EXPECT_EQ(expected, 3000u);
  EXPECT_EQ(server.requests(), 3000u);
}

TEST(StreamTest, CompletionOrderYieldsEveryIndexOnce) {
  HttpServer server(DelayHandler);
  Gatherer g({.workers = 50, .log_level = 40});
  CountingSource source{server, 2000};
  std::set<std::uint64_t> seen;
  auto stream = g.stream(std::ref(source), Order::kCompletion);
  while (auto item = stream.next()) {
    ASSERT_TRUE(seen.insert(item->index).second) << "index " << item->index << " twice";
    ASSERT_EQ(item->response.body, "body-" + std::to_string(item->index));
  }
  EXPECT_EQ(seen.size(), 2000u);
  EXPECT_EQ(*seen.rbegin(), 1999u);
}

TEST(StreamTest, StreamOverAListInInputOrder) {
  HttpServer server(DelayHandler);
  Gatherer g({.workers = 16, .log_level = 40});
  std::vector<Statement> list;
  for (int i = 0; i < 500; ++i) list.push_back(Get(server.url("/d/" + std::to_string(i) + "/" + std::to_string(i % 7))));
  std::uint64_t expected = 0;
  for (auto& item : g.stream(list)) {
    ASSERT_EQ(item.index, expected);
    ASSERT_EQ(item.response.body, "body-" + std::to_string(expected));
    ++expected;
  }
  EXPECT_EQ(expected, 500u);
}

// A reader that stops reading slows the fetching instead of growing memory:
// once the reorder span is full, the server sees no more requests.
TEST(StreamTest, SlowReaderStopsTheFetching) {
  HttpServer server(DelayHandler);
  Options o{.workers = 20, .log_level = 40};
  o.reorder_buffer = 100;
  Gatherer g(o);
  CountingSource source{server, 5000};
  source.max_delay_ms = 2;
  auto stream = g.stream(std::ref(source));
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(stream.next().has_value());
  // The reader pauses here. Nothing is pulled while it does not call next(),
  // so fetching stops within the span: in flight drains to zero.
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 5s));
  EXPECT_LE(server.requests(), 50u + 100u) << "fetched beyond the reorder span while the reader paused";
  EXPECT_LE(source.pulled, 50u + 100u);
  std::uint64_t count = 50;
  while (auto item = stream.next()) {
    ASSERT_EQ(item->index, count);
    ++count;
  }
  EXPECT_EQ(count, 5000u);
}

// A reader busy with a response leaves the embedded cluster running: what it
// submitted is still dispatched, fetched and answered meanwhile (the run's
// thread drives the broker and worker only while it waits in next(); when it
// is away, the cluster's own thread stands in), and every response is there
// when it comes back.
TEST(StreamTest, AReaderBusyWithAResponseDoesNotHoldUpWhatItSubmitted) {
  HttpServer server(DelayHandler);
  Options o{.workers = 4, .log_level = 40};
  o.prefetch = 60;  // 64 submitted at once, 4 fetched at a time
  Gatherer g(o);
  std::vector<Statement> list;
  for (int i = 0; i < 64; ++i) list.push_back(Get(server.url("/d/" + std::to_string(i) + "/5")));
  auto stream = g.stream(list);
  auto first = stream.next();
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->response.body, "body-0");
  // The reader is away: nobody calls next().
  ASSERT_TRUE(WaitFor([&] { return server.requests() == 64 && server.in_flight() == 0; }, 10s))
      << "the server saw " << server.requests() << " of 64 requests while the reader was away";
  std::uint64_t expected = 1;
  while (auto item = stream.next()) {
    ASSERT_EQ(item->index, expected);
    ASSERT_EQ(item->response.body, "body-" + std::to_string(expected));
    ++expected;
  }
  EXPECT_EQ(expected, 64u);
  EXPECT_EQ(server.requests(), 64u) << "nothing fetched twice";
}

// Big bodies behind a slow first statement: what waits to be handed out is
// bounded by max_buffered_bytes, not by body size x reorder span. The others
// answer at once, with 256 KiB each. With the budget, statement 0 answers
// after 1 s (an upper bound, which a slow machine cannot break); without, the
// server holds it until 30 others have been fetched (at most 20 s, which
// would fail the lower bound).
TEST(StreamTest, BufferedBytesBoundWhatWaitsBehindASlowStatement) {
  constexpr std::size_t kBody = 256 * 1024;
  constexpr std::uint64_t kUnboundedAtLeast = 30;
  for (const std::uint64_t budget : {std::uint64_t{2} << 20, std::uint64_t{0}}) {
    HttpServer* self = nullptr;
    std::uint64_t others = 0;  // the server's thread only
    HttpServer server([&](const HttpRequest& req) {
      HttpReply reply;
      if (req.target == "/big/0") {
        reply.delay = budget != 0 ? 1s : 20s;
      } else if (++others == kUnboundedAtLeast && budget == 0) {
        self->release_delayed();
      }
      reply.body.assign(kBody, 'x');
      return reply;
    });
    self = &server;
    Options o{.workers = 4, .log_level = 40};
    o.prefetch = 4;
    o.reorder_buffer = 64;
    o.max_buffered_bytes = budget;
    Gatherer g(o);
    BigBodySource source{server, 200};
    auto stream = g.stream(std::ref(source));
    auto first = stream.next();
    // What was fetched while statement 0 held everything back.
    const std::uint64_t fetched_while_held = server.requests();
    ASSERT_TRUE(first.has_value());
    EXPECT_EQ(first->index, 0u);
    if (budget != 0) {
      // 2 MiB = 8 bodies held, 4 in flight, 4 queued at the broker, and 0.
      EXPECT_LE(fetched_while_held, 8u + 4u + 4u + 1u) << "fetched past the buffered-bytes budget";
    } else {
      EXPECT_GE(fetched_while_held, kUnboundedAtLeast + 1) << "without a budget, only the reorder span (64) bounds it";
    }
    std::uint64_t count = 1;
    while (auto item = stream.next()) {
      ASSERT_EQ(item->index, count++);
      ASSERT_EQ(item->response.body.size(), kBody);
    }
    EXPECT_EQ(count, 200u);
  }
}

// In input order the budget also covers what is in flight: once the mean
// body is known, a stream whose reader pauses has sent no more statements
// than the budget holds bodies of, not workers + prefetch more (here 32).
TEST(StreamTest, BufferedBytesCountTheBodiesInFlight) {
  constexpr std::size_t kBody = 256 * 1024;
  HttpServer server([&](const HttpRequest&) {
    HttpReply reply;
    reply.body.assign(kBody, 'x');
    return reply;
  });
  Options o{.workers = 16, .log_level = 40};
  o.prefetch = 16;
  o.max_buffered_bytes = 1 << 20;  // four bodies
  Gatherer g(o);
  BigBodySource source{server, 200};
  auto stream = g.stream(std::ref(source));
  // Past the first wave, which goes out before any body size is known.
  std::uint64_t read = 0;
  for (; read < 60; ++read) {
    auto item = stream.next();
    ASSERT_TRUE(item.has_value());
    ASSERT_EQ(item->index, read);
  }
  // The reader pauses: whatever was sent is fetched, and nothing more.
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 0 && server.requests() >= source.pulled; }, 10s));
  EXPECT_LE(source.pulled - read, 4u + 1u) << "sent past the buffered-bytes budget while the reader paused";
  for (;; ++read) {
    auto item = stream.next();
    if (!item) break;
    ASSERT_EQ(item->index, read);
    ASSERT_EQ(item->response.body.size(), kBody);
  }
  EXPECT_EQ(read, 200u);
}

TEST(StreamTest, InvalidStatementFromASourceNamesItsIndex) {
  // One past the highest statement index the server was asked for.
  std::atomic<unsigned> past_highest{0};
  HttpServer server([&](const HttpRequest& req) {
    unsigned index = 0, delay = 0;
    if (std::sscanf(req.target.c_str(), "/d/%u/%u", &index, &delay) == 2) {
      unsigned seen = past_highest.load();
      while (index + 1 > seen && !past_highest.compare_exchange_weak(seen, index + 1)) {
      }
    }
    return DelayHandler(req);
  });
  Gatherer g({.workers = 8, .log_level = 40});
  std::uint64_t i = 0;
  auto source = [&](Statement& out) {
    if (i == 100) return false;
    out = Get(i == 37 ? std::string("gopher://x/") : server.url("/d/" + std::to_string(i) + "/0"));
    ++i;
    return true;
  };
  try {
    auto stream = g.stream(source);
    while (stream.next()) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.index(), 37);
    EXPECT_EQ(e.code(), StatusCode::kInvalidArgument);
  }
  // Statements 0-36 may all have been sent (the source is pulled ahead of
  // the answers); the bad one and those after it never are.
  EXPECT_LE(server.requests(), 37u) << "nothing at or after the bad statement is sent";
  EXPECT_LE(past_highest.load(), 37u) << "a statement after the bad one was sent";
  // The Gatherer stays usable.
  g.statements = {Get(server.url("/d/1/0"))};
  EXPECT_EQ(g.gather().at(0).body, "body-1");
}

TEST(StreamTest, AbandonedStreamCancelsItsStatements) {
  HttpServer server(DelayHandler);
  Gatherer g({.workers = 10, .log_level = 40});
  CountingSource source{server, 100000};
  source.max_delay_ms = 50;
  {
    auto stream = g.stream(std::ref(source));
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(stream.next().has_value());
  }
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 0; }, 5s));
  const auto after = server.requests();
  EXPECT_LT(after, 1000u);
  g.statements = {Get(server.url("/d/5/0"))};
  EXPECT_EQ(g.gather().at(0).body, "body-5");
  // Statements the broker had already dispatched when the CANCEL arrived (at
  // most one window, 10) may still reach the server after a quiet moment
  // (seen under ThreadSanitizer); nothing beyond them does.
  EXPECT_LE(server.requests(), after + 1 + 10) << "the abandoned stream kept fetching";
}

TEST(StreamTest, OneRunAtATime) {
  HttpServer server(DelayHandler);
  Gatherer g({.log_level = 40});
  CountingSource source{server, 10};
  auto stream = g.stream(std::ref(source));
  g.statements = {Get(server.url("/d/0/0"))};
  try {
    g.gather();
    FAIL() << "a second run started";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kFailedPrecondition);
  }
  std::uint64_t n = 0;
  while (stream.next()) ++n;
  EXPECT_EQ(n, 10u);
  EXPECT_EQ(g.gather().size(), 1u) << "a finished stream frees the Gatherer";
}

TEST(StreamTest, CancelOnRaiseStopsTheStream) {
  HttpServer server(DelayHandler);
  Gatherer g({.workers = 4, .log_level = 40, .cancel_on_raise = true});
  std::uint64_t i = 0;
  auto source = [&](Statement& out) {
    if (i == 1000) return false;
    out = Get(server.url(i == 10 ? std::string("/missing") : "/d/" + std::to_string(i) + "/5"));
    ++i;
    return true;
  };
  auto stream = g.stream(source);
  try {
    while (stream.next()) {
    }
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.index(), 10);
  }
  EXPECT_LT(server.requests(), 200u);
}

}  // namespace
}  // namespace gatherer
