// BrokerCore without sockets or threads, on a simulated clock: messages are
// handed to handle(), time is moved by hand, and what the broker sends is
// read from a record. Heartbeat expiry, session TTL, quarantine and poison,
// and rate pacing run through minutes of simulated time in milliseconds.
#include <gtest/gtest.h>

#include <map>

#include "broker_impl.h"

namespace gatherer {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

// Everything the core sends, per peer, in order. A peer in `gone` is
// unreachable, as ROUTER_MANDATORY reports a closed connection.
class Record final : public Outbound {
 public:
  proto::SendResult send(const std::string& peer, proto::Frames& frames) override {
    if (gone.contains(peer)) return proto::SendResult::kUnreachable;
    sent[peer].push_back(std::move(frames));
    return proto::SendResult::kSent;
  }
  // What `peer` was sent since the last call, HEARTBEATs and ACKs left out.
  std::vector<proto::Frames> take(const std::string& peer) {
    std::vector<proto::Frames> out;
    for (auto& f : sent[peer]) {
      const auto c = proto::PeekCommand(std::span<const zmq::message_t>(f));
      if (c && (*c == proto::Command::kHeartbeat || *c == proto::Command::kAck)) continue;
      out.push_back(std::move(f));
    }
    sent[peer].clear();
    return out;
  }
  std::map<std::string, std::vector<proto::Frames>> sent;
  std::set<std::string> gone;
};

class BrokerCoreTest : public ::testing::Test {
 protected:
  BrokerCoreTest() {
    BrokerOptions o;
    o.heartbeat_interval = 1s;
    o.heartbeat_liveness = 3;
    o.session_ttl = 10s;
    core_ = std::make_unique<BrokerCore>(o, record_, [this] { return now_; });
  }

  // One message from `peer`, then one loop pass.
  void from(const std::string& peer, proto::Frames&& frames) {
    std::vector<zmq::message_t> message;
    message.emplace_back(peer.data(), peer.size());
    for (auto& f : frames) message.push_back(std::move(f));
    core_->handle(message);
    core_->pass();
  }
  // Time passes: one loop pass per simulated `step`, as the broker's poll
  // would wake for heartbeats; `beating` workers send theirs meanwhile.
  void advance(Clock::duration by, std::vector<std::string> beating = {}, Clock::duration step = 100ms) {
    for (Clock::duration done{0}; done < by; done += step) {
      now_ += step;
      for (const auto& w : beating) from(w, proto::EncodeHeartbeat());
      core_->pass();
    }
  }
  void ready(const std::string& worker, std::uint32_t slots) { from(worker, proto::Encode(proto::Ready{worker, "h", slots})); }
  SessionId open(const std::string& client, std::uint32_t window, SessionSettings s = {}) {
    const SessionId sid = NewSessionId();
    s.workers = window;
    from(client, proto::Encode(proto::Open{sid, s, 0}));
    return sid;
  }
  static std::vector<Statement> Urls(int n) {
    std::vector<Statement> out;
    for (int i = 0; i < n; ++i) {
      std::string url = "http://a.test/";  // in steps: GCC 12 -O3 misreads "..." + to_string as overlapping
      url += std::to_string(i);
      out.push_back(Get(url));
    }
    return out;
  }
  // What `worker` was ordered since the last look: the shares of the window
  // its SESSIONs gave it (§4.2), and the indices DISPATCHed to it.
  struct Orders {
    std::vector<std::uint32_t> shares;
    std::vector<std::uint64_t> indices;
  };
  Orders orders(const std::string& worker) {
    Orders out;
    for (auto& f : record_.take(worker)) {
      const auto command = proto::PeekCommand(std::span<const zmq::message_t>(f)).value_or(proto::Command::kError);
      if (command == proto::Command::kSession) out.shares.push_back(proto::DecodeSession(f)->settings.workers);
      if (command != proto::Command::kDispatch) continue;
      const auto m = proto::DecodeStatements(f);
      for (const auto& ws : m->statements) out.indices.push_back(ws.index);
    }
    return out;
  }
  std::vector<std::uint64_t> dispatched(const std::string& worker) { return orders(worker).indices; }
  void results(const std::string& worker, const SessionId& sid, const std::vector<std::uint64_t>& indices) {
    proto::Results r{sid, ++results_seq_[worker], {}};
    for (auto i : indices) {
      proto::WireResult wr;
      wr.index = i;
      wr.response.status = 200;
      r.results.push_back(std::move(wr));
    }
    from(worker, proto::Encode(std::move(r)));
  }
  // Indices answered to `client`, with their errors (empty: none).
  std::map<std::uint64_t, std::string> answered(const std::string& client) {
    std::map<std::uint64_t, std::string> out;
    for (auto& f : record_.take(client)) {
      if (proto::PeekCommand(std::span<const zmq::message_t>(f)).value_or(proto::Command::kError) !=
          proto::Command::kResults) {
        continue;
      }
      const auto m = proto::DecodeResults(f);
      for (const auto& r : m->results) {
        out[r.index] = r.response.error ? r.response.error->message : "";
      }
    }
    return out;
  }
  const BrokerStats& stats() const { return core_->stats; }

