// Cross-component tests of the whole pipeline: Gatherer -> broker -> worker ->
// a real HTTP server on 127.0.0.1, embedded (inproc) and with real
// gatherer-broker / gatherer-worker processes over tcp and ipc.

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <zmq.hpp>

#include "gatherer/broker.h"
#include "gatherer/gatherer.h"
#include "gatherer/worker.h"
#include "free_port.h"
#include "handlers.h"
#include "http_server.h"
#include "local_cluster.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using namespace testing;

const std::string kBin = GATHERER_BIN_DIR;

void ExpectInOrder(const std::vector<Response>& responses, std::size_t n) {
  ASSERT_EQ(responses.size(), n);
  for (std::size_t i = 0; i < n; ++i) {
    ASSERT_TRUE(responses[i].ok()) << "index " << i << ": " << responses[i].error->message;
    ASSERT_EQ(responses[i].status, 200) << "index " << i;
    ASSERT_EQ(responses[i].body, "body-" + std::to_string(i)) << "index " << i;
  }
}

Options Quiet(Options o = {}) {
  o.log_level = 40;
  return o;
}

WorkerOptions TwoIoThreads() {
  WorkerOptions o;
  o.io_threads = 2;
  return o;
}

TEST(PipelineTest, OrderIsPreservedUnderRandomServerDelays) {
  HttpServer server(DelayHandler);
  std::mt19937 rng(7);
  Gatherer g(Quiet({.workers = 50}));
  for (int i = 0; i < 600; ++i) {
    g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/" + std::to_string(rng() % 40))));
  }
  const auto& responses = g.gather();
  ExpectInOrder(responses, 600);
  EXPECT_EQ(&responses, &g.responses);
  EXPECT_EQ(server.requests(), 600u);
}

TEST(PipelineTest, TenThousandStatements) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet({.workers = 256}));
  g.statements.reserve(10'000);
  for (int i = 0; i < 10'000; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/0")));
  ExpectInOrder(g.gather(), 10'000);
  EXPECT_EQ(server.requests(), 10'000u) << "each statement fetched exactly once";
  EXPECT_LE(server.max_in_flight(), 256) << "the window caps concurrency across the cluster";
}

// The sliding window (docs/architecture.md §1): one slow statement must not hold back the others.
// The server holds the slow one's reply until every other statement has reached it (at most 20 s,
// under the 30 s statement timeout): a lockstep-chunk design could not send statements 25..1000
// while statement 0 is unanswered, so they would arrive only after its 20 s were up.
TEST(PipelineTest, SlidingWindowIsNotLockstep) {
  constexpr int kFast = 1000;
  constexpr auto kHold = 20s;
  std::mutex mu;
  std::chrono::steady_clock::time_point slow_arrived{}, last_fast_arrived{};
  int fast = 0;
  HttpServer* self = nullptr;
  HttpServer server([&](const HttpRequest& req) {
    HttpReply r;
    std::lock_guard lock(mu);
    if (req.target == "/slow") {
      slow_arrived = std::chrono::steady_clock::now();
      r.delay = kHold;
    } else {
      last_fast_arrived = std::chrono::steady_clock::now();
      r.delay = 10ms;
      if (++fast == kFast) self->release_delayed();
    }
    return r;
  });
  self = &server;
  Gatherer g(Quiet({.workers = 25}));
  g.statements.push_back(Get(server.url("/slow")));
  for (int i = 0; i < kFast; ++i) g.statements.push_back(Get(server.url("/fast/" + std::to_string(i))));
  const auto& r = g.gather();
  ASSERT_EQ(r.size(), 1001u);
  for (const auto& resp : r) ASSERT_TRUE(resp.ok());
  std::lock_guard lock(mu);
  ASSERT_EQ(fast, kFast);
  ASSERT_NE(slow_arrived, std::chrono::steady_clock::time_point{});
  EXPECT_LT(last_fast_arrived - slow_arrived, kHold) << "the other statements waited for the slow one";
  EXPECT_EQ(server.max_in_flight(), 25);
}

TEST(PipelineTest, FailureSitsAtItsIndexWithoutCancelOnRaise) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet({.workers = 10}));
  for (int i = 0; i < 50; ++i) {
    g.statements.push_back(Get(server.url(i == 17 ? "/missing" : "/d/" + std::to_string(i) + "/0")));
  }
  const auto& r = g.gather();
  ASSERT_EQ(r.size(), 50u);
  for (int i = 0; i < 50; ++i) {
    if (i == 17) {
      ASSERT_FALSE(r[i].ok());
      EXPECT_EQ(r[i].status, 404);
      EXPECT_EQ(r[i].error->code, StatusCode::kHttpStatus);
      EXPECT_EQ(r[i].attempts, 1u) << "404 is not retried";
    } else {
      EXPECT_TRUE(r[i].ok()) << i;
      EXPECT_EQ(r[i].body, "body-" + std::to_string(i));
    }
  }
}

TEST(PipelineTest, CancelOnRaiseThrowsNamingTheIndexAndStopsTheRest) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet({.workers = 4, .cancel_on_raise = true}));
  g.statements.push_back(Get(server.url("/missing")));
  for (int i = 1; i < 400; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/50")));
  try {
    g.gather();
    FAIL() << "gather() did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.index(), 0);
    EXPECT_NE(std::string(e.what()).find("statement 0"), std::string::npos) << e.what();
  }
  // Queued statements were dropped: the server sees far fewer than 400.
  const auto seen = server.requests();
  EXPECT_LT(seen, 100u);
  // The same Gatherer gathers again after a cancelled batch.
  g.statements = {Get(server.url("/d/0/0")), Get(server.url("/d/1/0"))};
  ExpectInOrder(g.gather(), 2);
}

