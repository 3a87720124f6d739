// The Fetcher through its public interface, against real HTTP servers on
// loopback addresses. Over 600 lines: one suite of many short, independent
// cases over the same helpers (Collector, FetchOne); request_test.cc and
// retry_policy_test.cc cover the plain units on their own.
#include "fetcher.h"

#include <curl/curl.h>
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "gatherer/strings.h"
#include "gatherer/worker.h"
#include "http_server.h"
#include "wait_for.h"

namespace gatherer::worker {
namespace {

using gatherer::testing::HttpReply;
using gatherer::testing::HttpRequest;
using gatherer::testing::HttpServer;
using gatherer::testing::WaitFor;
using std::chrono::milliseconds;
using std::chrono::seconds;

// Sanitizer builds are several times slower; bulk waits get room for that.
constexpr auto kBulkWait = seconds(60);

SessionId MakeSessionId(std::uint8_t n) {
  SessionId id;
  id.bytes[0] = n;
  id.bytes[6] = 0x40;  // looks like a uuid4; the fetcher does not care
  return id;
}

FetchItem Item(std::uint64_t index, std::string url) {
  FetchItem item;
  item.index = index;
  item.statement = Get(std::move(url));
  return item;
}

std::string Header(const Headers& headers, std::string_view name) {
  for (const auto& [n, v] : headers) {
    if (n.size() == name.size() &&
        std::equal(n.begin(), n.end(), name.begin(), [](char a, char b) { return std::tolower(a) == std::tolower(b); })) {
      return v;
    }
  }
  return "";
}

// Gathers what the sink receives. Thread-safe (the sink runs on I/O threads).
class Collector {
 public:
  Fetcher::ResultSink sink() {
    return [this](const SessionId& session, std::vector<FetchResult>&& results) {
      std::lock_guard lock(mu_);
      ++calls_;
      for (auto& r : results) results_.emplace_back(session, std::move(r));
    };
  }
  std::size_t count() const {
    std::lock_guard lock(mu_);
    return results_.size();
  }
  std::size_t calls() const {
    std::lock_guard lock(mu_);
    return calls_;
  }
  bool wait(std::size_t n, std::chrono::milliseconds timeout = seconds(10)) const {
    return WaitFor([&] { return count() >= n; }, timeout);
  }
  // Results ordered by index.
  std::vector<FetchResult> results() const {
    std::lock_guard lock(mu_);
    std::vector<FetchResult> out;
    for (const auto& [s, r] : results_) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.index < b.index; });
    return out;
  }
  // The result that arrived last.
  FetchResult last() const {
    std::lock_guard lock(mu_);
    return results_.empty() ? FetchResult{} : results_.back().second;
  }
  std::vector<SessionId> sessions() const {
    std::lock_guard lock(mu_);
    std::vector<SessionId> out;
    for (const auto& [s, r] : results_) out.push_back(s);
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::size_t calls_ = 0;
  std::vector<std::pair<SessionId, FetchResult>> results_;
};

Fetcher::Options TwoThreads() {
  Fetcher::Options options;
  options.io_threads = 2;
  options.worker_id = "w-test";
  return options;
}

// Fast retries so retry tests take milliseconds.
SessionSettings FastRetry() {
  SessionSettings settings;
  settings.max_attempts = 3;
  settings.backoff_base_ms = 1;
  settings.backoff_max_ms = 10;
  return settings;
}

// Runs one statement in a fresh session and returns its result.
FetchResult FetchOne(Fetcher& fetcher, Collector& collector, const SessionSettings& settings, Statement statement,
                     std::uint8_t session_number = 1, std::uint32_t prior_attempts = 0) {
  const SessionId id = MakeSessionId(session_number);
  fetcher.open_session(id, settings);
  const std::size_t before = collector.count();
  std::vector<FetchItem> items(1);
  items[0].index = 7;
  items[0].statement = std::move(statement);
  items[0].attempts = prior_attempts;
  fetcher.submit(id, std::move(items));
  EXPECT_TRUE(collector.wait(before + 1, seconds(20)));
  fetcher.close_session(id);
  return collector.last();
}

TEST(FetcherTest, ManyGetsOneSessionReuseConnections) {
  HttpServer server;
  Collector collector;
  Fetcher::Options options = TwoThreads();
  options.max_idle_connections = 32;
  Fetcher fetcher(options, collector.sink());
  const SessionId id = MakeSessionId(1);
  fetcher.open_session(id, SessionSettings{});
  constexpr std::size_t kCount = 2000;
  std::vector<FetchItem> items;
  for (std::size_t i = 0; i < kCount; ++i) items.push_back(Item(i, server.url("/item/" + std::to_string(i))));
  fetcher.submit(id, std::move(items));

  ASSERT_TRUE(collector.wait(kCount, kBulkWait)) << collector.count();
  EXPECT_TRUE(WaitFor([&] { return fetcher.in_flight() == 0; }));
  const auto results = collector.results();
  ASSERT_EQ(results.size(), kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    const FetchResult& r = results[i];
    ASSERT_EQ(r.index, i);  // sorted, so each index exactly once
    EXPECT_TRUE(r.response.ok()) << r.response.error->message;
    EXPECT_EQ(r.response.status, 200);
    EXPECT_EQ(r.response.body, "ok:/item/" + std::to_string(i));
    EXPECT_EQ(r.response.attempts, 1u);
    EXPECT_EQ(r.response.worker, "w-test");
  }
  for (const SessionId& s : collector.sessions()) EXPECT_EQ(s, id);
  EXPECT_EQ(server.requests(), kCount);
  // At most the session's window over both I/O threads; far from one per request.
  EXPECT_LE(server.connections(), SessionSettings{}.workers);
  RecordProperty("connections", static_cast<int>(server.connections()));
  fetcher.close_session(id);
  EXPECT_EQ(fetcher.sessions(), 0u);
}

// Each connection's socket stays in the I/O thread's epoll set between
// transfers. A server that ends a kept-alive connection makes that idle
// socket readable for good; the thread must take it out of the set, not
// wake on it again and again, and the next statements must get fresh
// connections, each answered at the first attempt.
TEST(FetcherTest, IdleConnectionsTheServerClosesAreNotSpunOnNorReused) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = "ok:" + req.target;
    reply.close_after = true;
    return reply;
  });
  Collector collector;
  Fetcher::Options options;
  options.io_threads = 1;
  Fetcher fetcher(options, collector.sink());
  const SessionId id = MakeSessionId(3);
  SessionSettings settings;
  settings.workers = 4;
  fetcher.open_session(id, settings);
  auto submit = [&](std::uint64_t first) {
    std::vector<FetchItem> items;
    for (std::uint64_t i = first; i < first + 8; ++i) items.push_back(Item(i, server.url("/i/" + std::to_string(i))));
    fetcher.submit(id, std::move(items));
  };
  auto cpu_now = [] {
    timespec t{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return std::chrono::seconds(t.tv_sec) + std::chrono::nanoseconds(t.tv_nsec);
  };
  submit(0);
  ASSERT_TRUE(collector.wait(8, kBulkWait)) << collector.count();
  // Measured, not waited on: a thread that woke on a closed idle socket
  // would spend the whole span awake.
  const auto cpu_before = cpu_now();
  std::this_thread::sleep_for(milliseconds(300));
  const auto idle_cpu = std::chrono::duration_cast<milliseconds>(cpu_now() - cpu_before);
  EXPECT_LT(idle_cpu.count(), 100) << "the process ran " << idle_cpu.count() << " ms of 300 idle";
  submit(8);
  ASSERT_TRUE(collector.wait(16, kBulkWait)) << collector.count();
  const auto results = collector.results();
  for (std::uint64_t i = 0; i < 16; ++i) {
    ASSERT_EQ(results[i].index, i);
    EXPECT_EQ(results[i].response.status, 200) << i;
    EXPECT_EQ(results[i].response.body, "ok:/i/" + std::to_string(i));
    EXPECT_EQ(results[i].response.attempts, 1u) << i;
  }
  EXPECT_EQ(server.requests(), 16u);
  EXPECT_EQ(server.connections(), 16u);
  fetcher.close_session(id);
}

