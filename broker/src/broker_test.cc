// Broker unit tests: a real Broker on tcp and ipc, driven by raw DEALER
// sockets playing client and worker.
#include "gatherer/broker.h"

#include <filesystem>
#include <iterator>
#include <map>
#include <thread>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;

class Peer {
 public:
  Peer(zmq::context_t& ctx, const std::string& endpoint) : socket_(ctx, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(endpoint);
  }
  void send(proto::Frames&& frames) { zmq::send_multipart(socket_, frames); }
  // A live worker heartbeats while it waits (PROTOCOL.md §3.4.3).
  void set_heartbeat(bool on) { heartbeat_ = on; }
  // Next message other than HEARTBEAT within `timeout`, or empty.
  proto::Frames recv(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (heartbeat_) send(proto::EncodeHeartbeat());
      zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      zmq::poll(&item, 1, heartbeat_ ? std::min(left, 50ms) : left);
      proto::Frames frames;
      if (zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait)) {
        auto c = proto::PeekCommand(frames);
        if (c && *c == proto::Command::kHeartbeat) continue;
        return frames;
      }
    }
    return {};
  }
  proto::Command command_of(const proto::Frames& f) { return *proto::PeekCommand(f); }

 private:
  zmq::socket_t socket_;
  bool heartbeat_ = false;
};

std::vector<Statement> Urls(int n) {
  std::vector<Statement> out;
  for (int i = 0; i < n; ++i) out.push_back(Get("http://127.0.0.1:1/" + std::to_string(i)));
  return out;
}

proto::Frames ResultsFor(const SessionId& sid, const std::vector<std::uint64_t>& indices) {
  proto::Results r{sid, {}};
  for (auto i : indices) {
    proto::WireResult wr;
    wr.index = i;
    wr.response.status = 200;
    wr.response.body = "body" + std::to_string(i);
    r.results.push_back(std::move(wr));
  }
  return proto::Encode(std::move(r));
}

class BrokerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string ep = GetParam();
    if (ep == "ipc") {
      dir_ = std::filesystem::temp_directory_path() / ("gtr-" + NewSessionId().ToString().substr(0, 8));
      std::filesystem::create_directories(dir_);
      ep = "ipc://" + (dir_ / "b.sock").string();
    }
    BrokerOptions o;
    o.endpoints = {ep};
    o.heartbeat_interval = 100ms;
    o.max_chunk = 8;
    broker_ = std::make_unique<Broker>(o);
    ASSERT_TRUE(broker_->start().ok());
    endpoint_ = broker_->endpoints().at(0);
  }
  void TearDown() override {
    broker_.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }
  SessionId open(Peer& client, std::uint32_t window, std::uint32_t prefetch = 0) {
    SessionId sid = NewSessionId();
    SessionSettings s;
    s.workers = window;
    client.send(proto::Encode(proto::Open{sid, s, prefetch}));
    auto reply = client.recv();
    EXPECT_EQ(client.command_of(reply), proto::Command::kOpened);
    return sid;
  }
  // Registers a worker and waits until the broker counts it.
  void ready(Peer& worker, std::uint32_t slots) {
    const auto before = broker_->stats().workers.load();
    worker.send(proto::Encode(proto::Ready{"w", "h", slots}));
    for (int i = 0; i < 500 && broker_->stats().workers.load() == before; ++i) std::this_thread::sleep_for(2ms);
  }

  zmq::context_t ctx_{1};
  std::unique_ptr<Broker> broker_;
  std::string endpoint_;
  std::filesystem::path dir_;
};

// §4.2: a session never has more than `workers` statements leased.
TEST_P(BrokerTest, DispatchRespectsSessionWindow) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 1000);
  SessionId sid = open(client, 5);
  client.send(proto::EncodeSubmit(sid, 0, Urls(10)));
  auto session = worker.recv();
  ASSERT_EQ(worker.command_of(session), proto::Command::kSession);
  auto dispatch = worker.recv();
  ASSERT_EQ(worker.command_of(dispatch), proto::Command::kDispatch);
  auto chunk = proto::DecodeStatements(dispatch);
  ASSERT_TRUE(chunk.has_value());
  EXPECT_EQ(chunk->statements.size(), 5u);
  EXPECT_TRUE(worker.recv(200ms).empty()) << "more than the window was dispatched";
  // One result frees one slot of the window: exactly one more is dispatched.
  worker.send(ResultsFor(sid, {0}));
  auto forwarded = client.recv();
  ASSERT_EQ(client.command_of(forwarded), proto::Command::kResults);
  auto res = proto::DecodeResults(forwarded);
  ASSERT_TRUE(res.has_value());
  EXPECT_EQ(res->results.at(0).response.body, "body0");
  auto next = proto::DecodeStatements(worker.recv());
  ASSERT_TRUE(next.has_value());
  ASSERT_EQ(next->statements.size(), 1u);
  EXPECT_EQ(next->statements[0].index, 5u);
}