  Clock::time_point now_ = Clock::time_point() + 1h;
  Record record_;
  std::unique_ptr<BrokerCore> core_;
  std::map<std::string, std::uint64_t> results_seq_;
};

// §4.5: a worker silent for liveness periods is presumed dead, at the first
// heartbeat after them; its leases run again, as a group, on a worker that
// holds nothing else. 4 s of simulated silence.
TEST_F(BrokerCoreTest, SilentWorkerIsPresumedDeadAndItsStatementsRunAgain) {
  ready("w1", 10);
  const SessionId sid = open("c", 10);
  from("c", proto::EncodeSubmit(sid, 0, Urls(3)));
  ASSERT_EQ(dispatched("w1"), (std::vector<std::uint64_t>{0, 1, 2}));
  ready("w2", 10);
  advance(2900ms, {"w2"});
  EXPECT_EQ(stats().workers.load(), 2u) << "presumed dead before liveness x period of silence";
  advance(1200ms, {"w2"});
  EXPECT_EQ(stats().workers.load(), 1u);
  EXPECT_EQ(stats().quarantined.load(), 3u);
  EXPECT_EQ(dispatched("w2"), (std::vector<std::uint64_t>{0, 1, 2}));
  results("w2", sid, {0, 1, 2});
  EXPECT_EQ(answered("c").size(), 3u);
}

// §4.5: a statement whose worker died running it alone, poison_after times,
// fails as poison instead of killing a fourth.
TEST_F(BrokerCoreTest, StatementThatKillsEveryWorkerRunningItAloneIsPoison) {
  const SessionId sid = open("c", 10);
  from("c", proto::EncodeSubmit(sid, 0, Urls(1)));
  for (int death = 1; death <= 3; ++death) {
    std::string w = "w";
    w += std::to_string(death);
    ready(w, 10);
    ASSERT_EQ(dispatched(w), (std::vector<std::uint64_t>{0})) << "run " << death;
    for (int i = 0; i < 41; ++i) {  // it dies with the statement; the client lives on
      now_ += 100ms;
      from("c", proto::EncodeHeartbeat(sid));
    }
  }
  const auto got = answered("c");
  ASSERT_EQ(got.size(), 1u);
  EXPECT_NE(got.at(0).find("poison"), std::string::npos) << got.at(0);
  EXPECT_EQ(stats().poisoned.load(), 1u);
  ready("w4", 10);
  EXPECT_TRUE(dispatched("w4").empty()) << "poison dispatched again";
}

// §4.6: a session whose client is silent for session_ttl is cancelled and
// forgotten; one whose client beats is kept, however long.
TEST_F(BrokerCoreTest, SessionTtlExpiresOnlySilentClients) {
  const SessionId quiet = open("quiet", 10);
  const SessionId beating = open("beating", 10);
  for (int i = 0; i < 120; ++i) {  // two simulated minutes
    now_ += 500ms;
    from("beating", proto::EncodeHeartbeat(beating));
  }
  EXPECT_EQ(stats().sessions_expired.load(), 1u);
  EXPECT_EQ(stats().sessions.load(), 1u);
  from("quiet", proto::EncodeHeartbeat(quiet));
  auto reply = record_.take("quiet");
  ASSERT_FALSE(reply.empty());
  auto error = proto::DecodeError(reply.back());
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kNotFound) << "an expired session is forgotten";
}