// The window is the most a session has in flight, and so the most
// connections it keeps to a host in a worker process. Fed as a broker feeds
// it (one more statement as each one is answered), a session spread over two
// I/O threads had each thread's pool grow to nearly the window on its own.
TEST(FetcherTest, ConnectionsToAHostStayWithinTheWindowAcrossThreads) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.delay = std::chrono::milliseconds(req.target.back() - '0');  // "/c/<0-4>"
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  for (std::uint32_t window : {10u, 600u}) {
    const SessionId id = MakeSessionId(window == 10 ? 10 : 11);
    SessionSettings settings;
    settings.workers = window;
    fetcher.open_session(id, settings);
    const std::size_t before_results = collector.count();
    const std::uint64_t before_connections = server.connections();
    const std::uint64_t total = window == 10 ? 400 : 1800;
    std::uint64_t sent = 0;
    auto submit_one = [&] {
      std::vector<FetchItem> one;
      one.push_back(Item(sent, server.url("/c/" + std::to_string(sent % 5))));
      fetcher.submit(id, std::move(one));
      ++sent;
    };
    while (sent < window) submit_one();
    while (sent < total) {
      ASSERT_TRUE(collector.wait(before_results + sent - window + 1, kBulkWait)) << collector.count();
      submit_one();
    }
    ASSERT_TRUE(collector.wait(before_results + total, kBulkWait)) << collector.count();
    EXPECT_LE(server.connections() - before_connections, window) << "window " << window;
    fetcher.close_session(id);
  }
}

// Options::drive_first: a window one loop serves runs on the driven loop,
// on the thread that drives it, and only when driven; a bigger window runs
// on the fetcher's own threads. undrive() gives the loop a thread.
TEST(FetcherTest, ASmallWindowRunsOnTheDrivenLoopAndABigOneOnTheThreads) {
  HttpServer server;
  std::mutex mu;
  std::map<std::uint8_t, std::set<std::thread::id>> sink_threads;
  std::atomic<std::size_t> received{0};
  Fetcher::Options options;
  options.io_threads = 1;
  options.drive_first = true;
  Fetcher fetcher(options, [&](const SessionId& session, std::vector<FetchResult>&& results) {
    std::lock_guard lock(mu);
    sink_threads[session.bytes[0]].insert(std::this_thread::get_id());
    received += results.size();
  });
  ASSERT_GE(fetcher.driven_fd(), 0);
  auto open_and_submit = [&](std::uint8_t n, std::uint32_t window) {
    SessionSettings settings;
    settings.workers = window;
    fetcher.open_session(MakeSessionId(n), settings);
    std::vector<FetchItem> items;
    for (std::uint64_t i = 0; i < 8; ++i) items.push_back(Item(i, server.url("/d")));
    fetcher.submit(MakeSessionId(n), std::move(items));
  };
  // Not driven, the small window's statements wait; the big one's do not.
  open_and_submit(20, 4);
  open_and_submit(21, 300);
  ASSERT_TRUE(WaitFor([&] { return received.load() == 8; }, kBulkWait)) << received.load();
  EXPECT_EQ(server.requests(), 8u);
  EXPECT_EQ(fetcher.in_flight(), 8u);
  // Driven as an owner would: wait on the descriptor or the due time, then
  // one pass.
  const auto deadline = std::chrono::steady_clock::now() + kBulkWait;
  while (received.load() < 16 && std::chrono::steady_clock::now() < deadline) {
    pollfd fd{fetcher.driven_fd(), POLLIN, 0};
    int timeout = 100;
    if (const auto due = fetcher.driven_due()) {
      timeout = static_cast<int>(std::clamp<std::int64_t>(
          std::chrono::ceil<milliseconds>(*due - std::chrono::steady_clock::now()).count(), 0, 100));
    }
    ::poll(&fd, 1, timeout);
    fetcher.drive();
  }
  ASSERT_EQ(received.load(), 16u);
  EXPECT_EQ(fetcher.in_flight(), 0u);
  {
    std::lock_guard lock(mu);
    EXPECT_EQ(sink_threads[20], std::set<std::thread::id>{std::this_thread::get_id()});
    ASSERT_EQ(sink_threads[21].size(), 1u);
    EXPECT_NE(*sink_threads[21].begin(), std::this_thread::get_id());
    sink_threads[20].clear();
  }
  // Handed a thread of its own, the loop runs the small window undriven, on
  // the connections it already had.
  const std::uint64_t connections = server.connections();
  fetcher.undrive();
  EXPECT_EQ(fetcher.driven_fd(), -1);
  std::vector<FetchItem> more;
  for (std::uint64_t i = 8; i < 12; ++i) more.push_back(Item(i, server.url("/d")));
  fetcher.submit(MakeSessionId(20), std::move(more));
  ASSERT_TRUE(WaitFor([&] { return received.load() == 20; }, kBulkWait)) << received.load();
  EXPECT_EQ(server.connections(), connections);
  std::lock_guard lock(mu);
  ASSERT_EQ(sink_threads[20].size(), 1u);
  EXPECT_NE(*sink_threads[20].begin(), std::this_thread::get_id());
}

TEST(FetcherTest, SinkIsCalledWithBatches) {
  HttpServer server;
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const SessionId id = MakeSessionId(2);
  fetcher.open_session(id, SessionSettings{});
  constexpr std::size_t kCount = 2000;
  std::vector<FetchItem> items;
  for (std::size_t i = 0; i < kCount; ++i) items.push_back(Item(i, server.url("/b")));
  fetcher.submit(id, std::move(items));
  ASSERT_TRUE(collector.wait(kCount, kBulkWait));
  EXPECT_LT(collector.calls(), kCount);
  RecordProperty("sink_calls", static_cast<int>(collector.calls()));
  EXPECT_TRUE(WaitFor([&] { return fetcher.in_flight() == 0; }));
}

TEST(FetcherTest, JoinsPathsToBaseUrl) {
  HttpServer server;
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings;
  settings.base_url = server.url("/api/");  // the trailing slash is not doubled
  auto r = FetchOne(fetcher, collector, settings, Get("/v1/items?x=1"));
  EXPECT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.body, "ok:/api/v1/items?x=1");

  // An absolute url ignores base_url.
  r = FetchOne(fetcher, collector, settings, Get(server.url("/abs")), 2);
  EXPECT_EQ(r.response.body, "ok:/abs");

  // A path without base_url is refused without an attempt.
  r = FetchOne(fetcher, collector, SessionSettings{}, Get("/nobase"), 3);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kInvalidArgument);
  EXPECT_EQ(r.response.attempts, 0u);
}

