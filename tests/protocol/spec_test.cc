// Worker-side clauses of common/PROTOCOL.md (GTR/2), each test named after
// its clause with the clause quoted above it. A raw ROUTER plays the broker;
// the worker is the real gatherer::Worker fetching from a real HTTP server.
// Each test runs over tcp and ipc (broker-side clauses: broker/src/broker_test.cc
// and tests/protocol/broker_spec_test.cc).
//
// The fake broker speaks GTR/2 as the real one does where a test does not
// say otherwise: it answers READY with HEARTBEAT [0] (§3.4.1), numbers the
// orders it sends (SESSION, DISPATCH, END_SESSION) from 1 after it
// (§3.7.3), and acknowledges the worker's RESULTS (§3.7.2).

#include <algorithm>
#include <filesystem>
#include <iterator>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/worker.h"
#include "frames.h"  // PrintTo(Command): gtest prints commands by name
#include "handlers.h"
#include "http_server.h"
#include "raw_peer.h"
#include "socket_monitor.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// The heartbeat period of the worker under test. This fake broker answers
// heartbeats only where a test says so, so a worker re-registers after 3
// silent periods (3.4.3) and drops its sessions (3.4.5). Only the tests of
// silence get a short period; the others get one longer than any of them
// runs, even under sanitizers.
std::chrono::milliseconds PeriodFor(const std::string& test) {
  auto is = [&](const char* prefix) { return test.find(prefix) != std::string::npos; };
  if (is("Clause_3_4_3_UnacknowledgedResultsGoAgainBeforeReady")) return 300ms;
  if (is("Clause_3_4_3") || is("Clause_3_4_5") || is("Clause_1_5")) return 100ms;
  // Back within 3 s of a dropped connection, and not before the test has
  // dropped it.
  if (is("Clause_1_3_WorkerReconnects")) return 1s;
  // RESULTS are sent again ten periods after they were sent (3.7.1).
  if (is("Clause_3_7_1")) return 100ms;
  return 10s;
}

// A fast and a slow page: "/slow..." answers after 10 s (a statement kept
// in hand), anything else at once with "ok:<target>".
testing::HttpReply FastOrSlow(const testing::HttpRequest& req) {
  testing::HttpReply r;
  r.body = "ok:" + req.target;
  if (req.target.rfind("/slow", 0) == 0) r.delay = 10s;
  return r;
}

class WorkerSpec : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    testing::ConfigureFakeBroker(router_);
    if (GetParam() == "ipc") {
      dir_ = std::filesystem::temp_directory_path() / ("gtr-spec-" + NewSessionId().ToString().substr(0, 8));
      std::filesystem::create_directories(dir_);
      router_.bind("ipc://" + (dir_ / "b.sock").string());
    } else {
      router_.bind("tcp://127.0.0.1:*");
    }
    options_.broker = router_.get(zmq::sockopt::last_endpoint);
    options_.context = &ctx_;
    options_.io_threads = 1;
    options_.slots = 64;
    options_.heartbeat_interval = PeriodFor(::testing::UnitTest::GetInstance()->current_test_info()->name());
    options_.worker_id = "spec-worker";
    worker_ = std::make_unique<Worker>(options_);
    ASSERT_TRUE(worker_->start().ok());
  }
  void TearDown() override {
    for (auto& w : more_workers_) w.reset();
    worker_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  // Next message from the worker within `timeout`, HEARTBEAT included; sets
  // peer_. Answers a HEARTBEAT with the last order's seq when answer_beats_
  // is set, as a broker that knows the worker (§3.7.3).
  std::optional<testing::Routed> recv_any(std::chrono::milliseconds timeout) {
    auto m = testing::RecvRouted(router_, timeout);
    if (!m) return m;
    peer_ = m->peer;
    if (m->command == proto::Command::kHeartbeat && answer_beats_) beat();
    return m;
  }
  // Next message from the worker other than HEARTBEAT; sets peer_.
  proto::Frames recv(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      auto m = recv_any(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      if (!m || m->command == proto::Command::kHeartbeat) continue;
      return std::move(m->frames);
    }
    return {};
  }
  // Next RESULTS, acknowledged (§3.7.2) unless ack_results_ is false. READY
  // may come in between: this fake broker sends no heartbeats, so a slow
  // run (sanitizers) lets the worker re-register (clause 3.4.3), which is
  // not what these tests look at.
  proto::Frames recv_results(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left <= 0ms) return {};
      auto f = recv(left);
      if (f.empty()) return f;
      if (command(f) == proto::Command::kReady) {
        register_worker();
        continue;
      }
      if (command(f) == proto::Command::kResults && ack_results_) {
        if (auto r = proto::DecodeResultsIndex(f)) send(proto::Encode(proto::Ack{std::nullopt, r->seq}));
      }
      return f;
    }
  }
  proto::Command command(const proto::Frames& f) {
    auto c = proto::PeekCommand(f);
    return c ? *c : proto::Command::kHeartbeat;
  }
  void send(proto::Frames&& frames) {
    // The transport's send tells ThreadSanitizer about the hand-off to
    // ZeroMQ's I/O thread (libzmq is not instrumented).
    proto::SendMessage(router_, peer_, frames, /*block=*/true);
  }
  // The broker's answer to READY (§3.4.1): HEARTBEAT [0]; orders are
  // numbered from 1 after it.
  void register_worker() {
    order_seq_ = 0;
    send(proto::Encode(proto::BrokerBeat{std::nullopt, 0, 0}));
  }
  // HEARTBEAT [seq of the last order sent] (§3.7.3).
  void beat() { send(proto::Encode(proto::BrokerBeat{std::nullopt, order_seq_, 0})); }
  // Receives READY and answers it: the worker is registered.
  proto::Ready expect_ready() {
    auto f = recv();
    EXPECT_EQ(command(f), proto::Command::kReady);
    auto r = proto::DecodeReady(f);
    EXPECT_TRUE(r.has_value());
    register_worker();
    return r ? *r : proto::Ready{};
  }
  // Orders, numbered (§3.7.3).
  void send_session(const SessionId& sid, SessionSettings settings = {}) {
    send(proto::Encode(proto::Session{sid, std::move(settings), ++order_seq_}));
  }
  void send_dispatch(proto::Statements m) {
    m.seq = ++order_seq_;
    send(proto::Encode(proto::Command::kDispatch, m));
  }
  void send_end_session(const SessionId& sid) { send(proto::Encode(proto::EndSession{sid, ++order_seq_})); }
  proto::Statements chunk(const SessionId& sid, const std::vector<std::string>& urls, std::uint64_t first = 0) {
    proto::Statements m{sid, {}};
    for (std::size_t i = 0; i < urls.size(); ++i) m.statements.push_back({first + i, Get(urls[i])});
    return m;
  }

  zmq::context_t ctx_{1};
  zmq::socket_t router_{ctx_, zmq::socket_type::router};
  WorkerOptions options_;
  std::unique_ptr<Worker> worker_;
  std::vector<std::unique_ptr<Worker>> more_workers_;
  std::string peer_;
  std::filesystem::path dir_;
  std::uint64_t order_seq_ = 0;  // the last order sent
  bool answer_beats_ = false;
  bool ack_results_ = true;
};