// §4.2: the broker never leases more than a worker's slots.
TEST_P(BrokerTest, DispatchRespectsWorkerCredit) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 3);
  SessionId sid = open(client, 100);
  client.send(proto::EncodeSubmit(sid, 0, Urls(10)));
  ASSERT_EQ(worker.command_of(worker.recv()), proto::Command::kSession);
  auto chunk = proto::DecodeStatements(worker.recv());
  ASSERT_TRUE(chunk.has_value());
  EXPECT_EQ(chunk->statements.size(), 3u);
  EXPECT_TRUE(worker.recv(200ms).empty());
}

// §4.2: sessions with pending work are served round-robin.
TEST_P(BrokerTest, SessionsAreServedRoundRobin) {
  Peer a(ctx_, endpoint_), b(ctx_, endpoint_), worker(ctx_, endpoint_);
  SessionId sa = open(a, 100), sb = open(b, 100);
  a.send(proto::EncodeSubmit(sa, 0, Urls(40)));
  b.send(proto::EncodeSubmit(sb, 0, Urls(40)));
  // Both queued before any worker exists; then a worker with room for 32.
  for (int i = 0; i < 500 && broker_->stats().queued.load() < 80; ++i) std::this_thread::sleep_for(2ms);
  ready(worker, 32);
  std::map<SessionId, std::size_t> got;
  for (;;) {
    auto f = worker.recv(300ms);
    if (f.empty()) break;
    if (worker.command_of(f) != proto::Command::kDispatch) continue;
    auto m = proto::DecodeStatements(f);
    got[m->session] += m->statements.size();
  }
  EXPECT_EQ(got[sa], 16u);
  EXPECT_EQ(got[sb], 16u);
}

// §4.3: a result for an index not leased to the sender is dropped.
TEST_P(BrokerTest, DuplicateResultsAreDropped) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  (void)worker.recv();
  (void)worker.recv();
  worker.send(ResultsFor(sid, {0, 1}));
  auto first = proto::DecodeResults(client.recv());
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->results.size(), 2u);
  worker.send(ResultsFor(sid, {1, 99}));
  EXPECT_TRUE(client.recv(300ms).empty());
  EXPECT_EQ(broker_->stats().duplicates_dropped.load(), 2u);
}

// §3.2.6, §3.5.3: CLOSE is answered with CLOSED; holders get END_SESSION.
TEST_P(BrokerTest, CloseEndsSessionOnWorkersAndIsIdempotent) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(3)));
  (void)worker.recv();
  (void)worker.recv();
  client.send(proto::Encode(proto::Command::kClose, proto::SessionRef{sid}));
  EXPECT_EQ(client.command_of(client.recv()), proto::Command::kClosed);
  auto end = worker.recv();
  ASSERT_EQ(worker.command_of(end), proto::Command::kEndSession);
  EXPECT_EQ(proto::DecodeSessionRef(end)->session, sid);
  client.send(proto::Encode(proto::Command::kClose, proto::SessionRef{sid}));
  EXPECT_EQ(client.command_of(client.recv()), proto::Command::kClosed);
  EXPECT_EQ(broker_->stats().sessions.load(), 0u);
}

// §3.2.4
TEST_P(BrokerTest, SubmitToUnknownSessionIsNotFound) {
  Peer client(ctx_, endpoint_);
  SessionId sid = NewSessionId();
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  auto reply = client.recv();
  ASSERT_EQ(client.command_of(reply), proto::Command::kError);
  auto e = proto::DecodeError(reply);
  EXPECT_EQ(e->code, StatusCode::kNotFound);
  EXPECT_EQ(e->session, sid);
}

// §3.2.3
TEST_P(BrokerTest, SubmitBeyondQueueCapIsRefused) {
  Peer client(ctx_, endpoint_);
  SessionId sid = open(client, 2, 2);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2 + 2 + 1024 + 1)));
  auto reply = client.recv();
  ASSERT_EQ(client.command_of(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kResourceExhausted);
  EXPECT_EQ(broker_->stats().queued.load(), 0u);
}