TEST(FetcherTest, StatementHeadersOverrideSessionDefaults) {
  HttpServer server([](const HttpRequest& request) {
    HttpReply reply;
    reply.body = request.header("X-A") + "|" + request.header("X-B") + "|" + request.header("X-C");
    reply.headers = {{"X-Reply", "yes"}, {"X-Multi", "1"}, {"X-Multi", "2"}};
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings;
  settings.headers = {{"X-A", "default-a"}, {"X-B", "default-b"}};
  Statement statement = Get(server.url("/h"));
  statement.headers = {{"x-a", "mine"}, {"X-C", "extra"}};
  const auto r = FetchOne(fetcher, collector, settings, statement);
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.body, "mine|default-b|extra");
  EXPECT_EQ(Header(r.response.headers, "X-Reply"), "yes");
  int multi = 0;
  for (const auto& [name, value] : r.response.headers) {
    EXPECT_EQ(name.find("HTTP/"), std::string::npos) << "status line kept as a header";
    EXPECT_EQ(value.find('\r'), std::string::npos);
    if (name == "X-Multi") ++multi;
  }
  EXPECT_EQ(multi, 2);  // repeated headers kept, in order
}

TEST(FetcherTest, MethodsAndBodiesReachTheServer) {
  HttpServer server([](const HttpRequest& request) {
    HttpReply reply;
    reply.body = request.method + ":" + request.body;
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  struct Case {
    std::string method, body, want_body;
  };
  const std::vector<Case> cases = {
      {"POST", "p=1", "POST:p=1"}, {"PUT", "data", "PUT:data"},   {"PATCH", "x", "PATCH:x"},
      {"DELETE", "", "DELETE:"},  {"HEAD", "", ""},               {"OPTIONS", "", "OPTIONS:"},
      {"POST", "", "POST:"},
  };
  std::uint8_t n = 1;
  for (const auto& c : cases) {
    Statement s = Get(server.url("/m"));
    s.method = c.method;
    s.body = c.body;
    const auto r = FetchOne(fetcher, collector, SessionSettings{}, s, n++);
    ASSERT_TRUE(r.response.ok()) << c.method << " " << r.response.error->message;
    EXPECT_EQ(r.response.body, c.want_body) << c.method;
  }
  Statement bad = Get(server.url("/m"));
  bad.method = "GET /x HTTP/1.1\r\n";
  const auto r = FetchOne(fetcher, collector, SessionSettings{}, bad, n++);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kInvalidArgument);
}

bool HasHeader(const Headers& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(), [&](const auto& h) { return EqualsIgnoreCase(h.first, name); });
}

int CountHeader(const Headers& headers, std::string_view name) {
  return static_cast<int>(
      std::count_if(headers.begin(), headers.end(), [&](const auto& h) { return EqualsIgnoreCase(h.first, name); }));
}

TEST(FetcherTest, UserAgentIsGathererUnlessSessionOrStatementSetsOne) {
  HttpServer server([](const HttpRequest& request) {
    HttpReply reply;
    reply.body = std::to_string(CountHeader(request.headers, "User-Agent")) + "|" + request.header("User-Agent");
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const std::string ours = std::string("1|gatherer/") + GATHERER_VERSION;

  // GET without headers, POST with a body, a statement with headers of its own.
  auto r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.body, ours);
  Statement post = Get(server.url("/"));
  post.method = "POST";
  post.body = "x";
  post.headers = {{"X-Other", "1"}};
  r = FetchOne(fetcher, collector, SessionSettings{}, post, 2);
  EXPECT_EQ(r.response.body, ours);

  // The session's User-Agent replaces ours, in any case.
  SessionSettings session;
  session.headers = {{"user-agent", "session-agent/2"}};
  r = FetchOne(fetcher, collector, session, Get(server.url("/")), 3);
  EXPECT_EQ(r.response.body, "1|session-agent/2");

  // The statement's replaces both.
  Statement mine = Get(server.url("/"));
  mine.headers = {{"USER-AGENT", "statement-agent/3"}};
  r = FetchOne(fetcher, collector, session, mine, 4);
  EXPECT_EQ(r.response.body, "1|statement-agent/3");
  r = FetchOne(fetcher, collector, SessionSettings{}, mine, 5);
  EXPECT_EQ(r.response.body, "1|statement-agent/3");
}

TEST(FetcherTest, BodyWithoutContentTypeIsSentWithoutOne) {
  HttpServer server([](const HttpRequest& request) {
    HttpReply reply;
    reply.body = request.method + "|" + std::to_string(CountHeader(request.headers, "Content-Type")) + "|" +
                 request.header("Content-Type") + "|" + request.body;
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  std::uint8_t n = 1;
  auto fetch = [&](std::string method, std::string body, Headers headers, SessionSettings settings = {}) {
    Statement s = Get(server.url("/"));
    s.method = std::move(method);
    s.body = std::move(body);
    s.headers = std::move(headers);
    const auto r = FetchOne(fetcher, collector, settings, s, n++);
    EXPECT_TRUE(r.response.ok());
    return r.response.body;
  };
  // libcurl would add "application/x-www-form-urlencoded" to each of these.
  EXPECT_EQ(fetch("POST", "a=1", {}), "POST|0||a=1");
  EXPECT_EQ(fetch("POST", "", {}), "POST|0||");
  EXPECT_EQ(fetch("PUT", "{}", {}), "PUT|0||{}");
  EXPECT_EQ(fetch("PATCH", "{}", {{"X-Other", "1"}}), "PATCH|0||{}");
  // A Content-Type the statement or the session names is sent as given.
  EXPECT_EQ(fetch("POST", "{}", {{"content-type", "application/json"}}), "POST|1|application/json|{}");
  SessionSettings json;
  json.headers = {{"Content-Type", "application/json"}};
  EXPECT_EQ(fetch("POST", "{}", {}, json), "POST|1|application/json|{}");
  EXPECT_EQ(fetch("POST", "a", {{"Content-Type", "text/plain"}}, json), "POST|1|text/plain|a");
}

// 100,000 'a' gzip-compressed to 133 bytes.
const char kGzip100kA[] =
    "\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xed\xc1\x31\x01\x00\x00\x00\xc2\xa0\xac\xeb\x5f\xc2\x1a\x1e\x40"
    "\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xaf\x06\x87\xfa\xe2\x1b\xa0"
    "\x86\x01\x00";

TEST(FetcherTest, DecodedBodyDropsContentEncodingAndContentLength) {
  HttpServer server([](const HttpRequest& request) {
    if (request.target == "/plain") return HttpReply{200, {{"X-Before", "1"}}, "plain"};
    if (request.target == "/identity") return HttpReply{200, {{"Content-Encoding", "identity"}}, "same"};
    // Content-Length (added by the server) is the compressed size, 133.
    return HttpReply{200, {{"X-Before", "1"}, {"content-encoding", "gzip"}, {"X-After", "2"}},
                     std::string(kGzip100kA, sizeof kGzip100kA - 1)};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  auto r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/gzip")));
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(r.response.body, std::string(100'000, 'a'));
  EXPECT_FALSE(HasHeader(r.response.headers, "Content-Encoding"));
  EXPECT_FALSE(HasHeader(r.response.headers, "Content-Length"));
  ASSERT_EQ(r.response.headers.size(), 2u);  // the others stay, in order
  EXPECT_EQ(r.response.headers[0].first, "X-Before");
  EXPECT_EQ(r.response.headers[1].first, "X-After");

  // Nothing decoded: the headers describe what is returned and stay.
  r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/plain")), 2);
  EXPECT_EQ(Header(r.response.headers, "Content-Length"), "5");
  r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/identity")), 3);
  EXPECT_EQ(r.response.body, "same");
  EXPECT_EQ(Header(r.response.headers, "Content-Length"), "4");
  EXPECT_EQ(Header(r.response.headers, "Content-Encoding"), "identity");
  Statement head = Get(server.url("/gzip"));
  head.method = "HEAD";
  r = FetchOne(fetcher, collector, SessionSettings{}, head, 4);
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(Header(r.response.headers, "Content-Encoding"), "gzip");
  EXPECT_EQ(Header(r.response.headers, "Content-Length"), "133");
}

TEST(FetcherTest, RepeatedResponseHeadersAreAllKeptInOrder) {
  HttpServer server([](const HttpRequest&) {
    return HttpReply{200, {{"Set-Cookie", "a=1; Path=/"}, {"X-Between", "x"}, {"Set-Cookie", "b=2; HttpOnly"}}, ""};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const auto r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  std::vector<std::pair<std::string, std::string>> seen;
  for (const auto& h : r.response.headers) {
    if (h.first == "Set-Cookie" || h.first == "X-Between") seen.push_back(h);
  }
  const std::vector<std::pair<std::string, std::string>> want = {
      {"Set-Cookie", "a=1; Path=/"}, {"X-Between", "x"}, {"Set-Cookie", "b=2; HttpOnly"}};
  EXPECT_EQ(seen, want);
}

TEST(FetcherTest, LargePostGoesThrough100Continue) {
  // libcurl sends "Expect: 100-continue" for bodies over 1 MiB; the interim
  // 100 response must not leak into the result.
  HttpServer server([](const HttpRequest& request) {
    return HttpReply{200, {{"X-Got", std::to_string(request.body.size())}}, request.header("Expect")};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  Statement s = Get(server.url("/upload"));
  s.method = "PUT";
  s.body = std::string(3 << 20, 'b');
  const auto r = FetchOne(fetcher, collector, SessionSettings{}, s);
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(r.response.status, 200);
  EXPECT_EQ(Header(r.response.headers, "X-Got"), std::to_string(3 << 20));
  EXPECT_EQ(r.response.body, "100-continue");
}

TEST(FetcherTest, NotFoundIsHttpStatusAndKeepsTheResponse) {
  HttpServer server([](const HttpRequest&) { return HttpReply{404, {{"X-Why", "gone"}}, "no such thing"}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const auto r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/missing")));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kHttpStatus);
  EXPECT_EQ(r.response.error->message, "HTTP 404 Not Found");
  EXPECT_EQ(r.response.status, 404);
  EXPECT_EQ(r.response.body, "no such thing");
  EXPECT_EQ(Header(r.response.headers, "X-Why"), "gone");
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(r.index, 7u);
}

TEST(FetcherTest, AcceptRangeIsTheSessions) {
  HttpServer server([](const HttpRequest&) { return HttpReply{404, {}, "x"}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings;
  settings.accept_min = 200;
  settings.accept_max = 499;
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/")));
  EXPECT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.status, 404);
}

TEST(FetcherTest, RetriesServiceUnavailableThenSucceeds) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) < 2) return HttpReply{503, {}, "busy"};
    return HttpReply{200, {}, "finally"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.max_attempts = 4;
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/flaky")));
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(r.response.status, 200);
  EXPECT_EQ(r.response.body, "finally");
  EXPECT_EQ(r.response.attempts, 3u);
  EXPECT_EQ(server.requests(), 3u);
}

TEST(FetcherTest, RetriesStopAtMaxAttempts) {
  HttpServer server([](const HttpRequest&) { return HttpReply{502, {}, "bad gateway"}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const auto r = FetchOne(fetcher, collector, FastRetry(), Get(server.url("/")));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kHttpStatus);
  EXPECT_EQ(r.response.error->message, "HTTP 502 Bad Gateway after 3 attempts");
  EXPECT_EQ(r.response.status, 502);
  EXPECT_EQ(r.response.body, "bad gateway");
  EXPECT_EQ(r.response.attempts, 3u);
  EXPECT_EQ(server.requests(), 3u);
}

TEST(FetcherTest, RetryAfterIsHonoured) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) == 0) return HttpReply{429, {{"Retry-After", "1"}}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.backoff_max_ms = 10'000;
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.attempts, 2u);
  EXPECT_GE(r.response.elapsed_us, 950'000u);
}

// PROTOCOL §3.8.6: in a rate-aware session a 429 is not retried by the
// worker but handed back at once with a throttled report, and what any
// response advertises about limits goes with its result.
TEST(FetcherTest, Clause_3_8_6_RateAwareSessionHandsA429BackWithItsReport) {
  HttpServer server([&](const HttpRequest& request) {
    if (request.target == "/limited") {
      return HttpReply{429, {{"Retry-After", "3"}, {"X-App-Rate-Limit", "20:1,100:120"}, {"X-Rate-Limit-Type", "application"}}, ""};
    }
    return HttpReply{200, {{"X-Method-Rate-Limit", "5:10"}}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.learn_rate_limits = true;
  const auto limited = FetchOne(fetcher, collector, settings, Get(server.url("/limited")));
  EXPECT_EQ(limited.response.status, 429);
  EXPECT_EQ(limited.response.attempts, 1u) << "a rate-aware 429 was retried by the worker";
  ASSERT_TRUE(limited.rate.has_value());
  EXPECT_TRUE(limited.rate->throttled);
  EXPECT_EQ(limited.rate->type, RateLimitType::kApplication);
  EXPECT_EQ(limited.rate->retry_after_ms, 3000u);
  EXPECT_EQ(limited.rate->app, (RateWindows{{20, 1000}, {100, 120'000}}));
  const auto ok = FetchOne(fetcher, collector, settings, Get(server.url("/ok")));
  ASSERT_TRUE(ok.response.ok());
  ASSERT_TRUE(ok.rate.has_value());
  EXPECT_FALSE(ok.rate->throttled);
  EXPECT_EQ(ok.rate->method, (RateWindows{{5, 10'000}}));
  // Not rate-aware: no report, and the worker retries the 429 itself.
  settings.learn_rate_limits = false;
  settings.max_attempts = 1;
  const auto plain = FetchOne(fetcher, collector, settings, Get(server.url("/ok")));
  EXPECT_FALSE(plain.rate.has_value());
}

// PROTOCOL §3.8.6: a rate-aware session's 5xx and broken connections are not
// retried by the worker either; they go back with the backoff to wait, so
// that the broker grants the next attempt. The attempts of earlier
// DISPATCHes count toward max_attempts and the backoff.
TEST(FetcherTest, Clause_3_8_6_RateAwareSessionHandsRetriesBack) {
  HttpServer server([&](const HttpRequest& request) {
    if (request.target == "/later") return HttpReply{503, {{"Retry-After", "2"}}, "busy"};
    return HttpReply{502, {{"X-App-Rate-Limit", "20:1"}}, "bad gateway"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings;
  settings.rate_limits = {*ParseRateRule("20:1")};
  settings.max_attempts = 4;
  settings.backoff_base_ms = 100;
  settings.backoff_max_ms = 10'000;
  const auto first = FetchOne(fetcher, collector, settings, Get(server.url("/bad")));
  EXPECT_EQ(server.requests(), 1u) << "the worker retried by itself";
  EXPECT_EQ(first.response.status, 502);
  EXPECT_EQ(first.response.attempts, 1u);
  ASSERT_TRUE(first.rate.has_value());
  EXPECT_TRUE(first.rate->retry);
  EXPECT_FALSE(first.rate->throttled);
  EXPECT_LE(first.rate->retry_after_ms, 100u) << "full jitter over [0, base]";
  EXPECT_EQ(first.rate->app, (RateWindows{{20, 1000}})) << "what it advertised goes back too";
  // Third attempt: the backoff ceiling is base x 2^2.
  const auto third = FetchOne(fetcher, collector, settings, Get(server.url("/bad")), 2, 2);
  EXPECT_EQ(third.response.attempts, 3u);
  ASSERT_TRUE(third.rate.has_value() && third.rate->retry);
  EXPECT_LE(third.rate->retry_after_ms, 400u);
  // A Retry-After is the wait.
  const auto later = FetchOne(fetcher, collector, settings, Get(server.url("/later")), 3);
  ASSERT_TRUE(later.rate.has_value() && later.rate->retry);
  EXPECT_EQ(later.rate->retry_after_ms, 2000u);
  // The last attempt is final here: the error, and no hand-back.
  const auto last = FetchOne(fetcher, collector, settings, Get(server.url("/bad")), 4, 3);
  EXPECT_EQ(last.response.attempts, 4u);
  ASSERT_FALSE(last.response.ok());
  EXPECT_EQ(last.response.error->message, "HTTP 502 Bad Gateway after 4 attempts");
  EXPECT_FALSE(last.rate.has_value() && last.rate->retry);
  EXPECT_EQ(server.requests(), 4u);
}

TEST(FetcherTest, RetryAfterIsNotCappedByBackoffMax) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) == 0) return HttpReply{503, {{"Retry-After", "1"}}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();  // backoff_max_ms 10
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.attempts, 2u);
  EXPECT_GE(r.response.elapsed_us, 950'000u) << "Retry-After: 1 cut to backoff_max_ms";
}

TEST(FetcherTest, RetryAfterIsCappedByRetryAfterMax) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) == 0) return HttpReply{503, {{"Retry-After", "30"}}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.retry_after_max_ms = 300;
  const auto started = std::chrono::steady_clock::now();
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.attempts, 2u);
  EXPECT_GE(r.response.elapsed_us, 290'000u);
  EXPECT_LT(std::chrono::steady_clock::now() - started, seconds(5));
  EXPECT_EQ(SessionSettings{}.retry_after_max_ms, 60'000u);
}

TEST(FetcherTest, TooManyRequestsWithoutRetryAfterBacksOffLonger) {
  // Each statement is refused once (429 or 503, no Retry-After), then served:
  // one backoff per statement. The server counts attempts per target.
  std::mutex mu;
  std::map<std::string, int> seen;
  HttpServer flaky([&](const HttpRequest& request) {
    std::lock_guard lock(mu);
    const int n = seen[request.target]++;
    if (n == 0) return HttpReply{request.target.starts_with("/429") ? 429 : 503, {}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  constexpr std::size_t kCount = 20;
  SessionSettings settings;  // backoff_base_ms 100, backoff_max_ms 10 s
  settings.max_attempts = 2;
  auto run = [&](const std::string& prefix, std::uint8_t session) {
    const SessionId id = MakeSessionId(session);
    fetcher.open_session(id, settings);
    const std::size_t before = collector.count();
    std::vector<FetchItem> items;
    for (std::size_t i = 0; i < kCount; ++i) {
      items.push_back(Item(1000 * session + i, flaky.url(prefix + std::to_string(i))));
    }
    fetcher.submit(id, std::move(items));
    EXPECT_TRUE(collector.wait(before + kCount, seconds(30)));
    fetcher.close_session(id);
    std::uint64_t longest = 0;
    for (const auto& r : collector.results()) {
      if (r.index / 1000 != session) continue;
      EXPECT_TRUE(r.response.ok()) << r.index;
      EXPECT_EQ(r.response.attempts, 2u);
      longest = std::max(longest, r.response.elapsed_us);
    }
    return longest;
  };
  // 503: full jitter on [0, 100 ms]. 429 without Retry-After: on [0, 1 s];
  // the longest of 20 waits is under 300 ms with probability 0.3^20.
  const std::uint64_t after_503 = run("/503/", 1);
  const std::uint64_t after_429 = run("/429/", 2);
  EXPECT_LT(after_503, 600'000u);
  EXPECT_GT(after_429, 300'000u) << "429 retried as fast as a 503";
  EXPECT_LT(after_429, 3'000'000u);

  // backoff_max_ms caps the 429 backoff too.
  settings.backoff_max_ms = 50;
  EXPECT_LT(run("/429-capped/", 3), 600'000u);
}

TEST(FetcherTest, RetryAfterHttpDate) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) == 0) return HttpReply{503, {{"Retry-After", "Wed, 21 Oct 2015 07:28:00 GMT"}}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.backoff_max_ms = 10'000;
  // A date in the past means "now".
  const auto r = FetchOne(fetcher, collector, settings, Get(server.url("/")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.attempts, 2u);
  EXPECT_LT(r.response.elapsed_us, 5'000'000u);
}

Statement Post(std::string url, std::string body = "buy=1") {
  Statement s = Get(std::move(url));
  s.method = "POST";
  s.body = std::move(body);
  return s;
}

TEST(FetcherTest, PostIsNotRetriedOnServerError) {
  // None of these says the request was not acted on.
  for (const int status : {500, 502, 503, 504, 408}) {
    HttpServer server([status](const HttpRequest&) { return HttpReply{status, {}, "oops"}; });
    Collector collector;
    Fetcher fetcher(TwoThreads(), collector.sink());
    const auto r = FetchOne(fetcher, collector, FastRetry(), Post(server.url("/order")));
    ASSERT_FALSE(r.response.ok()) << status;
    EXPECT_EQ(r.response.error->code, StatusCode::kHttpStatus) << status;
    EXPECT_EQ(r.response.status, status);
    EXPECT_EQ(r.response.body, "oops");
    EXPECT_EQ(r.response.attempts, 1u) << status;
    EXPECT_EQ(server.requests(), 1u) << status;
    EXPECT_NE(r.response.error->message.find("not retried"), std::string::npos) << r.response.error->message;
  }
  // PATCH and a statement marked idempotent = false are treated alike.
  HttpServer server([](const HttpRequest&) { return HttpReply{503, {}, "busy"}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  Statement patch = Post(server.url("/"));
  patch.method = "PATCH";
  Statement put = Get(server.url("/"));
  put.method = "PUT";
  put.idempotent = false;
  std::uint8_t n = 1;
  for (const Statement& s : {patch, put}) {
    const auto r = FetchOne(fetcher, collector, FastRetry(), s, n++);
    EXPECT_EQ(r.response.error->code, StatusCode::kHttpStatus);
    EXPECT_EQ(r.response.attempts, 1u) << s.method;
  }
  EXPECT_EQ(server.requests(), 2u);
}

TEST(FetcherTest, PostIsRetriedWhenTheServerSaysNotProcessed) {
  // 429 (with or without Retry-After) and 503 with Retry-After say the
  // request was refused before it was acted on.
  const std::vector<HttpReply> refusals = {
      {429, {}, ""}, {429, {{"Retry-After", "0"}}, ""}, {503, {{"Retry-After", "0"}}, ""}};
  for (const HttpReply& refusal : refusals) {
    std::atomic<int> calls{0};
    HttpServer server([&](const HttpRequest& request) {
      if (calls.fetch_add(1) == 0) return refusal;
      return HttpReply{201, {}, request.body};
    });
    Collector collector;
    Fetcher fetcher(TwoThreads(), collector.sink());
    const auto r = FetchOne(fetcher, collector, FastRetry(), Post(server.url("/order")));
    ASSERT_TRUE(r.response.ok()) << refusal.status << " " << r.response.error->message;
    EXPECT_EQ(r.response.status, 201);
    EXPECT_EQ(r.response.body, "buy=1");
    EXPECT_EQ(r.response.attempts, 2u);
    EXPECT_EQ(server.requests(), 2u);
  }
}

TEST(FetcherTest, ExplicitlyIdempotentPostIsRetried) {
  std::atomic<int> calls{0};
  HttpServer server([&](const HttpRequest&) {
    if (calls.fetch_add(1) == 0) return HttpReply{500, {}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  Statement s = Get(server.url("/q"));
  s.method = "POST";
  s.idempotent = true;
  const auto r = FetchOne(fetcher, collector, FastRetry(), s);
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.attempts, 2u);
}

TEST(FetcherTest, DroppedConnectionIsRetriedForGetNotForPost) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.drop = true;
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  auto r = FetchOne(fetcher, collector, FastRetry(), Get(server.url("/")));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnavailable);
  EXPECT_EQ(r.response.attempts, 3u);

  // The connection broke after the request was sent: the server may have
  // acted on it, so a POST fails as outcome unknown and is not sent again.
  const std::uint64_t before = server.requests();
  r = FetchOne(fetcher, collector, FastRetry(), Post(server.url("/"), "x"), 2);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnknown);
  EXPECT_NE(r.response.error->message.find("may have reached the server"), std::string::npos)
      << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(server.requests(), before + 1);
}

TEST(FetcherTest, PostCutShortIsOutcomeUnknown) {
  // The status line arrived, then the connection closed mid-body (the
  // server closes after its reply when asked to).
  HttpServer server([](const HttpRequest&) { return HttpReply{200, {{"Content-Length", "100"}}, "only part"}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  Statement post = Post(server.url("/"));
  post.headers = {{"Connection", "close"}};
  auto r = FetchOne(fetcher, collector, FastRetry(), post);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnknown) << r.response.error->message;
  EXPECT_NE(r.response.error->message.find("HTTP 200"), std::string::npos) << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(server.requests(), 1u);
}

TEST(FetcherTest, PostTimeoutIsOutcomeUnknown) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.delay = seconds(2);
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  Statement post = Post(server.url("/slow"));
  post.timeout_ms = 200;
  const auto r = FetchOne(fetcher, collector, FastRetry(), post);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnknown);
  EXPECT_NE(r.response.error->message.find("may have reached the server"), std::string::npos)
      << r.response.error->message;
  EXPECT_NE(r.response.error->message.find("timed out"), std::string::npos) << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(server.requests(), 1u);
}

TEST(FetcherTest, PostOnAReusedConnectionIsNotResentByLibcurl) {
  // libcurl re-sends a request by itself, on a new connection, when a reused
  // keep-alive connection closes before any byte of the response: a POST the
  // server acted on before it went away would run twice.
  std::atomic<int> posts{0};
  HttpServer server([&](const HttpRequest& request) {
    HttpReply reply;
    if (request.method == "POST") {
      posts.fetch_add(1);
      reply.drop = true;
    }
    return reply;
  });
  Collector collector;
  Fetcher::Options options = TwoThreads();
  options.io_threads = 1;  // one multi, so the POST takes the GET's connection
  Fetcher fetcher(options, collector.sink());
  const SessionId id = MakeSessionId(1);
  fetcher.open_session(id, FastRetry());
  std::vector<FetchItem> items;
  items.push_back(Item(1, server.url("/warm")));
  fetcher.submit(id, std::move(items));
  ASSERT_TRUE(collector.wait(1));
  ASSERT_EQ(server.connections(), 1u);
  items.clear();
  items.push_back(FetchItem{});
  items[0].index = 2;
  items[0].statement = Post(server.url("/order"));
  fetcher.submit(id, std::move(items));
  ASSERT_TRUE(collector.wait(2));
  fetcher.close_session(id);
  const FetchResult r = collector.last();
  ASSERT_EQ(r.index, 2u);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnknown) << r.response.error->message;
  EXPECT_NE(r.response.error->message.find("may have reached the server"), std::string::npos)
      << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(posts.load(), 1) << "the POST was sent twice";
}

TEST(FetcherTest, PostFollowsRedirects) {
  // Each request of a redirect chain is sent once; none is taken for a re-send.
  HttpServer server([](const HttpRequest& request) {
    if (request.target == "/307") return HttpReply{307, {{"Location", "/303"}}, ""};
    if (request.target == "/303") return HttpReply{303, {{"Location", "/done"}}, ""};
    return HttpReply{200, {}, request.method + ":" + request.body};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const auto r = FetchOne(fetcher, collector, FastRetry(), Post(server.url("/307")));
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(r.response.body, "GET:");  // 307 keeps the POST, 303 makes it a GET
  EXPECT_EQ(server.requests(), 3u);
}

TEST(FetcherTest, PostIsRetriedWhenNothingWasSent) {
  // A connect that times out sends nothing, just as a refused one.
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(listener, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  ASSERT_EQ(bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(listener, 0), 0);
  ASSERT_EQ(getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  // Fills the accept queue, which is never read: later SYNs are dropped.
  const int filler = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_EQ(connect(filler, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::string url = "http://127.0.0.1:" + std::to_string(ntohs(addr.sin_port)) + "/";

  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.connect_timeout_ms = 150;
  auto r = FetchOne(fetcher, collector, settings, Post(url));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kDeadlineExceeded) << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 3u) << r.response.error->message;
  close(filler);
  close(listener);
}

TEST(FetcherTest, PostIsRetriedAfterADnsFailure) {
  const char* host = "gatherer-test.invalid";  // RFC 6761: never resolves
  const auto started = std::chrono::steady_clock::now();
  addrinfo* found = nullptr;
  const int rc = getaddrinfo(host, "80", nullptr, &found);
  if (found != nullptr) freeaddrinfo(found);
  if (rc == 0 || std::chrono::steady_clock::now() - started > milliseconds(500)) {
    GTEST_SKIP() << "the resolver here does not fail fast on .invalid";
  }
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const auto r = FetchOne(fetcher, collector, FastRetry(), Post(std::string("http://") + host + "/"));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnavailable) << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 3u);
}

TEST(FetcherTest, ConnectionRefusedIsUnavailableAfterMaxAttempts) {
  std::string url;
  {
    HttpServer closed;
    url = closed.url("/");
  }
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  auto r = FetchOne(fetcher, collector, FastRetry(), Get(url));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnavailable);
  EXPECT_EQ(r.response.status, 0);
  EXPECT_EQ(r.response.attempts, 3u);

  // Nothing was sent, so even a POST is tried again.
  Statement post = Get(url);
  post.method = "POST";
  r = FetchOne(fetcher, collector, FastRetry(), post, 2);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kUnavailable);
  EXPECT_EQ(r.response.attempts, 3u);
}

TEST(FetcherTest, TimeoutIsDeadlineExceeded) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.delay = seconds(2);
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.max_attempts = 1;
  Statement s = Get(server.url("/slow"));
  s.timeout_ms = 200;
  const auto started = std::chrono::steady_clock::now();
  auto r = FetchOne(fetcher, collector, settings, s);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kDeadlineExceeded);
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_LT(std::chrono::steady_clock::now() - started, milliseconds(1500));

  // The session timeout applies when the statement has none; timeouts are retried.
  settings.max_attempts = 2;
  settings.timeout_ms = 200;
  r = FetchOne(fetcher, collector, settings, Get(server.url("/slow")), 2);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kDeadlineExceeded);
  EXPECT_EQ(r.response.attempts, 2u);
}

TEST(FetcherTest, BodyOverCapIsResourceExhausted) {
  // 100,000 'a' gzip-compressed to 133 bytes: Content-Length passes the cap,
  // the decoded body does not, which exercises the write callback's cap.
  static const char kGzip[] =
      "\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03\xed\xc1\x31\x01\x00\x00\x00\xc2\xa0\xac\xeb\x5f\xc2\x1a\x1e\x40"
      "\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
      "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
      "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
      "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\xaf\x06\x87\xfa\xe2\x1b\xa0"
      "\x86\x01\x00";
  HttpServer server([](const HttpRequest& request) {
    if (request.target == "/gzip") {
      return HttpReply{200, {{"Content-Encoding", "gzip"}}, std::string(kGzip, sizeof kGzip - 1)};
    }
    return HttpReply{200, {}, std::string(1000, 'x')};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings settings = FastRetry();
  settings.max_body_bytes = 500;
  auto r = FetchOne(fetcher, collector, settings, Get(server.url("/big")));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kResourceExhausted);
  EXPECT_EQ(r.response.attempts, 1u);

  r = FetchOne(fetcher, collector, settings, Get(server.url("/gzip")), 2);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kResourceExhausted);
  EXPECT_LE(r.response.body.size(), 500u);

  // Under the cap the body arrives decoded.
  settings.max_body_bytes = 200'000;
  r = FetchOne(fetcher, collector, settings, Get(server.url("/gzip")), 3);
  ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  EXPECT_EQ(r.response.body, std::string(100'000, 'a'));
}

TEST(FetcherTest, OnlyHttpAndHttpsAreAllowed) {
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  for (const char* url : {"file:///etc/passwd", "gopher://127.0.0.1/", "ftp://127.0.0.1/", "not a url"}) {
    const auto r = FetchOne(fetcher, collector, FastRetry(), Get(url));
    ASSERT_FALSE(r.response.ok()) << url;
    EXPECT_EQ(r.response.error->code, StatusCode::kInvalidArgument) << url << ": " << r.response.error->message;
    EXPECT_TRUE(r.response.body.empty());
    EXPECT_EQ(r.response.attempts, 1u);
  }
}

TEST(FetcherTest, RedirectsKeepOnlyTheFinalResponse) {
  std::string file_url = "file:///etc/passwd";
  HttpServer server([&](const HttpRequest& request) {
    if (request.target == "/from") return HttpReply{302, {{"Location", "/to"}, {"X-First", "1"}}, ""};
    if (request.target == "/file") return HttpReply{302, {{"Location", file_url}}, ""};
    return HttpReply{200, {{"X-Final", "1"}}, "landed"};
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  auto r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/from")));
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.body, "landed");
  EXPECT_EQ(Header(r.response.headers, "X-Final"), "1");
  EXPECT_EQ(Header(r.response.headers, "X-First"), "");

  // Redirects off: the 302 itself is the (accepted) answer.
  SessionSettings no_redirects;
  no_redirects.max_redirects = 0;
  r = FetchOne(fetcher, collector, no_redirects, Get(server.url("/from")), 2);
  ASSERT_TRUE(r.response.ok());
  EXPECT_EQ(r.response.status, 302);
  EXPECT_EQ(Header(r.response.headers, "Location"), "/to");

  // A redirect may not leave http(s).
  r = FetchOne(fetcher, collector, SessionSettings{}, Get(server.url("/file")), 3);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kInvalidArgument) << r.response.error->message;
  EXPECT_NE(r.response.body, "landed");
}

TEST(FetcherTest, UnknownSessionYieldsFailedPrecondition) {
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  std::vector<FetchItem> items;
  for (std::uint64_t i = 0; i < 3; ++i) items.push_back(Item(i, "http://127.0.0.1:1/"));
  fetcher.submit(MakeSessionId(9), std::move(items));
  ASSERT_TRUE(collector.wait(3));
  for (const auto& r : collector.results()) {
    ASSERT_FALSE(r.response.ok());
    EXPECT_EQ(r.response.error->code, StatusCode::kFailedPrecondition);
    EXPECT_EQ(r.response.error->message, "session not open");
  }
  EXPECT_TRUE(WaitFor([&] { return fetcher.in_flight() == 0; }));
  EXPECT_EQ(fetcher.sessions(), 0u);
}

TEST(FetcherTest, CloseSessionAbortsInFlightTransfers) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.delay = seconds(5);
    return reply;
  });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const SessionId id = MakeSessionId(1);
  SessionSettings settings;
  settings.workers = 100;  // all 100 in flight at once
  fetcher.open_session(id, settings);
  EXPECT_EQ(fetcher.sessions(), 1u);
  std::vector<FetchItem> items;
  for (std::uint64_t i = 0; i < 100; ++i) items.push_back(Item(i, server.url("/wait")));
  fetcher.submit(id, std::move(items));
  EXPECT_EQ(fetcher.in_flight(), 100u);
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 100; }, seconds(20))) << server.in_flight();

  fetcher.close_session(id);
  EXPECT_EQ(fetcher.sessions(), 0u);
  EXPECT_TRUE(WaitFor([&] { return fetcher.in_flight() == 0; }, seconds(2))) << fetcher.in_flight();
  EXPECT_EQ(collector.count(), 0u);

  // The id can be opened again and works.
  fetcher.open_session(id, SessionSettings{});
  HttpServer quick;
  std::vector<FetchItem> again;
  again.push_back(Item(1, quick.url("/again")));
  fetcher.submit(id, std::move(again));
  ASSERT_TRUE(collector.wait(1));
  EXPECT_EQ(collector.results()[0].response.body, "ok:/again");
}

TEST(FetcherTest, CloseSessionDropsBackingOffTransfers) {
  HttpServer server([](const HttpRequest&) { return HttpReply{503, {{"Retry-After", "60"}}, ""}; });
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  const SessionId id = MakeSessionId(1);
  SessionSettings settings;
  settings.backoff_max_ms = 60'000;
  fetcher.open_session(id, settings);
  std::vector<FetchItem> items;
  for (std::uint64_t i = 0; i < 10; ++i) items.push_back(Item(i, server.url("/")));
  fetcher.submit(id, std::move(items));
  ASSERT_TRUE(WaitFor([&] { return server.requests() == 10; }));
  fetcher.close_session(id);
  EXPECT_TRUE(WaitFor([&] { return fetcher.in_flight() == 0; }, seconds(2)));
  EXPECT_EQ(collector.count(), 0u);
}

TEST(FetcherTest, DestructorAbortsInFlightTransfers) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.delay = seconds(10);
    return reply;
  });
  Collector collector;
  const auto started = std::chrono::steady_clock::now();
  {
    Fetcher fetcher(TwoThreads(), collector.sink());
    fetcher.open_session(MakeSessionId(1), SessionSettings{});
    std::vector<FetchItem> items;
    for (std::uint64_t i = 0; i < 20; ++i) items.push_back(Item(i, server.url("/wait")));
    fetcher.submit(MakeSessionId(1), std::move(items));
    ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 20; }, seconds(20)));
  }
  EXPECT_LT(std::chrono::steady_clock::now() - started, seconds(8));
  EXPECT_EQ(collector.count(), 0u);
}

// An I/O thread keeps the handle of a plain GET configured for the session's
// next one and sets only the statement's own options on it: nothing of one
// statement (headers, method, body, timeout) may reach the next. One thread
// and one statement at a time, so every statement gets the handle before it.
TEST(FetcherTest, AReusedHandleCarriesNothingOfTheStatementBefore) {
  std::mutex mu;
  std::vector<HttpRequest> seen;
  HttpServer server([&](const HttpRequest& req) {
    {
      std::lock_guard lock(mu);
      seen.push_back(req);
    }
    HttpReply r;
    if (req.target == "/slow") r.delay = std::chrono::milliseconds(300);
    r.body = "ok";
    return r;
  });
  Collector collector;
  Fetcher::Options options;
  options.io_threads = 1;
  Fetcher fetcher(options, collector.sink());
  const SessionId id = MakeSessionId(1);
  SessionSettings settings;
  settings.max_attempts = 1;
  fetcher.open_session(id, settings);
  std::vector<Statement> sequence;
  Statement with_header = Get(server.url("/a"));
  with_header.headers = {{"X-Only-A", "1"}};
  with_header.timeout_ms = 100;
  sequence.push_back(with_header);
  sequence.push_back(Get(server.url("/slow")));  // the timeout of /a is not kept: 300 ms is fine
  Statement post = Get(server.url("/c"));
  post.method = "POST";
  post.body = "payload";
  sequence.push_back(post);
  sequence.push_back(Get(server.url("/d")));
  Statement head = Get(server.url("/e"));
  head.method = "HEAD";
  sequence.push_back(head);
  sequence.push_back(Get(server.url("/f")));
  Statement not_idempotent = Get(server.url("/g"));
  not_idempotent.idempotent = false;
  sequence.push_back(not_idempotent);
  sequence.push_back(Get(server.url("/h")));
  for (std::size_t i = 0; i < sequence.size(); ++i) {
    std::vector<FetchItem> items(1);
    items[0].index = i;
    items[0].statement = sequence[i];
    fetcher.submit(id, std::move(items));
    ASSERT_TRUE(collector.wait(i + 1, seconds(10))) << "statement " << i;
    const FetchResult last = collector.last();
    EXPECT_FALSE(last.response.error.has_value()) << i << ": " << last.response.error->message;
    EXPECT_EQ(last.response.status, 200) << i;
  }
  std::lock_guard lock(mu);
  ASSERT_EQ(seen.size(), sequence.size());
  const std::vector<std::pair<std::string, std::string>> expected = {
      {"GET", "/a"}, {"GET", "/slow"}, {"POST", "/c"}, {"GET", "/d"},
      {"HEAD", "/e"}, {"GET", "/f"}, {"GET", "/g"}, {"GET", "/h"}};
  for (std::size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].method, expected[i].first) << i;
    EXPECT_EQ(seen[i].target, expected[i].second) << i;
    EXPECT_EQ(seen[i].header("X-Only-A"), i == 0 ? "1" : "") << i;
    EXPECT_EQ(seen[i].body, i == 2 ? "payload" : "") << i;
    EXPECT_EQ(seen[i].header("Content-Length"), i == 2 ? "7" : "") << i;
    EXPECT_NE(seen[i].header("User-Agent"), "") << i;
  }
  fetcher.close_session(id);
}

TEST(FetcherTest, SessionsAreIndependent) {
  HttpServer server;
  Collector collector;
  Fetcher fetcher(TwoThreads(), collector.sink());
  SessionSettings a, b;
  a.base_url = server.url("/a");
  b.base_url = server.url("/b");
  fetcher.open_session(MakeSessionId(1), a);
  fetcher.open_session(MakeSessionId(2), b);
  fetcher.open_session(MakeSessionId(1), b);  // re-opening keeps the first settings
  EXPECT_EQ(fetcher.sessions(), 2u);
  for (std::uint8_t s = 1; s <= 2; ++s) {
    std::vector<FetchItem> items;
    for (std::uint64_t i = 0; i < 50; ++i) items.push_back(Item(i + 100 * s, "/x"));
    fetcher.submit(MakeSessionId(s), std::move(items));
  }
  ASSERT_TRUE(collector.wait(100));
  for (const auto& r : collector.results()) {
    EXPECT_EQ(r.response.body, r.index < 200 ? "ok:/a/x" : "ok:/b/x") << r.index;
  }
  fetcher.close_session(MakeSessionId(1));
  fetcher.close_session(MakeSessionId(2));
  fetcher.close_session(MakeSessionId(3));  // unknown: ignored
  EXPECT_EQ(fetcher.sessions(), 0u);
}

TEST(FetcherTest, StatusCodeFromCurlMapping) {
  EXPECT_EQ(StatusCodeFromCurl(CURLE_COULDNT_CONNECT), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_COULDNT_RESOLVE_HOST), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_GOT_NOTHING), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_RECV_ERROR), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_SSL_CONNECT_ERROR), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_OPERATION_TIMEDOUT), StatusCode::kDeadlineExceeded);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_URL_MALFORMAT), StatusCode::kInvalidArgument);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_UNSUPPORTED_PROTOCOL), StatusCode::kInvalidArgument);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_FILESIZE_EXCEEDED), StatusCode::kResourceExhausted);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_WRITE_ERROR), StatusCode::kResourceExhausted);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_TOO_MANY_REDIRECTS), StatusCode::kFailedPrecondition);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_PEER_FAILED_VERIFICATION), StatusCode::kFailedPrecondition);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_ABORTED_BY_CALLBACK), StatusCode::kCancelled);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_OUT_OF_MEMORY), StatusCode::kInternal);
  EXPECT_EQ(StatusCodeFromCurl(CURLE_OK), StatusCode::kOk);
}

}  // namespace
}  // namespace gatherer::worker

