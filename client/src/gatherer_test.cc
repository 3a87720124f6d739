// Gatherer API tests on the embedded default against a real local server.
#include "gatherer/gatherer.h"

#include <time.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "gatherer/log.h"
#include "http_server.h"

namespace gatherer {
namespace {

TEST(GathererTest, DefaultsMatchPyot) {
  Options o;
  EXPECT_EQ(o.workers, 25);
  EXPECT_EQ(o.log_level, 10);
  EXPECT_FALSE(o.cancel_on_raise);
  EXPECT_TRUE(o.broker.empty()) << "no broker address = embedded";
}

TEST(GathererTest, SessionIdIsUuid4PerInstance) {
  Gatherer a({.log_level = 40}), b({.log_level = 40});
  EXPECT_EQ(a.session_id().size(), 36u);
  EXPECT_EQ(a.session_id()[14], '4');
  EXPECT_NE(a.session_id(), b.session_id());
}

TEST(GathererTest, EmptyStatementsGiveEmptyResponses) {
  Gatherer g({.log_level = 40});
  EXPECT_TRUE(g.gather().empty());
}

TEST(GathererTest, RejectsBadOptions) {
  EXPECT_THROW(Gatherer({.workers = 0}), Error);
  Options o;
  o.settings.max_attempts = 0;
  EXPECT_THROW(Gatherer{o}, Error);
  // A body must fit one ZeroMQ frame (ZMQ_MAXMSGSIZE).
  Options big;
  big.settings.max_body_bytes = kMaxResponseBody + 1;
  EXPECT_THROW(Gatherer{big}, Error);
  // One window: Options::workers; a different settings.workers is refused.
  Options two;
  two.workers = 10;
  two.settings.workers = 50;
  EXPECT_THROW(Gatherer{two}, Error);
  EXPECT_THROW(Gatherer({.prefetch = 100'001}), Error);
}

TEST(GathererTest, BaseUrlDefaultHeadersAndPost) {
  testing::HttpServer server([](const testing::HttpRequest& req) {
    testing::HttpReply r;
    r.body = req.method + " " + req.target + " " + req.header("X-Token") + " " + req.body;
    return r;
  });
  Options o{.log_level = 40};
  o.settings.base_url = server.url("");
  o.settings.headers = {{"X-Token", "default"}};
  Gatherer g(o);
  Statement post;
  post.method = "POST";
  post.url = "/items";
  post.body = "{\"a\":1}";
  post.headers = {{"X-Token", "override"}};
  g.statements = {Get("/a"), post};
  const auto& r = g.gather();
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].body, "GET /a default ");
  EXPECT_EQ(r[1].body, "POST /items override {\"a\":1}");
  EXPECT_EQ(r[0].attempts, 1u);
  EXPECT_FALSE(r[0].worker.empty());
}

TEST(GathererTest, RetriesTransientStatusesThenSucceeds) {
  std::atomic<int> calls{0};
  testing::HttpServer server([&](const testing::HttpRequest&) {
    testing::HttpReply r;
    if (calls.fetch_add(1) < 2) r.status = 503;
    else r.body = "finally";
    return r;
  });
  Options o{.log_level = 40};
  o.settings.backoff_base_ms = 5;
  Gatherer g(o);
  g.statements = {Get(server.url("/flaky"))};
  const auto& r = g.gather();
  ASSERT_TRUE(r[0].ok());
  EXPECT_EQ(r[0].body, "finally");
  EXPECT_EQ(r[0].attempts, 3u);
}

TEST(GathererTest, StatementsAreKeptAfterGather) {
  testing::HttpServer server;
  Gatherer g({.log_level = 40});
  g.statements = {Get(server.url("/x"))};
  g.gather();
  ASSERT_EQ(g.statements.size(), 1u);
  EXPECT_EQ(g.responses.at(0).body, "ok:/x");
}

// Threads of this process named `name` (/proc/self/task/*/comm).
int ThreadsNamed(const std::string& name) {
  int n = 0;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string line;
    if (std::getline(comm, line) && line == name) ++n;
  }
  return n;
}

// The embedded worker fetches a small window on the caller's thread, and
// gives that loop a thread of its own (one more gatherer-io thread) once its
// bodies are sure to average 64 KiB or more: after four of 1 MiB, not after
// a sample of 64 results. Small bodies, a whole sample of them, never move it.
TEST(GathererTest, BigBodiesMoveTheEmbeddedFetchingToAThreadOfItsOwn) {
  const std::string big(1 << 20, 'b');
  testing::HttpServer server([&](const testing::HttpRequest& req) {
    testing::HttpReply r;
    r.body = req.target.starts_with("/big") ? big : "small";
    return r;
  });
  Gatherer g({.workers = 4, .log_level = 40, .embedded_io_threads = 1});
  for (int i = 0; i < 100; ++i) g.statements.push_back(Get(server.url("/small/" + std::to_string(i))));
  ASSERT_EQ(g.gather().size(), 100u);
  EXPECT_EQ(ThreadsNamed("gatherer-io"), 1) << "small bodies stay on the caller's thread";
  g.statements.clear();
  for (int i = 0; i < 8; ++i) g.statements.push_back(Get(server.url("/big/" + std::to_string(i))));
  const auto& responses = g.gather();
  ASSERT_EQ(responses.size(), 8u);
  for (const auto& r : responses) ASSERT_EQ(r.body.size(), big.size());
  EXPECT_EQ(ThreadsNamed("gatherer-io"), 2) << "eight bodies of 1 MiB after 36 small ones";
}

// cancel() between runs must not leave the next run polling a readable
// descriptor: that run waits 1 s for its one statement and should cost next
// to no CPU (it used to spin at 100% of a core for the whole run).
TEST(GathererTest, CancelBetweenRunsDoesNotMakeTheNextRunSpin) {
  testing::HttpServer server([](const testing::HttpRequest&) {
    testing::HttpReply r;
    r.delay = std::chrono::milliseconds(1000);
    r.body = "late";
    return r;
  });
  Gatherer g({.log_level = 40});
  g.cancel();
  g.statements = {Get(server.url("/slow"))};
  timespec a{}, b{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
  const auto& r = g.gather();
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].body, "late");
  const double cpu = static_cast<double>(b.tv_sec - a.tv_sec) + static_cast<double>(b.tv_nsec - a.tv_nsec) / 1e9;
  EXPECT_LT(cpu, 0.4) << "a run waiting 1 s on one statement used " << cpu << " s of CPU";
}

// A Gatherer's log_level is its own: constructing one at 10 (debug) leaves
// the process-wide level, and another Gatherer's, as they were.
TEST(GathererTest, LogLevelIsPerGathererNotProcessWide) {
  SetLogLevel(40);
  {
    Gatherer chatty({.log_level = 10});
    EXPECT_EQ(Logger().level(), spdlog::level::err);
  }
  SetLogLevel(10);
}

}  // namespace
}  // namespace gatherer

