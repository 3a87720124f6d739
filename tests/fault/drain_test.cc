// Graceful drain with real processes and SIGTERM (PROTOCOL.md §3.4.7, §4.7):
// a worker finishes what it holds and exits 0; past its deadline it hands
// the rest back; a broker serves its sessions to the end, refuses new ones,
// and exits 0.

#include <signal.h>

#include <time.h>

#include <future>
#include <thread>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/broker.h"
#include "gatherer/gatherer.h"
#include "cluster.h"
#include "free_port.h"
#include "handlers.h"
#include "http_server.h"
#include "process.h"
#include "statements.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using namespace testing;

std::unique_ptr<Process> StartWorker(const std::string& broker, const std::string& drain_ms = "30000") {
  return testing::StartWorkerProcess(broker, 200ms, {"--drain-timeout-ms", drain_ms});
}

std::unique_ptr<Broker> StartBroker() { return testing::StartLoopbackBroker(200ms); }

// SIGTERM while ~100 statements are in flight: the worker takes nothing
// more, finishes them, returns them and exits 0; a second worker does the
// rest. Nothing runs twice.
TEST(DrainTest, WorkerSigtermFinishesWhatItHoldsAndExitsZero) {
  HttpServer server(DelayHandler);
  auto broker = StartBroker();
  const std::string ep = broker->endpoints()[0];
  auto first = StartWorker(ep);
  ASSERT_TRUE(WaitFor([&] { return broker->stats().workers.load() == 1; }, 10s));
  constexpr int kCount = 600;
  Gatherer g({.broker = ep, .workers = 100, .log_level = 40});
  g.statements = Delayed(server, kCount, 300);
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() >= 100; }, 30s));
  const auto before = server.requests();
  first->kill(SIGTERM);
  const auto exit = first->wait(10s);
  ASSERT_TRUE(exit.has_value()) << "the worker did not exit after draining";
  EXPECT_EQ(*exit, 0);
  EXPECT_EQ(server.requests(), before) << "a draining worker started new statements";
  EXPECT_EQ(server.in_flight(), 0) << "the worker exited with transfers still running";
  auto second = StartWorker(ep);
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  ExpectAllBodies(run.get(), kCount);
  EXPECT_EQ(server.requests(), static_cast<std::uint64_t>(kCount)) << "statements ran twice";
  EXPECT_EQ(broker->stats().requeued.load(), 0u);
  EXPECT_EQ(broker->stats().quarantined.load(), 0u);
}

// Past its drain deadline a worker aborts what it still holds and hands it
// back: the statements run again elsewhere at once (no quarantine, no wait
// for missed heartbeats), and the job completes.
TEST(DrainTest, WorkerPastItsDrainDeadlineHandsTheRestBack) {
  HttpServer server(DelayHandler);
  auto broker = StartBroker();
  const std::string ep = broker->endpoints()[0];
  auto first = StartWorker(ep, "200");
  ASSERT_TRUE(WaitFor([&] { return broker->stats().workers.load() == 1; }, 10s));
  constexpr int kCount = 50;
  Gatherer g({.broker = ep, .workers = 50, .log_level = 40});
  g.statements = Delayed(server, kCount, 2000);
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == kCount; }, 30s));
  const auto signalled = Clock::now();
  first->kill(SIGTERM);
  const auto exit = first->wait(5s);
  ASSERT_TRUE(exit.has_value());
  EXPECT_EQ(*exit, 0);
  EXPECT_LT(Clock::now() - signalled, 1500ms) << "the drain deadline (200 ms) was not kept";
  ASSERT_TRUE(WaitFor([&] { return broker->stats().requeued.load() == kCount; }, 2s))
      << "requeued " << broker->stats().requeued.load();
  auto second = StartWorker(ep);
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  ExpectAllBodies(run.get(), kCount);
  EXPECT_EQ(broker->stats().quarantined.load(), 0u);
}

// SIGTERM on the broker: the running job completes; a new session is refused
// with "unavailable"; once the job's Gatherer closes its session the broker
// exits 0.
TEST(DrainTest, BrokerSigtermServesOpenSessionsRefusesNewOnesAndExitsZero) {
  HttpServer server(DelayHandler);
  const std::string ep = testing::FreeTcpEndpoint();
  // At info level: the test waits for the line saying it drains.
  auto broker = testing::StartBinary("broker/gatherer-broker",
                                     {"--bind", ep, "--heartbeat-ms", "200", "--log-level", "info"}, {});
  auto worker = StartWorker(ep);
  constexpr int kCount = 1000;
  auto g = std::make_unique<Gatherer>(Options{.broker = ep, .workers = 50, .log_level = 40});
  g->statements = Delayed(server, kCount, 20);
  auto run = std::async(std::launch::async, [&] { return g->gather(); });
  ASSERT_TRUE(WaitFor([&] { return server.requests() >= 100; }, 30s));
  broker->kill(SIGTERM);
  // The broker stays up for the open session; a new one is refused once it
  // has taken the signal, which it does asynchronously.
  ASSERT_TRUE(WaitFor([&] { return broker->stderr_text().find("draining: no new") != std::string::npos; }, 10s))
      << broker->stderr_text();
  {
    Gatherer late({.broker = ep, .workers = 1, .log_level = 50});
    late.statements = {Get(server.url("/d/0/0"))};
    try {
      late.gather();
      ADD_FAILURE() << "a draining broker accepted a new session";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), StatusCode::kUnavailable) << e.what();
    }
  }
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  ExpectAllBodies(run.get(), kCount);
  EXPECT_TRUE(broker->running()) << "the broker exited with a session open";
  g.reset();  // closes the session
  const auto exit = broker->wait(10s);
  ASSERT_TRUE(exit.has_value()) << "the broker did not exit once its sessions ended";
  EXPECT_EQ(*exit, 0);
}

// A draining broker with nothing to do waits, it does not spin: its loop
// must consume the wake-up that drain() sends (it used to poll a descriptor
// left readable, at 100% of a core for the whole drain deadline).
TEST(DrainTest, DrainingBrokerDoesNotSpin) {
  auto broker = StartBroker();
  broker->drain();
  timespec a{}, b{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
  std::this_thread::sleep_for(1s);  // the interval measured, not a wait for anything
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
  const double cpu = static_cast<double>(b.tv_sec - a.tv_sec) + static_cast<double>(b.tv_nsec - a.tv_nsec) / 1e9;
  EXPECT_LT(cpu, 0.3) << "a draining broker with no sessions used " << cpu << " s of CPU in 1 s";
}

}  // namespace
}  // namespace gatherer