namespace gatherer::worker {
namespace {

// A guarded worker refuses a redirect to a cloud metadata address before any
// socket to it exists: permission_denied, one attempt, never retried.
TEST(FetcherTest, ARedirectToTheMetadataAddressIsRefusedByAGuardedWorker) {
  HttpServer server([](const HttpRequest& request) {
    if (request.target == "/go") return HttpReply{302, {{"Location", "http://169.254.169.254/latest/meta-data/"}}, ""};
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher::Options options = TwoThreads();
  ASSERT_TRUE(ParseRefusedDestinations("link-local,private", options.destinations).ok());
  Fetcher fetcher(options, collector.sink());
  auto r = FetchOne(fetcher, collector, FastRetry(), Get(server.url("/go")));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kPermissionDenied);
  EXPECT_NE(r.response.error->message.find("169.254.169.254 is link-local"), std::string::npos)
      << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 1u);
  EXPECT_EQ(server.requests(), 1u);
  // Loopback itself was not refused: the first hop was served.
  r = FetchOne(fetcher, collector, FastRetry(), Get(server.url("/plain")), 2);
  EXPECT_TRUE(r.response.ok());
}

TEST(FetcherTest, RefusedLoopbackIsCheckedAfterDns) {
  HttpServer server;
  Collector collector;
  Fetcher::Options options = TwoThreads();
  ASSERT_TRUE(ParseRefusedDestinations("all", options.destinations).ok());
  Fetcher fetcher(options, collector.sink());
  // "localhost" is a name: the address it resolves to is what is refused.
  auto r = FetchOne(fetcher, collector, FastRetry(),
                    Get("http://localhost:" + std::to_string(server.port()) + "/x"));
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kPermissionDenied);
  EXPECT_NE(r.response.error->message.find("is loopback"), std::string::npos) << r.response.error->message;
  EXPECT_EQ(server.requests(), 0u);
}

TEST(FetcherTest, HostsOffTheAllowListAreRefusedAlsoAtARedirect) {
  HttpServer server([&](const HttpRequest& request) {
    if (request.target == "/hop") return HttpReply{302, {{"Location", "/elsewhere"}}, ""};
    return HttpReply{200, {}, "ok:" + request.target};
  });
  const std::string port = std::to_string(server.port());
  Collector collector;
  Fetcher::Options options = TwoThreads();
  options.destinations.allowed_hosts = {"localhost"};
  Fetcher fetcher(options, collector.sink());
  auto r = FetchOne(fetcher, collector, FastRetry(), Get("http://localhost:" + port + "/fine"));
  EXPECT_TRUE(r.response.ok()) << (r.response.error ? r.response.error->message : "");
  // Another name for the same server is another host.
  r = FetchOne(fetcher, collector, FastRetry(), Get("http://127.0.0.1:" + port + "/no"), 2);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kPermissionDenied);
  EXPECT_NE(r.response.error->message.find("127.0.0.1"), std::string::npos) << r.response.error->message;
  EXPECT_EQ(r.response.attempts, 0u);
  const std::uint64_t served = server.requests();
  // A redirect to an absolute URL on a host off the list is refused before it is requested.
  options.destinations.allowed_hosts = {"*.localhost", "localhost"};
  Fetcher narrow(options, collector.sink());
  HttpServer bouncer([&](const HttpRequest&) {
    return HttpReply{302, {{"Location", "http://127.0.0.1:" + port + "/stolen"}}, ""};
  });
  r = FetchOne(narrow, collector, FastRetry(), Get("http://localhost:" + std::to_string(bouncer.port()) + "/"), 3);
  ASSERT_FALSE(r.response.ok());
  EXPECT_EQ(r.response.error->code, StatusCode::kPermissionDenied) << r.response.error->message;
  EXPECT_EQ(server.requests(), served);
}

