// Chaos tests (docs/architecture.md §1): real worker processes SIGKILLed mid-job and
// restarted, a server that kills whichever worker fetches one statement,
// garbage thrown at the broker and at a worker during a job. Each asserts
// what a user checks: every response once, in order, with the right body;
// and prints the figures of the run (kills, statements re-run, recovery).

#include <signal.h>

#include <algorithm>
#include <cstdlib>
#include <future>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/broker.h"
#include "gatherer/gatherer.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/worker.h"
#include "cluster.h"
#include "handlers.h"
#include "http_server.h"
#include "process.h"
#include "raw_peer.h"
#include "socket_monitor.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using namespace testing;


// GATHERER_CHAOS_HEARTBEAT_MS and GATHERER_CHAOS_N override the heartbeat
// period (200 ms) and the statement count of the kill test (20,000), to
// measure recovery at the production default (1000 ms) or at 100k.
std::uint64_t EnvOr(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 10) : fallback;
}
const std::chrono::milliseconds kHeartbeat{EnvOr("GATHERER_CHAOS_HEARTBEAT_MS", 200)};

std::unique_ptr<Broker> StartBroker() { return testing::StartLoopbackBroker(kHeartbeat); }

std::unique_ptr<Process> StartWorker(const std::string& broker, int n) {
  return testing::StartWorkerProcess(broker, kHeartbeat, {"--id", "w" + std::to_string(n)});
}

// Worker n's own loopback address (all of 127.0.0.0/8 is local on Linux), so
// that a test server tells which worker process sent a request.
std::string WorkerSourceAddress(int n) {
  std::string address = "127.0.0.";
  address += std::to_string(10 + n);
  return address;
}

// Worker n, its HTTP connections leaving from WorkerSourceAddress(n).
std::unique_ptr<Process> StartAddressedWorker(const std::string& broker, int n) {
  std::string id = "w";
  id += std::to_string(n);
  return testing::StartWorkerProcess(broker, kHeartbeat, {"--id", id, "--source-address", WorkerSourceAddress(n)});
}

// One line of figures per run, for the closing note of a change.
void Report(const std::string& line) {
  std::cout << "[figures] " << line << std::endl;
  ::testing::Test::RecordProperty("figures", line);
}

