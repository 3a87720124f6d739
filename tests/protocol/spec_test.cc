// Worker-side clauses of common/PROTOCOL.md, each test named after its
// clause with the clause quoted above it. A raw ROUTER plays the broker; the
// worker is the real gatherer::Worker fetching from a real HTTP server. Each
// test runs over tcp and ipc (broker-side clauses: broker/src/broker_test.cc).

#include <filesystem>
#include <iterator>
#include <map>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/worker.h"
#include "http_server.h"
#include "socket_monitor.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;

class WorkerSpec : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    router_.set(zmq::sockopt::linger, 0);
    router_.set(zmq::sockopt::router_mandatory, 1);
    if (GetParam() == "ipc") {
      dir_ = std::filesystem::temp_directory_path() / ("gtr-spec-" + NewSessionId().ToString().substr(0, 8));
      std::filesystem::create_directories(dir_);
      router_.bind("ipc://" + (dir_ / "b.sock").string());
    } else {
      router_.bind("tcp://127.0.0.1:*");
    }
    WorkerOptions o;
    o.broker = router_.get(zmq::sockopt::last_endpoint);
    o.context = &ctx_;
    o.io_threads = 1;
    o.slots = 64;
    // This fake broker sends no heartbeats, so a worker re-registers after
    // 3 silent periods (3.4.3) and drops its sessions (3.4.5). Only the
    // tests of those clauses want that soon; the others get a period longer
    // than any of them runs, even under sanitizers.
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    const bool silence_matters = name.find("Clause_3_4_3") != std::string::npos ||
                                 name.find("Clause_3_4_5") != std::string::npos;
    o.heartbeat_interval = silence_matters ? 100ms : 10s;
    // Back within 3 s of a dropped connection, and not before the test
    // has dropped it.
    if (name.find("Clause_1_3_WorkerReconnects") != std::string::npos) o.heartbeat_interval = 1s;
    o.worker_id = "spec-worker";
    worker_ = std::make_unique<Worker>(o);
    ASSERT_TRUE(worker_->start().ok());
  }
  void TearDown() override {
    worker_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  // Next message from the worker other than HEARTBEAT; sets peer_.
  proto::Frames recv(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
      std::vector<zmq::message_t> frames;
      if (!zmq::recv_multipart(router_, std::back_inserter(frames), zmq::recv_flags::dontwait)) continue;
      peer_ = frames[0].to_string();
      proto::Frames body(std::make_move_iterator(frames.begin() + 1), std::make_move_iterator(frames.end()));
      auto c = proto::PeekCommand(body);
      if (c && *c == proto::Command::kHeartbeat) continue;
      return body;
    }
    return {};
  }
  // Next RESULTS. READY may come in between: this fake broker sends no
  // heartbeats, so a slow run (sanitizers) lets the worker re-register
  // (clause 3.4.3), which is not what these tests look at.
  proto::Frames recv_results(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= 0ms) return {};
      auto f = recv(left);
      if (f.empty() || command(f) != proto::Command::kReady) return f;
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
  proto::Ready expect_ready() {
    auto f = recv();
    EXPECT_EQ(command(f), proto::Command::kReady);
    auto r = proto::DecodeReady(f);
    EXPECT_TRUE(r.has_value());
    return r ? *r : proto::Ready{};
  }
  proto::Statements chunk(const SessionId& sid, const std::vector<std::string>& urls) {
    proto::Statements m{sid, {}};
    for (std::size_t i = 0; i < urls.size(); ++i) m.statements.push_back({i, Get(urls[i])});
    return m;
  }

  zmq::context_t ctx_{1};
  zmq::socket_t router_{ctx_, zmq::socket_type::router};
  std::unique_ptr<Worker> worker_;
  std::string peer_;
  std::filesystem::path dir_;
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