// 1.1 "Clients and workers SHALL connect a DEALER socket."
TEST_P(WorkerSpec, Clause_1_1_WorkerConnectsADealer) {
  auto f = recv();
  ASSERT_EQ(command(f), proto::Command::kReady);
  EXPECT_STREQ(f[0].gets("Socket-Type"), "DEALER");
}

// 1.3 "Every peer SHALL set ZMQ_MAXMSGSIZE to at most 256 MiB (§5). ZeroMQ
// then closes the connection of a peer that sends a larger message."
TEST_P(WorkerSpec, Clause_1_3_FrameOver256MiBClosesTheConnection) {
  expect_ready();
  testing::SocketMonitor monitor(ctx_, router_, ZMQ_EVENT_DISCONNECTED);
  proto::Frames big = proto::Encode(proto::Session{NewSessionId(), SessionSettings{}});
  big.push_back(testing::ZeroPagesMessage((std::size_t{256} << 20) + 1));
  send(std::move(big));
  EXPECT_TRUE(monitor.wait_for(ZMQ_EVENT_DISCONNECTED, 10s)) << "the worker took a frame over 256 MiB";
}

// 3.4.1 "A worker SHALL send READY when it connects."
TEST_P(WorkerSpec, Clause_3_4_1_ReadyOnConnect) {
  proto::Ready r = expect_ready();
  EXPECT_EQ(r.worker_id, "spec-worker");
  EXPECT_EQ(r.slots, 64u);
}

// 3.4.2 "(...) frame 2 is `[session, seq]`, frame 3 the list `[result, …]`,
// and frame 4 + i SHALL hold the response body of result i, byte for byte."
// 3.5.2 "A worker SHALL return exactly one result per
// dispatched statement."
TEST_P(WorkerSpec, Clause_3_4_2_ResultsCarryBodiesInFrames) {
  testing::HttpServer server;
  expect_ready();
  const SessionId sid = NewSessionId();
  send_session(sid);
  std::vector<std::string> urls;
  for (int i = 0; i < 20; ++i) urls.push_back(server.url("/p/" + std::to_string(i)));
  send_dispatch(chunk(sid, urls));
  std::map<std::uint64_t, std::string> bodies;
  while (bodies.size() < 20) {
    auto f = recv_results();
    ASSERT_EQ(command(f), proto::Command::kResults);
    ASSERT_TRUE(proto::DecodeResultsIndex(f).has_value());
    auto m = proto::DecodeResults(f);
    ASSERT_TRUE(m.has_value());
    EXPECT_EQ(m->session, sid);
    ASSERT_EQ(f.size(), 4 + m->results.size());
    for (std::size_t i = 0; i < m->results.size(); ++i) {
      EXPECT_EQ(f[4 + i].to_string(), m->results[i].response.body);
      EXPECT_TRUE(bodies.emplace(m->results[i].index, m->results[i].response.body).second) << "duplicate result";
    }
  }
  for (std::uint64_t i = 0; i < 20; ++i) EXPECT_EQ(bodies[i], "ok:/p/" + std::to_string(i));
}