// Two workers, 20,000 statements against a server answering after a delay;
// one worker SIGKILLed three times at random moments and restarted at once.
// Every response arrives exactly once, in order, 200, with its body.
TEST(ChaosTest, WorkerKilledThreeTimesLosesNothing) {
#if defined(__SANITIZE_THREAD__)
  // ThreadSanitizer runs this job at a tenth of the speed: 20,000 took up to
  // 85 s of its 120 s budget on a busy machine.
  const std::uint64_t kCount = EnvOr("GATHERER_CHAOS_N", 8000);
#else
  const std::uint64_t kCount = EnvOr("GATHERER_CHAOS_N", 20000);
#endif
  HttpServer server(DelayHandler);
  auto broker = StartBroker();
  const std::string ep = broker->endpoints()[0];
  std::vector<std::unique_ptr<Process>> workers;
  workers.push_back(StartWorker(ep, 0));
  workers.push_back(StartWorker(ep, 1));
  ASSERT_TRUE(WaitFor([&] { return broker->stats().workers.load() == 2; }, 10s));

  std::vector<Statement> list;
  list.reserve(kCount);
  for (std::uint64_t i = 0; i < kCount; ++i) list.push_back(Get(server.url("/d/" + std::to_string(i) + "/20")));
  Gatherer g({.broker = ep, .workers = 256, .log_level = 40});
  std::vector<Clock::time_point> arrived;  // by index, input order
  arrived.reserve(kCount);
  auto run = std::async(std::launch::async, [&] {
    std::uint64_t bad = 0;
    for (auto& item : g.stream(list)) {
      if (item.index != arrived.size() || !item.response.ok() || item.response.status != 200 ||
          item.response.body != "body-" + std::to_string(item.index)) {
        ++bad;
      }
      arrived.push_back(Clock::now());
    }
    return bad;
  });

  std::mt19937 rng(std::random_device{}());
  const unsigned seed = rng();
  rng.seed(seed);
  // Three kills at random moments, in the first three quarters of the job.
  auto between = [&](double from, double to) {
    return std::uniform_int_distribution<std::uint64_t>(static_cast<std::uint64_t>(from * kCount),
                                                        static_cast<std::uint64_t>(to * kCount))(rng);
  };
  std::vector<std::uint64_t> at = {between(0.075, 0.25), between(0.35, 0.525), between(0.625, 0.775)};
  std::vector<Clock::time_point> kills;
  for (std::uint64_t threshold : at) {
    ASSERT_TRUE(WaitFor([&] { return server.requests() >= threshold; }, 60s)) << "seed " << seed;
    ASSERT_EQ(run.wait_for(0ms), std::future_status::timeout) << "finished before kill " << kills.size() + 1;
    const std::size_t victim = std::uniform_int_distribution<std::size_t>(0, 1)(rng);
    kills.push_back(Clock::now());
    workers[victim]->kill(SIGKILL);
    ASSERT_TRUE(workers[victim]->wait(5s).has_value());
    workers[victim] = StartWorker(ep, static_cast<int>(2 + kills.size()));
    // The next kill only once the replacement is registered and the dead
    // one forgotten: two workers again.
    ASSERT_TRUE(WaitFor([&] { return broker->stats().workers.load() == 2; }, 10s));
  }
  ASSERT_EQ(run.wait_for(90s + kCount / 1000 * 1s), std::future_status::ready)
      << "the job did not complete; seed " << seed;
  EXPECT_EQ(run.get(), 0u) << "responses out of order, failed or with a wrong body; seed " << seed;
  ASSERT_EQ(arrived.size(), kCount) << "lost or duplicated responses; seed " << seed;
  for (auto& w : workers) EXPECT_TRUE(w->running());

  // Recovery: responses per 100 ms before the first kill, then the time from
  // each kill until a 100 ms bucket reaches 80% of that rate again.
  auto count_in = [&](Clock::time_point from, Clock::time_point to) {
    return std::count_if(arrived.begin(), arrived.end(), [&](auto t) { return t >= from && t < to; });
  };
  const auto start = arrived.front();
  const double base_rate = static_cast<double>(count_in(start, kills[0])) /
                           std::max(1.0, static_cast<double>((kills[0] - start) / 100ms));
  std::string recovery;
  for (std::size_t k = 0; k < kills.size(); ++k) {
    auto t = kills[k];
    const auto end = k + 1 < kills.size() ? kills[k + 1] : arrived.back();
    while (t + 100ms <= end && static_cast<double>(count_in(t, t + 100ms)) < 0.8 * base_rate) t += 20ms;
    recovery += (recovery.empty() ? "" : ", ") + std::to_string((t - kills[k]) / 1ms) + " ms";
  }
  const auto& s = broker->stats();
  Report("worker SIGKILLed 3x: " + std::to_string(kCount) + " statements, lost 0, duplicated 0; server requests " +
         std::to_string(server.requests()) + " (re-run " + std::to_string(server.requests() - kCount) +
         "); quarantined " + std::to_string(s.quarantined.load()) + ", late duplicates dropped " +
         std::to_string(s.duplicates_dropped.load()) + "; full speed again after " + recovery + " (heartbeat " +
         std::to_string(kHeartbeat.count()) + " ms x 3); base " + std::to_string(static_cast<int>(base_rate * 10)) +
         " responses/s; seed " + std::to_string(seed));
  EXPECT_EQ(s.poisoned.load(), 0u);
  EXPECT_EQ(s.outcome_unknown.load(), 0u);
}

