// Broker unit tests: a real Broker on tcp and ipc, driven by raw DEALER
// sockets playing client and worker.
#include "gatherer/broker.h"

#include <filesystem>
#include <iterator>
#include <map>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "raw_peer.h"
#include "statements.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using namespace testing;

// The raw DEALER of the support library; a message that does not come
// within 3 s fails these tests.
class Peer : public testing::RawPeer {
 public:
  Peer(zmq::context_t& ctx, const std::string& endpoint) : RawPeer(ctx, endpoint) { set_recv_timeout(3000ms); }
};

class BrokerTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override { start_broker(20); }
  // Raw peers heartbeat only while they wait in recv(), so by default a
  // worker is presumed dead after 20 periods (2 s: slow sanitizer runs on a
  // busy machine stay clear of it); tests about dead workers restart the
  // broker with liveness 3 (300 ms).
  void start_broker(int liveness) {
    broker_.reset();
    std::string ep = GetParam();
    if (ep == "ipc") {
      if (dir_.empty()) {
        dir_ = std::filesystem::temp_directory_path() / ("gtr-" + NewSessionId().ToString().substr(0, 8));
        std::filesystem::create_directories(dir_);
      }
      ep = "ipc://" + (dir_ / "b.sock").string();
    }
    BrokerOptions o;
    o.endpoints = {ep};
    o.heartbeat_interval = 100ms;
    o.heartbeat_liveness = liveness;
    if (max_queued_ > 0) o.max_queued = max_queued_;
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
    EXPECT_EQ(CommandOf(reply), proto::Command::kOpened);
    return sid;
  }
  // Registers a worker: READY, answered with HEARTBEAT [0] once the broker
  // has taken it (§3.4.1). (The workers gauge is no sure sign: it may still
  // count a worker just presumed dead.)
  void ready(Peer& worker, std::uint32_t slots) {
    worker.send(proto::Encode(proto::Ready{"w", "h", slots}));
    ASSERT_TRUE(worker.await_ready_answer()) << "READY not answered with HEARTBEAT [0]";
  }

  // Indices of the next DISPATCH `worker` gets within `timeout` (SESSION
  // skipped), or none.
  static std::vector<std::uint64_t> take(Peer& worker, std::chrono::milliseconds timeout = 3000ms) {
    for (;;) {
      auto f = worker.recv(timeout);
      if (f.empty()) return {};
      if (CommandOf(f) != proto::Command::kDispatch) continue;
      std::vector<std::uint64_t> out;
      auto chunk = proto::DecodeStatements(f);
      for (const auto& ws : chunk->statements) out.push_back(ws.index);
      return out;
    }
  }
  // Results the client gets within `timeout`, by index.
  static std::map<std::uint64_t, Response> results(Peer& client, std::size_t want,
                                                   std::chrono::milliseconds timeout = 3000ms) {
    std::map<std::uint64_t, Response> out;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (out.size() < want && std::chrono::steady_clock::now() < deadline) {
      auto f = client.recv(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()));
      if (f.empty() || CommandOf(f) != proto::Command::kResults) continue;
      auto batch = proto::DecodeResults(f);
      for (auto& r : batch->results) out[r.index] = std::move(r.response);
    }
    return out;
  }

  std::uint64_t max_queued_ = 0;  // 0 = the default
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
  ASSERT_EQ(CommandOf(session), proto::Command::kSession);
  auto dispatch = worker.recv();
  ASSERT_EQ(CommandOf(dispatch), proto::Command::kDispatch);
  auto chunk = proto::DecodeStatements(dispatch);
  ASSERT_TRUE(chunk.has_value());
  EXPECT_EQ(chunk->statements.size(), 5u);
  EXPECT_TRUE(worker.recv(200ms).empty()) << "more than the window was dispatched";
  // One result frees one slot of the window: exactly one more is dispatched.
  worker.send_results(sid, {0});
  auto forwarded = client.recv();
  ASSERT_EQ(CommandOf(forwarded), proto::Command::kResults);
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
  ASSERT_EQ(CommandOf(worker.recv()), proto::Command::kSession);
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
  ASSERT_TRUE(testing::WaitFor([&] { return broker_->stats().queued.load() == 80; }));
  ready(worker, 32);
  std::map<SessionId, std::size_t> got;
  for (;;) {
    auto f = worker.recv(300ms);
    if (f.empty()) break;
    if (CommandOf(f) != proto::Command::kDispatch) continue;
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
  worker.send_results(sid, {0, 1});
  auto first = proto::DecodeResults(client.recv());
  ASSERT_TRUE(first.has_value());
  EXPECT_EQ(first->results.size(), 2u);
  worker.send_results(sid, {1, 99});
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
  EXPECT_EQ(CommandOf(client.recv()), proto::Command::kClosed);
  auto end = worker.recv();
  ASSERT_EQ(CommandOf(end), proto::Command::kEndSession);
  EXPECT_EQ(proto::DecodeSessionRef(end)->session, sid);
  client.send(proto::Encode(proto::Command::kClose, proto::SessionRef{sid}));
  EXPECT_EQ(CommandOf(client.recv()), proto::Command::kClosed);
  EXPECT_EQ(broker_->stats().sessions.load(), 0u);
}