// §2.2, §2.4: malformed messages are counted and dropped; a wrong version is told.
TEST_P(BrokerTest, MalformedMessagesAreCountedAndDropped) {
  Peer raw(ctx_, endpoint_);
  proto::Frames junk;
  junk.emplace_back("garbage", 7);
  raw.send(std::move(junk));
  proto::Frames v9 = proto::EncodeHeartbeat();
  const std::uint8_t sig[] = {'G', 'T', 'R', 9};
  v9[0] = zmq::message_t(sig, 4);
  raw.send(std::move(v9));
  auto reply = raw.recv();
  ASSERT_FALSE(reply.empty());
  ASSERT_EQ(raw.command_of(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kFailedPrecondition);
  // The broker still serves.
  Peer client(ctx_, endpoint_);
  open(client, 1);
  EXPECT_EQ(broker_->stats().malformed.load(), 2u);
}

// §3.4.4
TEST_P(BrokerTest, ResultsFromUnknownWorkerAskForReady) {
  Peer stranger(ctx_, endpoint_);
  stranger.send(ResultsFor(NewSessionId(), {0}));
  auto reply = stranger.recv();
  ASSERT_EQ(stranger.command_of(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kNotFound);
}

// §4.5: a silent worker's leases are queued again and go to another worker.
TEST_P(BrokerTest, DeadWorkerStatementsAreRedispatched) {
  Peer client(ctx_, endpoint_);
  auto dead = std::make_unique<Peer>(ctx_, endpoint_);
  ready(*dead, 100);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(4)));
  (void)dead->recv();
  auto first = proto::DecodeStatements(dead->recv());
  ASSERT_EQ(first->statements.size(), 4u);
  dead.reset();  // silent from now on
  Peer alive(ctx_, endpoint_);
  alive.set_heartbeat(true);
  ready(alive, 100);
  std::vector<std::uint64_t> indices;
  for (;;) {
    auto f = alive.recv(2000ms);
    ASSERT_FALSE(f.empty()) << "statements of the dead worker were not re-dispatched";
    if (alive.command_of(f) != proto::Command::kDispatch) continue;
    auto chunk = proto::DecodeStatements(f);
    ASSERT_TRUE(chunk.has_value());
    for (auto& s : chunk->statements) indices.push_back(s.index);
    if (indices.size() == 4) break;
  }
  EXPECT_EQ(indices, (std::vector<std::uint64_t>{0, 1, 2, 3}));
  EXPECT_EQ(broker_->stats().requeued.load(), 4u);
}

// §3.2.7: a HEARTBEAT naming a session the broker does not have is
// answered with ERROR not_found naming it; one naming a live session with
// HEARTBEAT.
TEST_P(BrokerTest, HeartbeatNamingUnknownSessionIsNotFound) {
  Peer client(ctx_, endpoint_);
  const SessionId stranger = NewSessionId();
  client.send(proto::EncodeHeartbeat(stranger));
  auto reply = client.recv();
  ASSERT_EQ(client.command_of(reply), proto::Command::kError);
  auto e = proto::DecodeError(reply);
  EXPECT_EQ(e->code, StatusCode::kNotFound);
  EXPECT_EQ(e->session, stranger);
  SessionId sid = open(client, 1);
  client.send(proto::EncodeHeartbeat(sid));
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));  // no worker: stays queued, no reply
  EXPECT_TRUE(client.recv(200ms).empty()) << "a live session's heartbeat got an error";
}

// §4.4: a resubmitted index that is already leased is not dispatched twice.
TEST_P(BrokerTest, ResubmittedLeasedIndexIsNotDispatchedTwice) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(3)));
  (void)worker.recv();  // SESSION
  auto first = proto::DecodeStatements(worker.recv());
  ASSERT_EQ(first->statements.size(), 3u);
  // The client re-opens and resubmits 0..3; only 3 is new.
  SessionSettings s;
  s.workers = 10;
  client.send(proto::Encode(proto::Open{sid, s, 0}));
  client.send(proto::EncodeSubmit(sid, 0, Urls(4)));
  auto again = worker.recv();
  ASSERT_EQ(worker.command_of(again), proto::Command::kDispatch);
  auto chunk = proto::DecodeStatements(again);
  ASSERT_EQ(chunk->statements.size(), 1u);
  EXPECT_EQ(chunk->statements[0].index, 3u);
  EXPECT_TRUE(worker.recv(200ms).empty());
}

INSTANTIATE_TEST_SUITE_P(Transports, BrokerTest, ::testing::Values("tcp://127.0.0.1:*", "ipc"),
                         [](const auto& info) { return info.param == "ipc" ? std::string("ipc") : std::string("tcp"); });

}  // namespace
}  // namespace gatherer