// 3.4.3 "A worker that has heard nothing from the broker for `liveness`
// periods SHALL send READY again."
TEST_P(WorkerSpec, Clause_3_4_3_ReadyAgainAfterBrokerSilence) {
  expect_ready();
  // Stay silent: within 3 periods of 100 ms plus slack a second READY comes.
  auto f = recv(2000ms);
  EXPECT_EQ(command(f), proto::Command::kReady);
  EXPECT_GE(worker_->stats().registrations.load(), 2u);
}

// 3.4.3 "While the broker stays silent, the worker SHALL wait twice as long
// before each further new socket, up to 4 x liveness periods." Silent for
// 3 s at 3 periods of 100 ms: new sockets after 0.3, 0.9, 2.1 and 3.3 s (three
// READYs after the first), not one every 0.3 s (ten).
TEST_P(WorkerSpec, Clause_3_4_3_ReconnectsLessOftenWhileTheBrokerStaysSilent) {
  expect_ready();
  const auto until = std::chrono::steady_clock::now() + 3s;
  int readies = 0;
  while (std::chrono::steady_clock::now() < until) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now());
    auto f = recv(std::max(left, 1ms));
    if (!f.empty() && command(f) == proto::Command::kReady) ++readies;
  }
  EXPECT_GE(readies, 2) << "the worker stopped reconnecting";
  EXPECT_LE(readies, 4) << "a new socket every liveness periods of a silent broker";
}

// 3.4.3 "A worker SHALL send HEARTBEAT once per heartbeat period."
// This fake broker answers each one, as a live broker keeps a worker
// registered; the period here is 100 ms.
TEST_P(WorkerSpec, Clause_3_4_3_HeartbeatOncePerPeriod) {
  expect_ready();
  int beats = 0;
  const auto start = std::chrono::steady_clock::now();
  const auto until = start + 1000ms;
  while (std::chrono::steady_clock::now() < until) {
    zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()));
    std::vector<zmq::message_t> frames;
    if (!zmq::recv_multipart(router_, std::back_inserter(frames), zmq::recv_flags::dontwait)) continue;
    proto::Frames body(std::make_move_iterator(frames.begin() + 1), std::make_move_iterator(frames.end()));
    if (command(body) != proto::Command::kHeartbeat) continue;
    ++beats;
    beat();
  }
  // 10 periods: never more than one HEARTBEAT per period (plus the one a
  // late first poll may carry over), and not a silent stretch of them.
  EXPECT_LE(beats, 11);
  EXPECT_GE(beats, 4) << "HEARTBEATs missing";
}

// 1.3 "...a worker that hears nothing from its broker for `liveness` periods
// SHALL connect a new socket before it sends READY again." A frame over
// ZMQ_MAXMSGSIZE makes ZeroMQ close the worker's connection for good; the
// worker comes back on a new connection (accepted anew by the ROUTER, under
// the same routing id: §1.5).
TEST_P(WorkerSpec, Clause_1_3_WorkerReconnectsAfterAnOversizeFrame) {
  expect_ready();
  beat();  // heard: the worker's silence clock restarts
  testing::SocketMonitor accepted(ctx_, router_, ZMQ_EVENT_ACCEPTED);
  // Zero pages: no 256 MiB memset, which takes seconds under sanitizers.
  router_.send(zmq::buffer(peer_), zmq::send_flags::sndmore);
  router_.send(testing::ZeroPagesMessage(static_cast<std::size_t>(proto::kMaxMessageBytes) + 1),
               zmq::send_flags::none);
  const std::string before = peer_;
  for (;;) {
    auto f = recv(8000ms);
    ASSERT_FALSE(f.empty()) << "the worker did not come back after its connection was dropped";
    if (command(f) == proto::Command::kReady) break;
  }
  EXPECT_TRUE(accepted.wait_for(ZMQ_EVENT_ACCEPTED, 1s)) << "READY again, but not on a new connection";
  EXPECT_EQ(peer_, before) << "the new socket has another routing id (§1.5)";
  EXPECT_GE(worker_->stats().registrations.load(), 2u);
}

// 3.4.4 "...the worker SHALL then send READY again."
TEST_P(WorkerSpec, Clause_3_4_4_ReadyAgainOnNotFound) {
  expect_ready();
  send(proto::Encode(proto::ErrorReply{StatusCode::kNotFound, "unknown worker; send READY", std::nullopt}));
  auto f = recv(1000ms);
  EXPECT_EQ(command(f), proto::Command::kReady);
}

