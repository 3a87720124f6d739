// Link faults (PROTOCOL.md §1.5, §3.6, §3.7): a plain TCP proxy sits on one
// hop — client to broker, or worker to broker — and is SIGKILLed mid-job, so
// every connection through it is reset at once, then started again on the
// same port 0.3 s later, as a NAT or a load balancer restart does to a
// cluster. Each test asserts what a user checks: every response once, in
// order, with the right body; the server saw each request exactly once (a
// dropped connection costs a resynchronisation, never a re-fetch, and a POST
// is never sent twice); and prints how long the job took to run at full
// speed again.

#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/broker.h"
#include "gatherer/gatherer.h"
#include "cluster.h"
#include "free_port.h"
#include "http_server.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using testing::HttpServer;
using testing::Process;
using testing::WaitFor;

// The production heartbeat: a 0.3 s outage must cost no worker its place.
constexpr auto kHeartbeat = 1000ms;
constexpr auto kGap = 300ms;  // the proxy is down this long (the fault, not a wait)

// GATHERER_LINK_N overrides the statement count: 10,000, or 2,000 under a
// sanitizer (ThreadSanitizer runs this pipeline about 20 times slower).
std::uint64_t StatementCount() {
  const char* v = std::getenv("GATHERER_LINK_N");
  if (v && *v) return std::strtoull(v, nullptr, 10);
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  return 2'000;
#else
  return 10'000;
#endif
}