TEST(DestinationsTest, ClassesAndHosts) {
  DestinationPolicy p;
  EXPECT_FALSE(ParseRefusedDestinations("loopback,nonsense", p).ok());
  DestinationPolicy all;
  ASSERT_TRUE(ParseRefusedDestinations("all", all).ok());
  const auto v4 = [&](const char* text) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    inet_pton(AF_INET, text, &a.sin_addr);
    return RefusedAddress(reinterpret_cast<sockaddr*>(&a), all);
  };
  const auto v6 = [&](const char* text) {
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    inet_pton(AF_INET6, text, &a.sin6_addr);
    return RefusedAddress(reinterpret_cast<sockaddr*>(&a), all);
  };
  EXPECT_EQ(v4("169.254.169.254"), "169.254.169.254 is link-local");
  EXPECT_EQ(v4("127.0.0.1"), "127.0.0.1 is loopback");
  EXPECT_EQ(v4("10.1.2.3"), "10.1.2.3 is private");
  EXPECT_EQ(v4("172.31.255.1"), "172.31.255.1 is private");
  EXPECT_EQ(v4("172.32.0.1"), "");
  EXPECT_EQ(v4("192.168.0.1"), "192.168.0.1 is private");
  EXPECT_EQ(v4("100.100.100.200"), "100.100.100.200 is private");
  EXPECT_EQ(v4("93.184.216.34"), "");
  EXPECT_EQ(v6("::1"), "::1 is loopback");
  EXPECT_EQ(v6("fe80::1"), "fe80::1 is link-local");
  EXPECT_EQ(v6("fd00:ec2::254"), "fd00:ec2::254 is private");
  EXPECT_EQ(v6("::ffff:169.254.169.254"), "169.254.169.254 is link-local");
  EXPECT_EQ(v6("2606:2800:220:1::"), "");
  DestinationPolicy hosts;
  hosts.allowed_hosts = {"api.example.com", "*.cdn.example.com"};
  EXPECT_TRUE(HostAllowed("API.example.com", hosts));
  EXPECT_TRUE(HostAllowed("api.example.com.", hosts));
  EXPECT_TRUE(HostAllowed("a.b.cdn.example.com", hosts));
  EXPECT_FALSE(HostAllowed("cdn.example.com", hosts));
  EXPECT_FALSE(HostAllowed("evil-api.example.com", hosts));
  EXPECT_FALSE(HostAllowed("api.example.com.evil", hosts));
  EXPECT_TRUE(HostAllowed("anything", DestinationPolicy{}));
}