// 3.4.5 "A worker that sends READY again SHALL first drop every session it
// holds, as on END_SESSION."
TEST_P(WorkerSpec, Clause_3_4_5_ReRegistrationDropsHeldSessions) {
  testing::HttpServer server(testing::SlowHandler);
  expect_ready();
  const SessionId sid = NewSessionId();
  send_session(sid);
  send_dispatch(chunk(sid, std::vector<std::string>(4, server.url("/slow"))));
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 4; }, 5s));
  // This fake broker stays silent, so the worker registers again (3.4.3).
  auto f = recv(2000ms);
  ASSERT_EQ(command(f), proto::Command::kReady);
  EXPECT_TRUE(testing::WaitFor([&] { return worker_->sessions() == 0; }, 2s));
  EXPECT_TRUE(recv_results(300ms).empty()) << "results of a dropped session";
}

// 3.5.3 "On END_SESSION a worker SHALL abort the session's queued and
// in-flight transfers without results and drop its shared session."
TEST_P(WorkerSpec, Clause_3_5_3_EndSessionAbortsWithoutResults) {
  testing::HttpServer server(testing::SlowHandler);
  expect_ready();
  const SessionId sid = NewSessionId();
  send_session(sid);
  std::vector<std::string> urls(10, server.url("/slow"));
  send_dispatch(chunk(sid, urls));
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 10; }, 5s));
  EXPECT_EQ(worker_->sessions(), 1u);
  send_end_session(sid);
  EXPECT_TRUE(testing::WaitFor([&] { return worker_->sessions() == 0; }, 2s));
  auto f = recv_results(500ms);
  EXPECT_TRUE(f.empty()) << "results after END_SESSION";
}

// 3.5.1 "In a SESSION the settings' `workers` is that worker's share of the
// session's window (...): a worker SHALL keep at most that many connections
// of the session to any one destination."
// 3.5.4 "A worker that already holds the session SHALL keep it (transfers,
// caches and connections) and apply the new share alone: connections past a
// smaller share are not cut, but none opens past it."
TEST_P(WorkerSpec, Clause_3_5_4_ASessionSentAgainChangesOnlyTheShare) {
  testing::HttpServer server(testing::DelayHandler);
  expect_ready();
  const SessionId sid = NewSessionId();
  SessionSettings one;
  one.workers = 1;
  send_session(sid, one);
  auto urls = [&](std::uint64_t first) {
    std::vector<std::string> out;
    for (std::uint64_t i = first; i < first + 3; ++i) out.push_back(server.url("/d/" + std::to_string(i) + "/300"));
    return out;
  };
  send_dispatch(chunk(sid, urls(0)));
  // A share of 1: one connection, the three statements one after the other.
  ASSERT_TRUE(testing::WaitFor([&] { return server.requests() >= 2; }, 5s));
  EXPECT_EQ(server.max_in_flight(), 1);
  SessionSettings four = one;
  four.workers = 4;
  four.base_url = "http://elsewhere.invalid/";  // ignored: only the share changes
  send_session(sid, four);
  send_dispatch(chunk(sid, urls(3), 3));
  EXPECT_TRUE(testing::WaitFor([&] { return server.in_flight() >= 3; }, 5s))
      << "the larger share was not applied: " << server.in_flight() << " in flight";
  std::set<std::uint64_t> answered;
  while (answered.size() < 6) {
    const auto f = recv_results(5s);
    if (f.empty()) break;
    if (command(f) != proto::Command::kResults) continue;
    const auto results = proto::DecodeResults(f);
    ASSERT_TRUE(results.has_value());
    for (const auto& r : results->results) {
      EXPECT_EQ(r.response.body, "body-" + std::to_string(r.index)) << "the session was not kept as it was";
      answered.insert(r.index);
    }
  }
  EXPECT_EQ(answered.size(), 6u) << "statements of the session were dropped when it was sent again";
  EXPECT_LE(server.max_in_flight(), 4);
  EXPECT_EQ(worker_->sessions(), 1u);
}

// 2.4 "A malformed message SHALL be dropped, counted and logged ... It MUST
// NOT crash the receiver."
TEST_P(WorkerSpec, Clause_2_4_MalformedMessagesAreDroppedAndCounted) {
  testing::HttpServer server;
  expect_ready();
  proto::Frames garbage;
  garbage.emplace_back("\x01\x02", 2);
  send(std::move(garbage));
  proto::Frames truncated = proto::Encode(proto::Session{NewSessionId(), SessionSettings{}});
  truncated[2] = zmq::message_t(truncated[2].data(), truncated[2].size() / 2);
  send(std::move(truncated));
  proto::Frames wrong_command = proto::Encode(proto::Command::kOpened, proto::SessionRef{NewSessionId()});
  send(std::move(wrong_command));
  ASSERT_TRUE(testing::WaitFor([&] { return worker_->stats().malformed.load() == 3; }, 2s));
  // Still serving.
  const SessionId sid = NewSessionId();
  send_session(sid);
  send_dispatch(chunk(sid, {server.url("/after")}));
  auto f = recv_results();
  ASSERT_EQ(command(f), proto::Command::kResults);
  EXPECT_EQ(proto::DecodeResults(f)->results.at(0).response.body, "ok:/after");
}