// A server that SIGKILLs whichever worker fetches "/poison": that statement
// fails as poison after 3 deaths with it alone; every other one succeeds.
TEST(ChaosTest, PoisonStatementFailsAndTheRestSucceeds) {
  constexpr std::uint64_t kCount = 2000, kPoison = 777;
  std::mutex mu;
  // The live workers' pids by source address, for the server's thread.
  std::map<std::string, int> pid_by_address;
  std::atomic<int> kills{0};
  HttpServer server([&](const testing::HttpRequest& req) {
    if (req.target != "/poison") return DelayHandler(req);
    std::lock_guard lock(mu);
    if (auto it = pid_by_address.find(req.peer_address); it != pid_by_address.end()) {
      ::kill(it->second, SIGKILL);
      kills.fetch_add(1);
    }
    testing::HttpReply drop;
    drop.drop = true;
    return drop;
  });
  auto broker = StartBroker();
  const std::string ep = broker->endpoints()[0];
  std::vector<std::unique_ptr<Process>> workers;
  std::vector<std::string> addresses;  // of workers[i]
  int started = 0;
  auto supervise = [&] {
    std::lock_guard lock(mu);
    for (std::size_t i = 0; i < workers.size(); ++i) {
      if (workers[i] && workers[i]->running()) continue;
      pid_by_address.erase(addresses[i]);
      addresses[i] = WorkerSourceAddress(started);
      workers[i] = StartAddressedWorker(ep, started++);
      pid_by_address[addresses[i]] = workers[i]->pid();
    }
  };
  workers.resize(2);
  addresses.resize(2);
  supervise();

  std::vector<Statement> list;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    list.push_back(Get(i == kPoison ? server.url("/poison") : server.url("/d/" + std::to_string(i) + "/5")));
  }
  Gatherer g({.broker = ep, .workers = 32, .log_level = 50});
  g.statements = list;
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  // Dead workers are replaced at once, as a process supervisor would.
  const auto deadline = Clock::now() + 90s;
  while (run.wait_for(20ms) != std::future_status::ready && Clock::now() < deadline) supervise();
  ASSERT_EQ(run.wait_for(0ms), std::future_status::ready) << "the job did not complete";
  const auto& responses = run.get();
  ASSERT_EQ(responses.size(), kCount);
  for (std::uint64_t i = 0; i < kCount; ++i) {
    if (i == kPoison) continue;
    ASSERT_TRUE(responses[i].ok()) << i << ": " << responses[i].error->message;
    ASSERT_EQ(responses[i].body, "body-" + std::to_string(i));
  }
  const Response& poison = responses[kPoison];
  ASSERT_TRUE(poison.error.has_value());
  EXPECT_EQ(poison.error->code, StatusCode::kAborted);
  EXPECT_NE(poison.error->message.find("poison"), std::string::npos) << poison.error->message;
  EXPECT_EQ(broker->stats().poisoned.load(), 1u);
  // One death among many, halvings of the window (32), three alone.
  EXPECT_LE(kills.load(), 1 + 6 + 3);
  Report("poison statement: failed as aborted after " + std::to_string(kills.load()) + " worker deaths; " +
         std::to_string(kCount - 1) + " others succeeded; quarantined " +
         std::to_string(broker->stats().quarantined.load()));
}

// Messages a hostile or broken peer might send: each must be dropped and
// counted, never crash anything or disturb a session.
std::vector<proto::Frames> Garbage(std::mt19937& rng, const SessionId& session) {
  std::vector<proto::Frames> out;
  auto bytes = [&](std::size_t n) {
    std::string s(n, '\0');
    for (auto& c : s) c = static_cast<char>(rng());
    return s;
  };
  auto frames = [](std::initializer_list<std::string> parts) {
    proto::Frames f;
    for (const auto& p : parts) f.emplace_back(p.data(), p.size());
    return f;
  };
  const std::string sig(reinterpret_cast<const char*>(proto::kSignature.data()), 4);
  const std::string wrong_version("GTR\x09", 4);
  // Random frames; random header behind a right signature; wrong version;
  // unknown command; a truncated SUBMIT of the job's own session.
  out.push_back(frames({bytes(1 + rng() % 64)}));
  out.push_back(frames({bytes(4), bytes(1), bytes(1 + rng() % 128)}));
  out.push_back(frames({sig, std::string(1, '\x11'), bytes(1 + rng() % 128)}));
  out.push_back(frames({wrong_version, std::string(1, '\x14'), std::string(1, '\x90')}));
  out.push_back(frames({sig, std::string(1, '\x7e'), std::string(1, '\x90')}));
  proto::Frames submit = proto::EncodeSubmit(session, 0, std::vector<Statement>{Get("http://127.0.0.1:1/x")});
  std::string header = submit[2].to_string();
  header.resize(header.size() / 2);
  out.push_back(frames({sig, std::string(1, '\x11'), header}));
  return out;
}