// "/s/<i>" and "/p/<i>" answer "body-<i>" after 20 ms; every request is
// counted by method and target.
class CountingServer {
 public:
  CountingServer()
      : server_([this](const testing::HttpRequest& req) {
          {
            std::lock_guard lock(mu_);
            ++counts_[req.method + " " + req.target];
          }
          testing::HttpReply r;
          r.delay = 20ms;
          r.body = "body-" + req.target.substr(3);
          return r;
        }) {}
  std::string url(const std::string& path) const { return server_.url(path); }
  std::uint64_t requests() const { return server_.requests(); }
  // Targets requested more than once.
  std::vector<std::string> repeated() const {
    std::lock_guard lock(mu_);
    std::vector<std::string> out;
    for (const auto& [k, n] : counts_) {
      if (n > 1) out.push_back(k + " x" + std::to_string(n));
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, int> counts_;
  HttpServer server_;
};

std::unique_ptr<Process> StartProxy(std::uint16_t listen, std::uint16_t target) {
  const std::string binary = GATHERER_BIN_DIR "/tests/gatherer-test-proxy";
  auto p = std::make_unique<Process>(std::vector<std::string>{binary, std::to_string(listen), std::to_string(target)});
  EXPECT_TRUE(WaitFor([&] { return p->stdout_text().find("ready") != std::string::npos; }, 10s))
      << "proxy did not start: " << p->stderr_text();
  return p;
}

std::uint16_t PortOf(const std::string& endpoint) {
  return static_cast<std::uint16_t>(std::stoi(endpoint.substr(endpoint.rfind(':') + 1)));
}

// Runs N statements (every tenth a POST) through `g`, resetting the link
// through `proxy` once a quarter of them are answered, and checks the run.
void RunThroughABlip(const Options& options, std::unique_ptr<Process>& proxy, std::uint16_t listen, std::uint16_t target,
                     CountingServer& server, const char* name) {
  const std::uint64_t n = StatementCount();
  std::vector<Statement> list;
  list.reserve(n);
  for (std::uint64_t i = 0; i < n; ++i) {
    if (i % 10 == 0) {
      Statement post = Get(server.url("/p/" + std::to_string(i)));
      post.method = "POST";
      post.body = "x";
      list.push_back(std::move(post));
    } else {
      list.push_back(Get(server.url("/s/" + std::to_string(i))));
    }
  }
  std::atomic<std::uint64_t> answered{0};
  std::atomic<bool> done{false};
  Clock::time_point killed, restarted;
  std::thread fault([&] {
    if (!WaitFor([&] { return answered.load() >= n / 4 || done.load(); }, 120s) || done.load()) return;
    killed = Clock::now();
    proxy->kill(SIGKILL);
    proxy->wait(5s);
    std::this_thread::sleep_for(kGap);  // the outage itself
    proxy = StartProxy(listen, target);
    restarted = Clock::now();
    // A child started here is killed when its forking thread ends
    // (PR_SET_PDEATHSIG, see process.h): this thread lives until the job ends.
    WaitFor([&] { return done.load(); }, 300s);
  });
  std::vector<Clock::time_point> at(n);
  std::uint64_t expected = 0;
  bool in_order = true;
  std::uint64_t bad = 0;
  const auto start = Clock::now();
  double wall = 0;
  try {
    // Destroyed before the fault thread ends, which kills the proxy it
    // started: closing the session goes through the proxy too.
    Gatherer g(options);
    for (auto& item : g.stream(list)) {
      if (item.index != expected) in_order = false;
      const std::string want = "body-" + std::to_string(item.index);
      if (!item.response.ok() || item.response.status != 200 || item.response.body != want) {
        if (bad++ < 5) {
          ADD_FAILURE() << "statement " << item.index << ": status " << item.response.status << " body '"
                        << item.response.body.substr(0, 40) << "' error "
                        << (item.response.error ? item.response.error->message : "none");
        }
      }
      if (expected < n) at[expected] = Clock::now();
      ++expected;
      answered.store(expected);
    }
    wall = std::chrono::duration<double>(Clock::now() - start).count();
  } catch (const Error& e) {
    ADD_FAILURE() << "stream threw after " << expected << " of " << n << ": " << e.what();
  }
  done = true;
  fault.join();
  EXPECT_EQ(expected, n);
  EXPECT_TRUE(in_order);
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(server.requests(), n) << "re-fetched or never sent";
  const auto repeated = server.repeated();
  EXPECT_TRUE(repeated.empty()) << "requested more than once, e.g. " << (repeated.empty() ? "" : repeated.front());
  ASSERT_NE(restarted, Clock::time_point{}) << "the fault was never injected";
  // Recovery: from the proxy's restart to the first 100 ms in which answers
  // come at >= 80% of the rate of the 250 ms before the kill.
  auto answered_between = [&](Clock::time_point a, Clock::time_point b) {
    return static_cast<double>(std::count_if(at.begin(), at.begin() + static_cast<std::ptrdiff_t>(expected),
                                             [&](auto t) { return t >= a && t < b; }));
  };
  const double before = 4 * answered_between(killed - 250ms, killed);
  double recovery_ms = -1;
  for (auto t = restarted; t < restarted + 30s && t < at[expected - 1]; t += 10ms) {
    if (answered_between(t, t + 100ms) * 10 >= 0.8 * before) {
      recovery_ms = std::chrono::duration<double, std::milli>(t - restarted).count();
      break;
    }
  }
  std::cout << "[figures] " << name << ": " << n << " statements in " << wall << " s; " << before
            << " answers/s before the reset; full speed " << recovery_ms
            << " ms after the link came back (-1: the job ended first); server requests " << server.requests()
            << "\n";
}

TEST(LinkTest, ClientLinkResetMidJobLosesNothing) {
  CountingServer server;
  auto broker = testing::StartLoopbackBroker(kHeartbeat);
  const std::string ep = broker->endpoints().front();
  auto worker = testing::StartWorkerProcess(ep, kHeartbeat);
  const std::uint16_t listen = testing::FreeTcpPort();
  auto proxy = StartProxy(listen, PortOf(ep));
  RunThroughABlip({.broker = "tcp://127.0.0.1:" + std::to_string(listen), .workers = 200, .log_level = 30}, proxy, listen, PortOf(ep), server, "client link reset");
}

TEST(LinkTest, WorkerLinkResetMidJobLosesNothing) {
  CountingServer server;
  auto broker = testing::StartLoopbackBroker(kHeartbeat);
  const std::string ep = broker->endpoints().front();
  const std::uint16_t listen = testing::FreeTcpPort();
  auto proxy = StartProxy(listen, PortOf(ep));
  auto worker = testing::StartWorkerProcess("tcp://127.0.0.1:" + std::to_string(listen), kHeartbeat);
  RunThroughABlip({.broker = ep, .workers = 200, .log_level = 30}, proxy, listen, PortOf(ep), server, "worker link reset");
}

}  // namespace
}  // namespace gatherer