// 2.4 "A receiver SHALL treat as malformed: (...) a header that is not
// exactly one msgpack value (trailing bytes count); a header of the wrong
// type (...); more frames than the command allows. A malformed message SHALL
// be dropped, counted (...)." Also the broker's HEARTBEAT [seq].
TEST_P(WorkerSpec, Clause_2_4_MalformedHeartbeatIsCounted) {
  expect_ready();
  proto::Frames trailing = proto::Encode(proto::BrokerBeat{std::nullopt, 0, 0});
  std::string header(static_cast<const char*>(trailing[2].data()), trailing[2].size());
  header.push_back('\xc0');  // a second msgpack value
  trailing[2] = zmq::message_t(header.data(), header.size());
  send(std::move(trailing));
  proto::Frames extra = proto::Encode(proto::BrokerBeat{std::nullopt, 0, 0});
  extra.emplace_back("extra", 5);
  send(std::move(extra));
  EXPECT_TRUE(testing::WaitFor([&] { return worker_->stats().malformed.load() == 2; }, 2s))
      << worker_->stats().malformed.load() << " of 2 malformed HEARTBEATs counted";
}

// ---- GTR/2 -----------------------------------------------------------------

// The HOLDING of a message, as session -> indices (sorted); fails the test
// if a session is listed twice.
std::map<SessionId, std::vector<std::uint64_t>> Held(const proto::Holding& h) {
  std::map<SessionId, std::vector<std::uint64_t>> out;
  for (const auto& [session, indices] : h.sessions) {
    std::vector<std::uint64_t> sorted = indices;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_TRUE(out.emplace(session, sorted).second) << "a session listed twice in HOLDING";
  }
  return out;
}

// 1.5 "(...) a worker SHALL set it [ZMQ_ROUTING_ID] to the byte `w` followed
// by 16 random bytes drawn once per worker process, and keep it on every
// socket it connects (§3.4.3). (...) a worker's human-readable `worker_id`
// (READY) is not part of its routing id, so two workers given the same
// `--id` still have routes of their own."
// 3.4.3 "A worker that has heard nothing from the broker for `liveness`
// periods (default 3) SHALL connect a new socket (under the same routing id,
// §1.5) (...)"
TEST_P(WorkerSpec, Clause_1_5_RoutingIdIsWAnd16BytesKeptOnANewSocket) {
  expect_ready();
  const std::string id = peer_;
  ASSERT_EQ(id.size(), 17u);
  EXPECT_EQ(id[0], 'w');
  testing::SocketMonitor accepted(ctx_, router_, ZMQ_EVENT_ACCEPTED);
  // Silent for 3 periods of 100 ms: a new socket, READY again.
  auto f = recv(3000ms);
  ASSERT_EQ(command(f), proto::Command::kReady);
  EXPECT_TRUE(accepted.wait_for(ZMQ_EVENT_ACCEPTED, 1s)) << "READY again, but not on a new connection";
  EXPECT_EQ(peer_, id) << "the new socket has another routing id";
  // A second worker with the same worker_id has a routing id of its own.
  more_workers_.push_back(std::make_unique<Worker>(options_));
  ASSERT_TRUE(more_workers_.back()->start().ok());
  std::string other;
  const auto deadline = Clock::now() + 3s;
  while (other.empty() && Clock::now() < deadline) {
    auto m = recv_any(100ms);
    if (m && m->command == proto::Command::kReady && m->peer != id) other = m->peer;
  }
  ASSERT_FALSE(other.empty()) << "no READY from the second worker";
  EXPECT_EQ(other.size(), 17u);
  EXPECT_EQ(other[0], 'w');
}

// 1.6 "A client or worker SHALL watch its socket's connections
// (`zmq_socket_monitor`, `ZMQ_EVENT_HANDSHAKE_SUCCEEDED`) and resynchronise
// (§3.6, §3.7) as soon as a connection after the first one completes its
// handshake (...)."
// 3.7.4 "A worker SHALL resynchronise when (a) its connection has been made
// again (§1.6) (...). It SHALL first send again every RESULTS not
// acknowledged, then HOLDING (...)."
TEST_P(WorkerSpec, Clause_1_6_WorkerResynchronisesWhenItsConnectionIsMadeAgain) {
  testing::HttpServer server(FastOrSlow);
  ack_results_ = false;
  expect_ready();
  const std::string id = peer_;
  const SessionId a = NewSessionId();
  send_session(a);                                                   // 1
  send_dispatch(chunk(a, {server.url("/fast/0"), server.url("/slow/1")}));  // 2
  auto first = proto::DecodeResults(recv_results());
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->seq, 1u);
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 1; }, 5s));
  // The broker's ROUTER goes and comes back: ZeroMQ connects the worker's
  // socket again (no liveness timeout: the period is 10 s).
  ASSERT_TRUE(testing::ReplaceRouter(ctx_, router_, options_.broker));
  auto f = recv(5000ms);
  ASSERT_EQ(command(f), proto::Command::kResults) << "the unacknowledged RESULTS does not come first";
  EXPECT_EQ(peer_, id);
  auto again = proto::DecodeResults(f);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->seq, 1u);
  f = recv();
  ASSERT_EQ(command(f), proto::Command::kHolding);
  auto holding = proto::DecodeHolding(f);
  ASSERT_TRUE(holding.has_value());
  EXPECT_EQ(holding->seq, 2u);
  EXPECT_EQ(Held(*holding), (std::map<SessionId, std::vector<std::uint64_t>>{{a, {1}}}));
  EXPECT_EQ(worker_->stats().registrations.load(), 1u) << "a reconnect is not a reason to register again";
}