// Garbage from raw sockets at the broker during a job (plus one message over
// ZMQ_MAXMSGSIZE): the job completes, the broker counts the drops.
TEST(ChaosTest, GarbageAtTheBrokerDuringAJobIsDropped) {
  constexpr std::uint64_t kCount = 5000;
  HttpServer server(DelayHandler);
  auto broker = StartBroker();
  const std::string ep = broker->endpoints()[0];
  auto worker = StartWorker(ep, 0);
  std::vector<Statement> list;
  for (std::uint64_t i = 0; i < kCount; ++i) list.push_back(Get(server.url("/d/" + std::to_string(i) + "/10")));
  Gatherer g({.broker = ep, .workers = 64, .log_level = 50});
  g.statements = list;
  auto run = std::async(std::launch::async, [&] { return g.gather(); });

  zmq::context_t ctx(1);
  std::mt19937 rng(std::random_device{}());
  const SessionId session = ParseSessionId(g.session_id()).value();
  std::uint64_t sent = 0, rounds = 0, oversize = 0;
  // One garbage peer for the whole job (closing waits until its messages
  // are out). A socket per round would also work, but under ThreadSanitizer
  // libzmq's uninstrumented connect hand-off to its I/O thread then shows
  // as a race inside libzmq.
  zmq::socket_t garbage(ctx, zmq::socket_type::dealer);
  garbage.set(zmq::sockopt::linger, 5000);
  garbage.connect(ep);
  while (run.wait_for(0ms) != std::future_status::ready && rounds < 200) {
    for (auto& f : Garbage(rng, session)) {
      // The transport's send tells ThreadSanitizer about the hand-off to
      // ZeroMQ's I/O thread (libzmq is not instrumented).
      proto::SendMessage(garbage, {}, f, /*block=*/true);
      ++sent;
    }
    if (rounds == 10) {
      // Over ZMQ_MAXMSGSIZE: ZeroMQ drops the connection after the size
      // header, before the broker allocates anything. Connected first (a
      // probe answered), then watched, as the spec tests do.
      zmq::socket_t raw(ctx, zmq::socket_type::dealer);
      raw.set(zmq::sockopt::linger, 0);
      raw.connect(ep);
      proto::Frames probe = proto::EncodeHeartbeat(NewSessionId());
      proto::SendMessage(raw, {}, probe, /*block=*/true);
      zmq::pollitem_t item{raw.handle(), 0, ZMQ_POLLIN, 0};
      ASSERT_EQ(zmq::poll(&item, 1, 10s), 1) << "no answer to the probe";
      proto::Frames answer;
      ASSERT_TRUE(proto::ReceiveMessage(raw, answer));
      testing::SocketMonitor monitor(ctx, raw, ZMQ_EVENT_DISCONNECTED);
      raw.send(testing::ZeroPagesMessage(static_cast<std::size_t>(proto::kMaxMessageBytes) + 1),
               zmq::send_flags::none);
      // The broker closes the connection: the sender sees it go.
      ASSERT_TRUE(monitor.wait_for(ZMQ_EVENT_DISCONNECTED, 20s))
          << "the broker did not drop the oversize message's connection";
      ++oversize;
    }
    ++rounds;
  }
  ASSERT_EQ(run.wait_for(60s), std::future_status::ready);
  const auto& responses = run.get();
  ASSERT_EQ(responses.size(), kCount);
  for (std::uint64_t i = 0; i < kCount; ++i) ASSERT_EQ(responses[i].body, "body-" + std::to_string(i)) << i;
  EXPECT_TRUE(worker->running());
  // Each message above is malformed for a broker (the wrong version one
  // also gets an ERROR back); counted once each.
  ASSERT_TRUE(WaitFor([&] { return broker->stats().malformed.load() >= sent; }, 5s))
      << broker->stats().malformed.load() << " of " << sent;
  EXPECT_EQ(broker->stats().malformed.load(), sent);
  EXPECT_EQ(oversize, 1u);
  Report("garbage at the broker: " + std::to_string(sent) + " bad messages + 1 oversize during a " +
         std::to_string(kCount) + "-statement job: all dropped (" + std::to_string(broker->stats().malformed.load()) +
         " counted), job complete");
}