TEST(PipelineTest, InvalidStatementSendsNothingAndNamesTheIndex) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet());
  for (int i = 0; i < 20; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/0")));
  g.statements[7].url = "file:///etc/passwd";
  try {
    g.gather();
    FAIL() << "gather() did not throw";
  } catch (const Error& e) {
    EXPECT_EQ(e.index(), 7);
    EXPECT_EQ(e.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("statement 7"), std::string::npos) << e.what();
  }
  g.statements[7].url = server.url("/d/7/0");
  g.statements[3].headers = {{"X-Bad", "a\r\nInjected: yes"}};
  EXPECT_THROW(g.gather(), Error);
  EXPECT_EQ(server.requests(), 0u) << "nothing may be sent when a statement is invalid";
}

TEST(PipelineTest, SeveralGathersOnOneInstance) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet());
  for (int round = 0; round < 3; ++round) {
    g.statements.clear();
    for (int i = 0; i < 100; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/1")));
    ExpectInOrder(g.gather(), 100);
  }
  EXPECT_EQ(server.requests(), 300u);
}

// Regression: a lost wake-up between the worker's I/O threads and its socket
// thread stranded finished results and stalled the session with exactly the
// window in flight (seen about once in 5,000 batches). Many small batches
// finishing at random moments on two I/O threads make that window likely.
TEST(PipelineTest, ManyGathersWithRandomDelaysNeverStall) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet({.workers = 50, .embedded_io_threads = 2}));
  std::mt19937 rng(11);
  for (int round = 0; round < 150; ++round) {
    g.statements.clear();
    for (int i = 0; i < 300; ++i) {
      g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/" + std::to_string(rng() % 6))));
    }
    auto done = std::async(std::launch::async, [&] {
      try {
        return g.gather().size();
      } catch (const Error&) {
        return std::size_t{0};  // cancelled below after a stall
      }
    });
    if (done.wait_for(20s) != std::future_status::ready) {
      g.cancel();
      ADD_FAILURE() << "stalled in round " << round;
      return;
    }
    ASSERT_EQ(done.get(), 300u);
    ExpectInOrder(g.responses, 300);
  }
}

TEST(PipelineTest, CancelFromAnotherThread) {
  HttpServer server(DelayHandler);
  Gatherer g(Quiet({.workers = 5}));
  for (int i = 0; i < 200; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/100")));
  std::thread canceller([&] {
    WaitFor([&] { return server.requests() >= 5; }, 10s);
    g.cancel();
  });
  try {
    g.gather();
    ADD_FAILURE() << "gather() was not cancelled";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kCancelled);
  }
  canceller.join();
  EXPECT_LT(server.requests(), 200u);
}