// §3.8.3: grants are paced over the window, and a host's key is shared by
// every session. 5 per second, two sessions of 10: the 20 statements take
// about 4 simulated seconds, never six within one second, both sessions
// served throughout.
TEST_F(BrokerCoreTest, RateLimitedGrantsArePacedAndSharedInSimulatedTime) {
  ready("w", 100);
  SessionSettings s;
  s.rate_limits = {*ParseRateRule("5:1")};
  const SessionId sa = open("a", 100, s);
  const SessionId sb = open("b", 100, s);
  from("a", proto::EncodeSubmit(sa, 0, Urls(10)));
  from("b", proto::EncodeSubmit(sb, 0, Urls(10)));
  std::vector<Clock::time_point> grants;
  std::size_t in_first_half[2] = {0, 0};
  for (int step = 0; step < 10'000 && grants.size() < 20; ++step) {
    for (auto& f : record_.take("w")) {
      if (proto::PeekCommand(std::span<const zmq::message_t>(f)).value_or(proto::Command::kError) !=
          proto::Command::kDispatch) {
        continue;
      }
      const auto m = proto::DecodeStatements(f);
      for (const auto& ws : m->statements) {
        if (grants.size() < 10) ++in_first_half[m->session == sa ? 0 : 1];
        grants.push_back(now_);
        results("w", m->session, {ws.index});
      }
    }
    // The broker asks to be woken at the next grant; time jumps there.
    now_ = std::max(now_ + 1ms, core_->next_due());
    core_->pass();
  }
  ASSERT_EQ(grants.size(), 20u);
  for (std::size_t i = 5; i < grants.size(); ++i) {
    EXPECT_GT(grants[i] - grants[i - 5], 1s) << "six grants within one window";
  }
  EXPECT_LT(grants.back() - grants.front(), 4500ms) << "the allowance was not used";
  EXPECT_GE(in_first_half[0], 3u) << "session a waited on b";
  EXPECT_GE(in_first_half[1], 3u) << "session b waited on a";
}

// §3.8.3: a request counts in its key's windows until W after its answer;
// one that will never be answered (its worker died, its session ended)
// counts from when the broker gave it up. The key goes on a window later:
// it never waits for an answer that cannot come.
TEST_F(BrokerCoreTest, RequestsGivenUpLeaveTheWindowAWindowLater) {
  SessionSettings s;
  s.rate_limits = {*ParseRateRule("1:1")};
  ready("w1", 10);
  const SessionId a = open("a", 10, s);
  from("a", proto::EncodeSubmit(a, 0, Urls(1)));
  ASSERT_EQ(dispatched("w1"), (std::vector<std::uint64_t>{0}));
  ready("w2", 10);
  // w1 dies holding it: presumed dead after three silent heartbeats; the
  // statement runs again on w2 a window after that, not before, not never.
  Clock::time_point died{}, again{};
  for (int step = 0; step < 1000 && again == Clock::time_point(); ++step) {
    now_ += 10ms;
    if (step % 10 == 0) {
      from("w2", proto::EncodeHeartbeat());
      from("a", proto::EncodeHeartbeat(a));
    }
    core_->pass();
    if (died == Clock::time_point() && stats().workers.load() == 1) died = now_;
    if (!dispatched("w2").empty()) again = now_;
  }
  ASSERT_NE(died, Clock::time_point()) << "w1 never presumed dead";
  ASSERT_NE(again, Clock::time_point()) << "the key waits for an answer that cannot come";
  EXPECT_GE(again - died, 1s);
  EXPECT_LE(again - died, 1s + broker::RateLimiter::Margin(1000) + 20ms);
  // Session b shares the host's key. a is closed with its request in
  // flight on w2, never answered: b is granted a window after the close.
  const SessionId b = open("b", 10, s);
  from("b", proto::EncodeSubmit(b, 0, Urls(1)));
  EXPECT_TRUE(dispatched("w2").empty()) << "granted while a's request is in flight";
  const auto closed = now_;
  from("a", proto::Encode(proto::Command::kClose, proto::SessionRef{a}));
  Clock::time_point granted{};
  for (int step = 0; step < 1000 && granted == Clock::time_point(); ++step) {
    now_ = std::max(now_ + 1ms, core_->next_due());
    core_->pass();
    if (!dispatched("w2").empty()) granted = now_;
  }
  ASSERT_NE(granted, Clock::time_point()) << "the key waits for a's answer, which cannot come";
  EXPECT_GE(granted - closed, 1s);
  EXPECT_LE(granted - closed, 1s + broker::RateLimiter::Margin(1000) + 20ms);
}