// 3.4.1 "(...) The broker SHALL answer READY with HEARTBEAT `[0]`; until that
// answer arrives a worker SHALL ignore ERROR `not_found` (it answers a
// message sent before READY) and SESSION, DISPATCH and END_SESSION (sent
// before the broker took the READY; §3.4.5 returns their leases)."
TEST_P(WorkerSpec, Clause_3_4_1_BeforeTheAnswerToReadyNotFoundAndOrdersAreIgnored) {
  testing::HttpServer server;
  ASSERT_EQ(command(recv()), proto::Command::kReady);  // not answered yet
  const SessionId stale = NewSessionId();
  send(proto::Encode(proto::ErrorReply{StatusCode::kNotFound, "unknown worker; send READY", std::nullopt}));
  send(proto::Encode(proto::Session{stale, SessionSettings{}, 1}));
  send(proto::Encode(proto::Command::kDispatch, proto::Statements{stale, {{0, Get(server.url("/stale"))}}, 2}));
  register_worker();  // HEARTBEAT [0]
  const SessionId sid = NewSessionId();
  send_session(sid);
  send_dispatch(chunk(sid, {server.url("/fresh")}));
  // Everything above was read in order, so the first message after this
  // RESULTS shows what the worker made of the rest.
  auto f = recv();
  ASSERT_EQ(command(f), proto::Command::kResults)
      << "expected the fresh session's RESULTS first (READY: the stale not_found was taken)";
  auto r = proto::DecodeResults(f);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->session, sid);
  ASSERT_EQ(r->results.size(), 1u);
  EXPECT_EQ(r->results[0].response.body, "ok:/fresh");
  EXPECT_EQ(worker_->stats().registrations.load(), 1u) << "READY again on a not_found sent before the answer";
  EXPECT_EQ(worker_->sessions(), 1u) << "a SESSION sent before the answer to READY was taken";
  EXPECT_EQ(server.requests(), 1u) << "a DISPATCH sent before the answer to READY was fetched";
}

// 3.4.1 "(...) The broker SHALL answer READY with HEARTBEAT `[0]`; until that
// answer arrives a worker SHALL ignore (...) SESSION, DISPATCH and
// END_SESSION (sent before the broker took the READY; §3.4.5 returns their
// leases)."
// A HEARTBEAT [7] is not that answer: it is the broker's periodic one to
// the worker's previous registration (it carries the last order sent,
// §3.7.3), sent before the broker read the READY, as the orders after it.
// (A worker that registers again on a new socket while its broker still
// knows it, §3.4.3, meets exactly this: ROUTER_HANDOVER routes the broker's
// messages to the new connection at once.)
TEST_P(WorkerSpec, Clause_3_4_1_OnlyHeartbeatZeroAnswersReady) {
  testing::HttpServer server;
  ASSERT_EQ(command(recv()), proto::Command::kReady);  // not answered yet
  const SessionId stale = NewSessionId();
  send(proto::Encode(proto::BrokerBeat{std::nullopt, 7, 0}));
  send(proto::Encode(proto::Session{stale, SessionSettings{}, 8}));
  send(proto::Encode(proto::Command::kDispatch, proto::Statements{stale, {{0, Get(server.url("/stale"))}}, 9}));
  register_worker();  // HEARTBEAT [0]: the answer
  const SessionId sid = NewSessionId();
  send_session(sid);
  send_dispatch(chunk(sid, {server.url("/fresh")}));
  auto f = recv();
  ASSERT_EQ(command(f), proto::Command::kResults)
      << "expected the fresh session's RESULTS first, got " << proto::CommandName(command(f))
      << " (HOLDING: the HEARTBEAT [7] was taken for the answer to READY)";
  auto r = proto::DecodeResults(f);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->session, sid) << "the stale session's DISPATCH was fetched";
  EXPECT_EQ(r->seq, 1u);
  EXPECT_EQ(worker_->sessions(), 1u) << "a SESSION sent before the answer to READY was taken";
}