// §3.2.4
TEST_P(BrokerTest, SubmitToUnknownSessionIsNotFound) {
  Peer client(ctx_, endpoint_);
  SessionId sid = NewSessionId();
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  auto reply = client.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
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
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kResourceExhausted);
  EXPECT_EQ(broker_->stats().queued.load(), 0u);
}

// §3.2.3, §5: the broker-wide cap holds over all sessions, each within its
// own cap; a refused SUBMIT keeps none of its statements.
TEST_P(BrokerTest, SubmitBeyondBrokerWideCapIsRefused) {
  max_queued_ = 5;
  start_broker(20);
  Peer a(ctx_, endpoint_), b(ctx_, endpoint_);
  SessionId sa = open(a, 10), sb = open(b, 10);
  a.send(proto::EncodeSubmit(sa, 0, Urls(3)));
  ASSERT_TRUE(testing::WaitFor([&] { return broker_->stats().queued.load() == 3; }));
  b.send(proto::EncodeSubmit(sb, 0, Urls(3)));
  auto reply = b.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  auto e = proto::DecodeError(reply);
  EXPECT_EQ(e->code, StatusCode::kResourceExhausted);
  EXPECT_NE(e->message.find("broker queue cap"), std::string::npos) << e->message;
  EXPECT_NE(e->message.find("the SUBMIT of 3 statements from index 0"), std::string::npos) << e->message;
  b.send(proto::EncodeSubmit(sb, 0, Urls(2)));  // fits: 5 in all
  ASSERT_TRUE(testing::WaitFor([&] { return broker_->stats().queued.load() == 5; }));
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
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kFailedPrecondition);
  // The broker still serves.
  Peer client(ctx_, endpoint_);
  open(client, 1);
  EXPECT_EQ(broker_->stats().malformed.load(), 2u);
}

// §3.4.4
TEST_P(BrokerTest, ResultsFromUnknownWorkerAskForReady) {
  Peer stranger(ctx_, endpoint_);
  stranger.send_results(NewSessionId(), {0});
  auto reply = stranger.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kNotFound);
}

// §4.5: a silent worker's leases are queued again and go to another worker.
TEST_P(BrokerTest, DeadWorkerStatementsAreRedispatched) {
  start_broker(3);
  Peer client(ctx_, endpoint_);
  // The session first: the worker that will die must be alive (it does not
  // heartbeat) from its READY until it takes the work, however slow the
  // machine between the two.
  SessionId sid = open(client, 10);
  auto dead = std::make_unique<Peer>(ctx_, endpoint_);
  ready(*dead, 100);
  client.send(proto::EncodeSubmit(sid, 0, Urls(4)));
  ASSERT_EQ(take(*dead).size(), 4u);
  dead.reset();  // silent from now on
  Peer alive(ctx_, endpoint_);
  alive.set_heartbeat(true);
  ready(alive, 100);
  // They run again, as one group, on a worker that holds nothing else.
  EXPECT_EQ(take(alive), (std::vector<std::uint64_t>{0, 1, 2, 3}));
  EXPECT_EQ(broker_->stats().quarantined.load(), 4u);
  EXPECT_EQ(broker_->stats().requeued.load(), 0u);
}