// §4.2: a session's window is shared out between the workers, so that its
// connections across every worker process stay within it: each worker is
// told its share in SESSION and leased no more of the session than that.
TEST_F(BrokerCoreTest, TwoWorkersShareTheWindowAndEachIsToldItsShare) {
  ready("a", 1000);
  ready("b", 1000);
  const SessionId sid = open("c", 25);
  from("c", proto::EncodeSubmit(sid, 0, Urls(100)));
  Orders a = orders("a"), b = orders("b");
  ASSERT_EQ(a.shares.size(), 1u);
  ASSERT_EQ(b.shares.size(), 1u);
  EXPECT_EQ(a.shares[0] + b.shares[0], 25u);
  EXPECT_GE(std::min(a.shares[0], b.shares[0]), 12u) << "shared unevenly";
  EXPECT_EQ(a.indices.size(), a.shares[0]);
  EXPECT_EQ(b.indices.size(), b.shares[0]);
  // As results come back each worker is leased again up to its share, never past it.
  for (int round = 0; round < 3; ++round) {
    results("a", sid, a.indices);
    const Orders again = orders("a");
    EXPECT_TRUE(again.shares.empty()) << "an unchanged share is not sent again";
    EXPECT_EQ(again.indices.size(), a.shares[0]);
    EXPECT_TRUE(orders("b").indices.empty()) << "b is leased past its share";
    a.indices = again.indices;
  }
  // A window smaller than the roster: one statement, one worker.
  const SessionId one = open("d", 1);
  from("d", proto::EncodeSubmit(one, 0, Urls(3)));
  const Orders da = orders("a"), db = orders("b");
  EXPECT_EQ(da.indices.size() + db.indices.size(), 1u);
  EXPECT_EQ(da.shares.size() + db.shares.size(), 1u) << "a worker with no share of it was sent the session";
}

// §4.2: even shares, none past a worker's slots, the remainder from `first` on.
TEST(ShareOutTest, EvenNonePastItsSlotsRemainderFromFirst) {
  std::vector<std::uint32_t> shares;
  auto share = [&](std::uint32_t window, std::vector<std::uint32_t> slots, std::size_t first) {
    ShareOut(window, slots, first, shares);
    return shares;
  };
  using V = std::vector<std::uint32_t>;
  EXPECT_EQ(share(25, {1024, 1024}, 0), (V{13, 12}));
  EXPECT_EQ(share(25, {1024, 1024}, 1), (V{12, 13}));
  EXPECT_EQ(share(1, {1024, 1024, 1024}, 2), (V{0, 0, 1}));
  EXPECT_EQ(share(25, {4, 1024}, 0), (V{4, 21})) << "what a small worker cannot hold goes to the other";
  EXPECT_EQ(share(100, {10, 30, 1000}, 0), (V{10, 30, 60}));
  EXPECT_EQ(share(101, {10, 1000, 1000}, 1), (V{10, 46, 45}));
  EXPECT_EQ(share(100, {10, 20}, 0), (V{10, 20})) << "a window past every slot: each its slots";
  EXPECT_EQ(share(100'000, {1024, 1024, 2048}, 0), (V{1024, 1024, 2048}));
}

// §4.2, §3.5.4: when a worker leaves, the others' shares grow to the whole
// window again, and each is told before it is leased more; a worker that
// joins takes its share as the others' leases come back.
TEST_F(BrokerCoreTest, SharesFollowWorkersThatLeaveAndJoin) {
  ready("a", 1000);
  ready("b", 1000);
  const SessionId sid = open("c", 10);
  from("c", proto::EncodeSubmit(sid, 0, Urls(200)));
  const Orders a = orders("a");
  ASSERT_EQ(a.shares, (std::vector<std::uint32_t>{5}));
  ASSERT_EQ(orders("b").indices.size(), 5u);
  from("b", proto::EncodeEmpty(proto::Command::kDisconnect));  // b's 5 are queued again
  Orders after = orders("a");
  EXPECT_EQ(after.shares, (std::vector<std::uint32_t>{10})) << "a's share did not grow to the window";
  EXPECT_EQ(after.indices.size(), 5u) << "a holds 5 and may hold 10";
  std::vector<std::uint64_t> held = a.indices;
  held.insert(held.end(), after.indices.begin(), after.indices.end());
  ASSERT_EQ(held.size(), 10u);
  ready("c2", 1000);
  EXPECT_TRUE(orders("c2").indices.empty()) << "the window is leased out: a newcomer waits for room";
  results("a", sid, held);
  after = orders("a");
  const Orders joined = orders("c2");
  ASSERT_EQ(after.shares.size(), 1u);
  ASSERT_EQ(joined.shares.size(), 1u);
  EXPECT_EQ(after.shares[0] + joined.shares[0], 10u);
  EXPECT_EQ(after.indices.size(), after.shares[0]);
  EXPECT_EQ(joined.indices.size(), joined.shares[0]);
}

}  // namespace
}  // namespace gatherer