// 3.4.3 "A worker that has heard nothing from the broker for `liveness`
// periods (default 3) SHALL connect a new socket (under the same routing id,
// §1.5), send again every RESULTS not yet acknowledged (§3.7), then send
// READY again (...)"
// The fake broker closes its ROUTER after the first RESULTS and binds a new
// one only once the worker has registered again: what the old socket sent
// meanwhile is lost with it, so the new ROUTER sees exactly what the new
// socket sent, in order. (Period 300 ms: three of them pass before the
// worker would give up on the new socket too.)
TEST_P(WorkerSpec, Clause_3_4_3_UnacknowledgedResultsGoAgainBeforeReady) {
  testing::HttpServer server;
  ack_results_ = false;
  expect_ready();
  const std::string id = peer_;
  const SessionId sid = NewSessionId();
  send_session(sid);
  send_dispatch(chunk(sid, {server.url("/a")}));
  auto first = proto::DecodeResults(recv_results());
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->seq, 1u);
  ASSERT_TRUE(testing::CloseRouter(ctx_, router_, options_.broker));
  ASSERT_TRUE(testing::WaitFor([&] { return worker_->stats().registrations.load() >= 2; }, 5s))
      << "the worker did not register again after its broker went silent";
  ASSERT_TRUE(testing::BindRouter(ctx_, router_, options_.broker));
  auto f = recv(5000ms);
  ASSERT_EQ(command(f), proto::Command::kResults) << "the new socket's first message is not the unacknowledged RESULTS";
  EXPECT_EQ(peer_, id) << "the new socket has another routing id (§1.5)";
  auto again = proto::DecodeResults(f);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->session, sid);
  EXPECT_EQ(again->seq, 1u);
  ASSERT_EQ(again->results.size(), 1u);
  EXPECT_EQ(again->results[0].index, 0u);
  EXPECT_EQ(again->results[0].response.body, "ok:/a");
  EXPECT_EQ(command(recv()), proto::Command::kReady) << "READY does not follow the RESULTS sent again";
}

// 3.7.1 "A worker SHALL number its RESULTS (frame 2 `[session, seq]`) from 1
// after each READY, one after the other across sessions, and SHALL keep each
// until the broker acknowledges it. It SHALL send all of them again (...),
// and, as a safety net, any not acknowledged ten heartbeat periods after it
// was sent. It SHOULD NOT send them again sooner (...)."
// Period 200 ms; this broker answers heartbeats, so the worker stays
// registered until the test says not_found.
TEST_P(WorkerSpec, Clause_3_7_1_ResultsNumberedFrom1AndSentAgainUntilAcknowledged) {
  testing::HttpServer server;
  answer_beats_ = true;
  ack_results_ = false;
  expect_ready();
  const SessionId a = NewSessionId();
  const SessionId b = NewSessionId();
  send_session(a);
  send_dispatch(chunk(a, {server.url("/a0")}));
  auto first = proto::DecodeResults(recv_results());
  const auto first_at = Clock::now();
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->seq, 1u);
  // Not acknowledged: the same RESULTS again, ten periods later.
  auto again = proto::DecodeResults(recv_results(5000ms));
  const auto waited = Clock::now() - first_at;
  ASSERT_TRUE(again.has_value()) << "an unacknowledged RESULTS was not sent again";
  EXPECT_EQ(again->seq, 1u);
  EXPECT_EQ(again->session, a);
  ASSERT_EQ(again->results.size(), 1u);
  EXPECT_EQ(again->results[0].response.body, "ok:/a0");
  EXPECT_GE(waited, 900ms) << "sent again before ten periods (1 s) passed";
  // Acknowledged, it never comes again: the ACK is read before the next
  // DISPATCH, so a seq 1 after seq 2 would be a RESULTS sent again after
  // its ACK. The next one is numbered 2, in another session.
  send(proto::Encode(proto::Ack{std::nullopt, 1}));
  send_session(b);
  send_dispatch(chunk(b, {server.url("/b0")}));
  std::optional<proto::Results> second;
  while (!second || second->seq == 1) {
    auto r = proto::DecodeResults(recv_results());
    ASSERT_TRUE(r.has_value()) << "no RESULTS for the second session";
    second = std::move(*r);
  }
  EXPECT_EQ(second->seq, 2u);
  EXPECT_EQ(second->session, b);
  send(proto::Encode(proto::Ack{std::nullopt, 2}));
  send_dispatch(chunk(a, {server.url("/a1")}, 1));
  std::optional<proto::Results> third;
  while (!third || third->seq == 2) {
    auto r = proto::DecodeResults(recv_results());
    ASSERT_TRUE(r.has_value());
    ASSERT_NE(r->seq, 1u) << "RESULTS 1 sent again after its ACK";
    third = std::move(*r);
  }
  EXPECT_EQ(third->seq, 3u);
  send(proto::Encode(proto::Ack{std::nullopt, 3}));
  // Five periods (heartbeats, answered): 1 and 2 never again.
  int beats = 0;
  const auto deadline = Clock::now() + 5s;
  while (beats < 5 && Clock::now() < deadline) {
    auto m = recv_any(200ms);
    if (!m) continue;
    if (m->command == proto::Command::kHeartbeat) ++beats;
    if (m->command == proto::Command::kResults) {
      auto r = proto::DecodeResultsIndex(m->frames);
      ASSERT_TRUE(r.has_value());
      EXPECT_GE(r->seq, 3u) << "RESULTS " << r->seq << " sent again after its ACK";
    }
  }
  EXPECT_EQ(beats, 5);
  // READY again (the broker forgot the worker): numbered from 1 again.
  send(proto::Encode(proto::ErrorReply{StatusCode::kNotFound, "unknown worker; send READY", std::nullopt}));
  expect_ready();
  send_session(a);
  send_dispatch(chunk(a, {server.url("/a2")}, 2));
  auto after = proto::DecodeResults(recv_results());
  ASSERT_TRUE(after.has_value());
  EXPECT_EQ(after->seq, 1u) << "RESULTS not numbered from 1 after READY";
  EXPECT_EQ(after->results.at(0).response.body, "ok:/a2");
}