// 3.4.2 "In RESULTS, frame 3 + i SHALL hold the response body of result i,
// byte for byte." 3.5.2 "A worker SHALL return exactly one result per
// dispatched statement."
TEST_P(WorkerSpec, Clause_3_4_2_ResultsCarryBodiesInFrames) {
  testing::HttpServer server;
  expect_ready();
  const SessionId sid = NewSessionId();
  send(proto::Encode(proto::Session{sid, SessionSettings{}}));
  std::vector<std::string> urls;
  for (int i = 0; i < 20; ++i) urls.push_back(server.url("/p/" + std::to_string(i)));
  send(proto::Encode(proto::Command::kDispatch, chunk(sid, urls)));
  std::map<std::uint64_t, std::string> bodies;
  while (bodies.size() < 20) {
    auto f = recv_results();
    ASSERT_EQ(command(f), proto::Command::kResults);
    ASSERT_TRUE(proto::DecodeResultsIndex(f).has_value());
    auto m = proto::DecodeResults(f);
    ASSERT_TRUE(m.has_value());
    EXPECT_EQ(m->session, sid);
    ASSERT_EQ(f.size(), 3 + m->results.size());
    for (std::size_t i = 0; i < m->results.size(); ++i) {
      EXPECT_EQ(f[3 + i].to_string(), m->results[i].response.body);
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
    send(proto::EncodeHeartbeat());
  }
  // 10 periods: never more than one HEARTBEAT per period (plus the one a
  // late first poll may carry over), and not a silent stretch of them.
  EXPECT_LE(beats, 11);
  EXPECT_GE(beats, 4) << "HEARTBEATs missing";
}

// 1.3 "...a worker that hears nothing from its broker for `liveness` periods
// SHALL connect a new socket before it sends READY again." A frame over
// ZMQ_MAXMSGSIZE makes ZeroMQ close the worker's connection for good; the
// worker comes back on a new connection (a new routing id at the ROUTER).
TEST_P(WorkerSpec, Clause_1_3_WorkerReconnectsAfterAnOversizeFrame) {
  expect_ready();
  send(proto::EncodeHeartbeat());  // heard: the worker's silence clock restarts
  // Zero pages: no 256 MiB memset, which takes seconds under sanitizers.
  router_.send(zmq::buffer(peer_), zmq::send_flags::sndmore);
  router_.send(testing::ZeroPagesMessage(static_cast<std::size_t>(proto::kMaxMessageBytes) + 1),
               zmq::send_flags::none);
  const std::string before = peer_;
  for (;;) {
    auto f = recv(8000ms);
    ASSERT_FALSE(f.empty()) << "the worker did not come back after its connection was dropped";
    if (command(f) == proto::Command::kReady && peer_ != before) break;
  }
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
  testing::HttpServer server([](const testing::HttpRequest&) {
    testing::HttpReply r;
    r.delay = 5s;
    return r;
  });
  expect_ready();
  const SessionId sid = NewSessionId();
  send(proto::Encode(proto::Session{sid, SessionSettings{}}));
  send(proto::Encode(proto::Command::kDispatch, chunk(sid, std::vector<std::string>(4, server.url("/slow")))));
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
  testing::HttpServer server([](const testing::HttpRequest&) {
    testing::HttpReply r;
    r.delay = 5s;
    return r;
  });
  expect_ready();
  const SessionId sid = NewSessionId();
  send(proto::Encode(proto::Session{sid, SessionSettings{}}));
  std::vector<std::string> urls(10, server.url("/slow"));
  send(proto::Encode(proto::Command::kDispatch, chunk(sid, urls)));
  ASSERT_TRUE(testing::WaitFor([&] { return server.in_flight() == 10; }, 5s));
  EXPECT_EQ(worker_->sessions(), 1u);
  send(proto::Encode(proto::Command::kEndSession, proto::SessionRef{sid}));
  EXPECT_TRUE(testing::WaitFor([&] { return worker_->sessions() == 0; }, 2s));
  auto f = recv_results(500ms);
  EXPECT_TRUE(f.empty()) << "results after END_SESSION";
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
  send(proto::Encode(proto::Session{sid, SessionSettings{}}));
  send(proto::Encode(proto::Command::kDispatch, chunk(sid, {server.url("/after")})));
  auto f = recv_results();
  ASSERT_EQ(command(f), proto::Command::kResults);
  EXPECT_EQ(proto::DecodeResults(f)->results.at(0).response.body, "ok:/after");
}

// 2.4 "A receiver SHALL treat as malformed: (...) a header that is not
// exactly one msgpack value (trailing bytes count); a header of the wrong
// type (...); more frames than the command allows. A malformed message SHALL
// be dropped, counted (...)." Also the broker's HEARTBEAT.
TEST_P(WorkerSpec, Clause_2_4_MalformedHeartbeatIsCounted) {
  expect_ready();
  proto::Frames trailing = proto::EncodeHeartbeat();
  std::string header(static_cast<const char*>(trailing[2].data()), trailing[2].size());
  header.push_back('\xc0');  // a second msgpack value
  trailing[2] = zmq::message_t(header.data(), header.size());
  send(std::move(trailing));
  proto::Frames extra = proto::EncodeHeartbeat();
  extra.emplace_back("extra", 5);
  send(std::move(extra));
  EXPECT_TRUE(testing::WaitFor([&] { return worker_->stats().malformed.load() == 2; }, 2s))
      << worker_->stats().malformed.load() << " of 2 malformed HEARTBEATs counted";
}

INSTANTIATE_TEST_SUITE_P(Transports, WorkerSpec, ::testing::Values("tcp", "ipc"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gatherer