// Destroying the Gatherer closes the session on the broker and
// on every worker holding it.
TEST(PipelineTest, SessionIsForgottenAfterDestruction) {
  HttpServer server(DelayHandler);
  LocalCluster cluster;
  ASSERT_TRUE(cluster.start_registered(2, TwoIoThreads()));
  Broker& broker = cluster.broker();
  Worker& w1 = cluster.worker(0);
  Worker& w2 = cluster.worker(1);
  {
    Gatherer g(Quiet({.broker = cluster.endpoint(), .workers = 40}));
    for (int i = 0; i < 400; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/2")));
    ExpectInOrder(g.gather(), 400);
    EXPECT_EQ(broker.stats().sessions.load(), 1u);
    EXPECT_GT(w1.stats().completed.load(), 0u) << "work is spread over both workers";
    EXPECT_GT(w2.stats().completed.load(), 0u) << "work is spread over both workers";
  }
  EXPECT_EQ(broker.stats().sessions.load(), 0u);
  EXPECT_TRUE(WaitFor([&] { return w1.sessions() == 0 && w2.sessions() == 0; }, 5s))
      << "workers still hold the session";
}

// `workers` is, as in the original, the most connections a job keeps at once: with two worker
// processes the broker shares the window out between them (PROTOCOL.md §4.2), so the server sees
// at most `workers` connections, not a window's worth from each worker.
TEST(PipelineTest, TwoWorkersOpenNoMoreConnectionsThanTheWindow) {
  HttpServer server(DelayHandler);
  LocalCluster cluster;
  ASSERT_TRUE(cluster.start_registered(2, TwoIoThreads()));
  constexpr int kWindow = 256;
  Gatherer g(Quiet({.broker = cluster.endpoint(), .workers = kWindow}));
  // Every 8th statement is slow, so each worker's load swings: at times it has far more than
  // half the window in flight, spread over both its I/O threads.
  for (int i = 0; i < 5000; ++i) {
    g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/" + (i % 8 == 0 ? "30" : "0"))));
  }
  ExpectInOrder(g.gather(), 5000);
  EXPECT_GT(cluster.worker(0).stats().completed.load(), 0u) << "work is spread over both workers";
  EXPECT_GT(cluster.worker(1).stats().completed.load(), 0u) << "work is spread over both workers";
  EXPECT_LE(server.max_in_flight(), kWindow);
  EXPECT_LE(server.connections(), static_cast<std::uint64_t>(kWindow)) << "connections past the window";
}

// ---- real processes -------------------------------------------------------


TEST(ProcessTest, BrokerAndTwoWorkerProcessesOverTcp) {
  HttpServer server(DelayHandler);
  const std::string ep = testing::FreeTcpEndpoint();
  Process broker({kBin + "/broker/gatherer-broker", "--bind", ep, "--log-level", "warning"});
  Process w1({kBin + "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--log-level", "warning"});
  Process w2({kBin + "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--log-level", "warning"});
  std::set<std::string> workers_seen;
  {
    Gatherer g(Quiet({.broker = ep, .workers = 64}));
    for (int i = 0; i < 3000; ++i) g.statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/1")));
    ExpectInOrder(g.gather(), 3000);
    for (const auto& r : g.responses) workers_seen.insert(r.worker);
  }
  EXPECT_EQ(workers_seen.size(), 2u) << "both worker processes took statements";
  EXPECT_EQ(server.requests(), 3000u);
  EXPECT_TRUE(broker.running());
  broker.kill(SIGTERM);
  EXPECT_EQ(broker.wait(10s), std::optional<int>(0));
  w1.kill(SIGTERM);
  w2.kill(SIGTERM);
  EXPECT_EQ(w1.wait(10s), std::optional<int>(0));
  EXPECT_EQ(w2.wait(10s), std::optional<int>(0));
}

// Starting order does not matter: client and worker first, broker last.
TEST(ProcessTest, ClientAndWorkerStartedBeforeTheBrokerOverIpc) {
  HttpServer server(DelayHandler);
  const auto dir = std::filesystem::temp_directory_path() / ("gtr-" + std::to_string(getpid()));
  std::filesystem::create_directories(dir);
  const std::string ep = "ipc://" + (dir / "broker.sock").string();
  Process worker({kBin + "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--heartbeat-ms", "200",
                  "--log-level", "warning"});
  std::future<std::vector<Response>> result;
  {
    auto g = std::make_unique<Gatherer>(Quiet({.broker = ep, .workers = 8}));
    for (int i = 0; i < 100; ++i) g->statements.push_back(Get(server.url("/d/" + std::to_string(i) + "/0")));
    result = std::async(std::launch::async, [g = std::move(g)]() mutable {
      auto out = g->gather();
      g.reset();
      return out;
    });
    ASSERT_EQ(result.wait_for(300ms), std::future_status::timeout) << "gather finished without a broker";
    Process broker({kBin + "/broker/gatherer-broker", "--bind", ep, "--log-level", "warning"});
    ASSERT_EQ(result.wait_for(30s), std::future_status::ready);
    ExpectInOrder(result.get(), 100);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace gatherer