// 3.7.4 "A worker SHALL resynchronise when (...) (b) an order arrives whose
// seq is past the next one it expects (it SHALL act on that order all the
// same) (...). It SHALL first send again every RESULTS not acknowledged,
// then HOLDING with the highest order seq it has received and, per session
// it holds, the indices in its hands (dispatched to it and not yet answered
// in a RESULTS it has sent)."
TEST_P(WorkerSpec, Clause_3_7_4_AnOrderPastAGapBringsUnackedResultsThenHolding) {
  testing::HttpServer server(FastOrSlow);
  ack_results_ = false;
  expect_ready();
  const SessionId a = NewSessionId();
  send_session(a);                                          // 1
  send_dispatch(chunk(a, {server.url("/fast/0")}));         // 2
  auto first = proto::DecodeResults(recv_results());
  ASSERT_TRUE(first.has_value());
  ASSERT_EQ(first->seq, 1u);
  send_dispatch(chunk(a, {server.url("/slow/1")}, 1));      // 3
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 1; }, 5s));
  ++order_seq_;                                             // 4, lost
  send_dispatch(chunk(a, {server.url("/slow/2")}, 2));      // 5
  auto f = recv();
  ASSERT_EQ(command(f), proto::Command::kResults) << "the unacknowledged RESULTS does not come first";
  auto again = proto::DecodeResults(f);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->seq, 1u);
  ASSERT_EQ(again->results.size(), 1u);
  EXPECT_EQ(again->results[0].index, 0u);
  f = recv();
  ASSERT_EQ(command(f), proto::Command::kHolding);
  auto holding = proto::DecodeHolding(f);
  ASSERT_TRUE(holding.has_value());
  EXPECT_EQ(holding->seq, 5u);
  EXPECT_EQ(Held(*holding), (std::map<SessionId, std::vector<std::uint64_t>>{{a, {1, 2}}}));
  EXPECT_TRUE(testing::WaitFor([&] { return server.in_flight() == 2; }, 5s))
      << "the order past the gap was not acted on";
}

// 3.7.4 "A worker SHALL resynchronise when (...) (c) the broker's HEARTBEAT
// names a seq past the highest it has received. It SHALL first send again
// every RESULTS not acknowledged, then HOLDING with the highest order seq it
// has received and, per session it holds, the indices in its hands (...)."
// HOLDING's seq is the heartbeat's: the broker sent every order up to it,
// and takes back (§3.7.5 a) what HOLDING does not list.
TEST_P(WorkerSpec, Clause_3_7_4_AHeartbeatPastTheLastOrderBringsUnackedResultsThenHolding) {
  testing::HttpServer server(FastOrSlow);
  ack_results_ = false;
  expect_ready();
  const SessionId a = NewSessionId();
  const SessionId b = NewSessionId();
  const SessionId c = NewSessionId();
  send_session(a);                                                        // 1
  send_session(b);                                                        // 2
  send_session(c);                                                        // 3: nothing dispatched
  send_dispatch(chunk(a, {server.url("/fast/a0")}));                      // 4
  ASSERT_EQ(proto::DecodeResults(recv_results()).value().seq, 1u);
  send_dispatch(chunk(a, {server.url("/slow/a1")}, 1));                   // 5
  send_dispatch(proto::Statements{b, {{0, Get(server.url("/slow/b0"))}, {3, Get(server.url("/slow/b3"))}}});  // 6
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 3; }, 5s));
  // A HEARTBEAT naming the last order sent changes nothing: the next
  // message is the next RESULTS, neither a resend nor HOLDING.
  beat();                                                                 // [6]
  send_dispatch(chunk(a, {server.url("/fast/a4")}, 4));                   // 7
  auto f = recv();
  ASSERT_EQ(command(f), proto::Command::kResults);
  ASSERT_EQ(proto::DecodeResults(f).value().seq, 2u) << "resynchronised on a heartbeat naming the last order";
  order_seq_ += 2;                                                        // 8, 9 lost
  beat();                                                                 // [9]
  for (std::uint64_t seq : {1u, 2u}) {
    f = recv();
    ASSERT_EQ(command(f), proto::Command::kResults) << "RESULTS " << seq << " was not sent again first";
    EXPECT_EQ(proto::DecodeResults(f).value().seq, seq);
  }
  f = recv();
  ASSERT_EQ(command(f), proto::Command::kHolding);
  auto holding = proto::DecodeHolding(f);
  ASSERT_TRUE(holding.has_value());
  EXPECT_EQ(holding->seq, 9u);
  EXPECT_EQ(Held(*holding), (std::map<SessionId, std::vector<std::uint64_t>>{{a, {1}}, {b, {0, 3}}, {c, {}}}));
}

INSTANTIATE_TEST_SUITE_P(Transports, WorkerSpec, ::testing::Values("tcp", "ipc"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gatherer