namespace gatherer {
namespace {

// progress(): read from another thread while gather() runs (TSan checks the
// snapshot is race-free), then the run's final figures.
TEST(GathererTest, ProgressSnapshotWhileRunningAndAfter) {
  testing::HttpServer server([](const testing::HttpRequest& req) {
    testing::HttpReply r;
    r.status = req.target.rfind("/bad", 0) == 0 ? 404 : 200;
    r.delay = std::chrono::milliseconds(5);
    return r;
  });
  Gatherer g({.workers = 4, .log_level = 40});
  EXPECT_FALSE(g.progress().running);
  EXPECT_EQ(g.progress().done, 0u);
  for (int i = 0; i < 60; ++i) g.statements.push_back(Get(server.url(i % 10 == 0 ? "/bad" : "/ok")));
  std::atomic<bool> over{false};
  std::atomic<std::uint64_t> seen_running{0};
  std::thread reader([&] {
    std::uint64_t last = 0;
    while (!over.load()) {
      const Progress p = g.progress();
      EXPECT_GE(p.done, last);  // never goes back
      last = p.done;
      if (p.running && p.done > 0 && p.done < 60) {
        seen_running.fetch_add(1);
        EXPECT_EQ(p.total, 60u);
        EXPECT_GT(p.rate, 0.0);
        EXPECT_GE(p.eta_s, 0.0);
      }
      std::this_thread::yield();
    }
  });
  g.gather();
  over.store(true);
  reader.join();
  EXPECT_GT(seen_running.load(), 0u) << "no snapshot taken mid-run";
  const Progress p = g.progress();
  EXPECT_FALSE(p.running);
  EXPECT_EQ(p.total, 60u);
  EXPECT_EQ(p.done, 60u);
  EXPECT_EQ(p.failed, 6u);
  EXPECT_GT(p.elapsed_s, 0.0);
  EXPECT_GT(p.rate, 0.0);
  EXPECT_EQ(p.eta_s, 0.0);
  const double elapsed = p.elapsed_s;
  EXPECT_EQ(g.progress().elapsed_s, elapsed) << "the clock goes on after the run ended";
}

}  // namespace
}  // namespace gatherer