// A real Worker taking a job from a fake broker (raw ROUTER) that mixes
// garbage between its DISPATCHes: every statement is answered once, the
// worker counts every bad message.
TEST(ChaosTest, GarbageAtAWorkerDuringAJobIsDropped) {
  constexpr std::uint64_t kCount = 2000;
  HttpServer server(DelayHandler);
  zmq::context_t ctx(1);
  zmq::socket_t router(ctx, zmq::socket_type::router);
  testing::ConfigureFakeBroker(router);
  router.bind("tcp://127.0.0.1:*");
  WorkerOptions wo;
  wo.broker = router.get(zmq::sockopt::last_endpoint);
  wo.io_threads = 1;
  wo.heartbeat_interval = 10s;  // no re-registration in this test
  Worker worker(wo);
  ASSERT_TRUE(worker.start().ok());
  // This fake broker speaks GTR/2 as the real one does: it answers READY
  // with HEARTBEAT [0], numbers its orders from 1 and acknowledges RESULTS.
  auto ready = testing::RecvRouted(router, 10s);
  ASSERT_TRUE(ready.has_value());
  ASSERT_EQ(ready->command, proto::Command::kReady);
  const std::string id = ready->peer;
  auto send = [&](proto::Frames&& f) {
    proto::SendMessage(router, id, f, /*block=*/true);
  };
  send(proto::Encode(proto::BrokerBeat{std::nullopt, 0, 0}));
  std::uint64_t order = 0;
  const SessionId session = NewSessionId();
  send(proto::Encode(proto::Session{session, SessionSettings{}, ++order}));
  std::mt19937 rng(std::random_device{}());
  std::uint64_t bad = 0;
  for (std::uint64_t first = 0; first < kCount; first += 100) {
    for (auto& f : Garbage(rng, session)) {
      send(std::move(f));
      ++bad;
    }
    proto::Statements chunk{session, {}, ++order};
    for (std::uint64_t i = first; i < first + 100; ++i) {
      chunk.statements.push_back({i, Get(server.url("/d/" + std::to_string(i) + "/1"))});
    }
    send(proto::Encode(proto::Command::kDispatch, chunk));
  }
  std::vector<int> seen(kCount, 0);
  std::uint64_t results = 0;
  std::uint64_t acked = 0;  // RESULTS seqs arrive one after the other from 1 (§3.7.1)
  const auto deadline = Clock::now() + 60s;
  while (results < kCount && Clock::now() < deadline) {
    auto m = testing::RecvRouted(router, 100ms);
    if (!m || m->command != proto::Command::kResults) continue;
    auto r = proto::DecodeResults(m->frames);
    ASSERT_TRUE(r.has_value());
    ASSERT_EQ(r->seq, acked + 1) << "RESULTS out of sequence";
    acked = r->seq;
    send(proto::Encode(proto::Ack{std::nullopt, acked}));
    for (const auto& one : r->results) {
      ASSERT_LT(one.index, kCount);
      ++seen[one.index];
      ++results;
      EXPECT_EQ(one.response.body, "body-" + std::to_string(one.index));
    }
  }
  ASSERT_EQ(results, kCount);
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  EXPECT_EQ(worker.stats().malformed.load(), bad);
  Report("garbage at a worker: " + std::to_string(bad) + " bad messages between DISPATCHes of " +
         std::to_string(kCount) + " statements: all counted and dropped, every statement answered once");
}

}  // namespace
}  // namespace gatherer