// §4.5 (a): a non-idempotent statement a dead worker held fails as "outcome
// unknown" and is never dispatched again; an explicitly idempotent POST is.
TEST_P(BrokerTest, DeadWorkerNonIdempotentStatementsFailAsOutcomeUnknown) {
  start_broker(3);
  Peer client(ctx_, endpoint_);
  SessionId sid = open(client, 10);  // first, as above
  auto dead = std::make_unique<Peer>(ctx_, endpoint_);
  ready(*dead, 100);
  auto statements = Mixed(4, [](int i) { return i % 2 == 1; });
  statements[3].idempotent = true;
  client.send(proto::EncodeSubmit(sid, 0, statements));
  ASSERT_EQ(take(*dead).size(), 4u);
  dead.reset();
  auto failed = results(client, 1);
  ASSERT_EQ(failed.size(), 1u);
  const Response& r = failed.begin()->second;
  EXPECT_EQ(failed.begin()->first, 1u);
  ASSERT_TRUE(r.error.has_value());
  EXPECT_EQ(r.error->code, StatusCode::kUnknown);
  EXPECT_NE(r.error->message.find("outcome unknown"), std::string::npos) << r.error->message;
  EXPECT_EQ(r.worker, "w");
  Peer alive(ctx_, endpoint_);
  alive.set_heartbeat(true);
  ready(alive, 100);
  EXPECT_EQ(take(alive), (std::vector<std::uint64_t>{0, 2, 3}));
  EXPECT_EQ(broker_->stats().outcome_unknown.load(), 1u);
}

// §4.5 (b, c): a dead worker's statements are tested in quarantine, halving
// the group whose worker dies, until the one statement that kills every
// worker running it alone fails as poison after poison_after (3) deaths; the
// others are answered.
TEST_P(BrokerTest, PoisonStatementIsIsolatedAndFailsAfterThreeSoloDeaths) {
  start_broker(5);  // live workers here wait on the client between heartbeats
  constexpr std::uint64_t kPoison = 3;
  const BrokerStats& stats = broker_->stats();
  Peer client(ctx_, endpoint_);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(6)));
  std::map<std::uint64_t, Response> got;
  int deaths = 0;
  while (got.size() < 6 && deaths < 12) {
    auto worker = std::make_unique<Peer>(ctx_, endpoint_);
    worker->set_heartbeat(true);
    ready(*worker, 100);
    // It answers what it is given until the poison statement comes.
    bool poisoned = false;
    while (!poisoned && got.size() < 6) {
      auto indices = take(*worker);
      ASSERT_FALSE(indices.empty()) << "nothing dispatched after " << deaths << " deaths";
      poisoned = std::find(indices.begin(), indices.end(), kPoison) != indices.end();
      if (poisoned) break;
      worker->send_results(sid, indices);
      for (auto& [i, r] : results(client, indices.size())) got[i] = std::move(r);
    }
    if (!poisoned) break;
    const auto noticed = stats.quarantined.load() + stats.poisoned.load();
    worker.reset();  // dies: silent from now on
    ++deaths;
    ASSERT_TRUE(testing::WaitFor([&] { return stats.quarantined.load() + stats.poisoned.load() > noticed; }))
        << "the broker did not notice death " << deaths;
    // Gone from the registry before the next worker registers.
    ASSERT_TRUE(testing::WaitFor([&] { return stats.workers.load() == 0; }));
    if (stats.poisoned.load() > 0) {
      for (auto& [i, r] : results(client, 1)) got[i] = std::move(r);
    }
  }
  // One death among many, two halvings of the quarantined group, then three
  // deaths with the poison statement alone.
  EXPECT_EQ(deaths, 6);
  ASSERT_EQ(got.size(), 6u);
  for (const auto& [i, r] : got) {
    if (i == kPoison) continue;
    EXPECT_TRUE(r.ok()) << "statement " << i << " failed: " << r.error->message;
    EXPECT_EQ(r.body, "body" + std::to_string(i));
  }
  const Response& poison = got[kPoison];
  ASSERT_TRUE(poison.error.has_value());
  EXPECT_EQ(poison.error->code, StatusCode::kAborted);
  EXPECT_NE(poison.error->message.find("poison"), std::string::npos) << poison.error->message;
  EXPECT_EQ(stats.poisoned.load(), 1u);
}