// Options::source_address: every connection leaves from that local address,
// as the server sees it.
TEST(FetcherTest, RequestsLeaveFromTheSourceAddress) {
  std::mutex mu;
  std::set<std::string> peers;  // guarded by mu
  HttpServer server([&](const HttpRequest& request) {
    std::lock_guard lock(mu);
    peers.insert(request.peer_address);
    return HttpReply{200, {}, "ok"};
  });
  Collector collector;
  Fetcher::Options options = TwoThreads();
  options.source_address = "127.0.0.31";
  Fetcher fetcher(options, collector.sink());
  const SessionId id = MakeSessionId(1);
  fetcher.open_session(id, SessionSettings{});
  std::vector<FetchItem> items;
  for (std::uint64_t i = 0; i < 8; ++i) {
    std::string path = "/";
    path += std::to_string(i);
    items.push_back(Item(i, server.url(path)));
  }
  fetcher.submit(id, std::move(items));
  ASSERT_TRUE(collector.wait(8));
  for (const auto& r : collector.results()) ASSERT_TRUE(r.response.ok()) << r.response.error->message;
  std::lock_guard lock(mu);
  EXPECT_EQ(peers, std::set<std::string>{"127.0.0.31"});
}

TEST(FetcherTest, ASourceAddressThatIsNotAnIpLiteralIsRefused) {
  for (const char* bad : {"localhost", "eth0", "127.0.0.300", "host!127.0.0.1"}) {
    Fetcher::Options options = TwoThreads();
    options.source_address = bad;
    Collector collector;
    try {
      Fetcher fetcher(options, collector.sink());
      ADD_FAILURE() << bad << " was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("is not an IPv4 or IPv6 address"), std::string::npos) << e.what();
    }
  }
}

// The worker refuses it in start(), before it connects: no broker is needed.
TEST(WorkerTest, StartRefusesASourceAddressThatIsNotAnIpLiteral) {
  WorkerOptions options;
  options.broker = "tcp://127.0.0.1:1";
  options.source_address = "my-host.example";
  Worker worker(options);
  const Status status = worker.start();
  EXPECT_EQ(status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("'my-host.example' is not an IPv4 or IPv6 address"), std::string::npos)
      << status.message();
  EXPECT_TRUE(CheckSourceAddress("").ok());
  EXPECT_TRUE(CheckSourceAddress("127.0.0.31").ok());
  // An address of no interface of this host (TEST-NET-1) fails at start too.
  const Status elsewhere = CheckSourceAddress("192.0.2.1");
  EXPECT_EQ(elsewhere.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(elsewhere.message().find("'192.0.2.1' cannot be bound on this host"), std::string::npos)
      << elsewhere.message();
}

}  // namespace
}  // namespace gatherer::worker