// §3.4.7: a draining worker is leased nothing more but may still answer;
// when it disconnects, what it still held is queued again at the front (a
// non-idempotent statement fails as outcome unknown).
TEST_P(BrokerTest, DrainingWorkerTakesNoMoreAndItsLeftoversGoBack) {
  Peer client(ctx_, endpoint_), leaving(ctx_, endpoint_);
  leaving.set_heartbeat(true);
  ready(leaving, 100);
  SessionId sid = open(client, 3);
  client.send(proto::EncodeSubmit(sid, 0, Mixed(6, [](int i) { return i == 2; })));
  ASSERT_EQ(take(leaving), (std::vector<std::uint64_t>{0, 1, 2}));
  leaving.send(proto::EncodeEmpty(proto::Command::kDraining));
  leaving.send_results(sid, {0});  // after DRAINING on the same socket
  ASSERT_EQ(results(client, 1).count(0), 1u);
  EXPECT_TRUE(take(leaving, 300ms).empty()) << "a draining worker was given more work";
  leaving.send(proto::EncodeEmpty(proto::Command::kDisconnect));
  auto unknown = results(client, 1);
  ASSERT_EQ(unknown.count(2), 1u);
  EXPECT_EQ(unknown[2].error->code, StatusCode::kUnknown);
  ASSERT_TRUE(testing::WaitFor([&] { return broker_->stats().workers.load() == 0; }));
  Peer next(ctx_, endpoint_);
  next.set_heartbeat(true);
  ready(next, 100);
  EXPECT_EQ(take(next), (std::vector<std::uint64_t>{1, 3, 4}));
  EXPECT_EQ(broker_->stats().requeued.load(), 1u);
  EXPECT_EQ(broker_->stats().quarantined.load(), 0u);
}

// §3.4.5: a worker that registers again has dropped what it held, so the
// broker queues those statements again (here: back to the same worker).
TEST_P(BrokerTest, WorkerRegisteringAgainGetsItsStatementsBack) {
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  worker.set_heartbeat(true);
  ready(worker, 100);
  SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  ASSERT_EQ(take(worker), (std::vector<std::uint64_t>{0, 1}));
  worker.send(proto::Encode(proto::Ready{"w", "h", 100}));
  auto session = worker.recv();
  ASSERT_EQ(CommandOf(session), proto::Command::kSession) << "no new SESSION before the re-dispatch";
  EXPECT_EQ(take(worker), (std::vector<std::uint64_t>{0, 1}));
  EXPECT_EQ(broker_->stats().requeued.load(), 2u);
}

// §4.7: a draining broker refuses new sessions but keeps serving open ones,
// which may also be re-opened.
TEST_P(BrokerTest, DrainingBrokerRefusesNewSessionsOnly) {
  Peer client(ctx_, endpoint_);
  SessionId sid = open(client, 10);
  broker_->drain();
  const SessionId fresh = NewSessionId();
  client.send(proto::Encode(proto::Open{fresh, SessionSettings{}, 0}));
  auto refused = client.recv();
  ASSERT_EQ(CommandOf(refused), proto::Command::kError);
  auto e = proto::DecodeError(refused);
  EXPECT_EQ(e->code, StatusCode::kUnavailable);
  EXPECT_EQ(e->session, fresh);
  client.send(proto::Encode(proto::Open{sid, SessionSettings{}, 0}));
  EXPECT_EQ(CommandOf(client.recv()), proto::Command::kOpened);
}

// §3.2.7: a HEARTBEAT naming a session the broker does not have is
// answered with ERROR not_found naming it; one naming a live session with
// HEARTBEAT.
TEST_P(BrokerTest, HeartbeatNamingUnknownSessionIsNotFound) {
  Peer client(ctx_, endpoint_);
  const SessionId stranger = NewSessionId();
  client.send(proto::EncodeHeartbeat(stranger));
  auto reply = client.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
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
  ASSERT_EQ(CommandOf(again), proto::Command::kDispatch);
  auto chunk = proto::DecodeStatements(again);
  ASSERT_EQ(chunk->statements.size(), 1u);
  EXPECT_EQ(chunk->statements[0].index, 3u);
  EXPECT_TRUE(worker.recv(200ms).empty());
}

INSTANTIATE_TEST_SUITE_P(Transports, BrokerTest, ::testing::Values("tcp://127.0.0.1:*", "ipc"),
                         [](const auto& info) { return info.param == "ipc" ? std::string("ipc") : std::string("tcp"); });

}  // namespace
}  // namespace gatherer
