// Client-side clauses of common/PROTOCOL.md (GTR/2), one test per clause,
// each named after it with the clause quoted above it
// (tests/protocol/CLAUSES.md maps every clause to its test). A raw ROUTER on
// the test thread plays the broker; the client is a real gatherer::Gatherer
// connected to it, whose gather() or stream runs on a second thread. Each
// test runs over tcp and ipc.
//
// The fake broker speaks GTR/2 as the real one does where a test does not
// say otherwise: it numbers its RESULTS per session from 1 (§3.6.1) and
// keeps them, so that it can answer a SYNC (§3.6.4); every ACK the client
// sends is checked against what was sent (an ACK never names a seq the
// client cannot have received in order, §3.6.2).

#include <algorithm>
#include <atomic>
#include <deque>
#include <iterator>
#include <map>
#include <set>
#include <thread>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/gatherer.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "raw_peer.h"
#include "socket_monitor.h"
#include "spec_util.h"
#include "statements.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using namespace testing;

std::vector<std::uint64_t> IndicesOf(const std::vector<proto::WireStatement>& statements) {
  std::vector<std::uint64_t> out;
  for (const auto& s : statements) out.push_back(s.index);
  return out;
}

// Keeps a Gatherer that cannot be destroyed (see Clause_1_3) reachable until
// the process exits, so it is neither destroyed nor reported as a leak.
void Park(std::unique_ptr<Gatherer> gatherer) {
  static auto* parked = new std::vector<Gatherer*>();
  parked->push_back(gatherer.release());
}

// One message from the client, as the broker's ROUTER sees it.
using Message = testing::Routed;

using Bodies = std::vector<std::pair<std::uint64_t, std::string>>;

class ClientSpec : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    testing::ConfigureFakeBroker(router_);
    router_.bind(dir_.endpoint(GetParam()));
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }
  void TearDown() override { (void)close(); }

  // Creates the Gatherer; its constructor connects to this fake broker.
  // Fields of options_ set by a test before (broker_timeout) are kept.
  void connect(int workers, int prefetch = 0, int log_level = 40) {
    Options o = options_;
    o.broker = endpoint_;
    o.workers = workers;
    o.prefetch = prefetch;
    o.log_level = log_level;
    o.connect_timeout = 10s;  // longer than any test: the fake broker need not answer heartbeats
    gatherer_ = std::make_unique<Gatherer>(o);
    session_ = ParseSessionId(gatherer_->session_id()).value();
  }
  // Runs gather() of `statements` on another thread; this one plays the broker.
  void start_gather(std::vector<Statement> statements) {
    gatherer_->statements = std::move(statements);
    done_.store(false);
    error_ = nullptr;
    runner_ = std::thread([this] {
      try {
        gatherer_->gather();
      } catch (...) {
        error_ = std::current_exception();
      }
      done_.store(true);
    });
  }
  // Runs a stream of `statements` in input order on another thread; what it
  // yields lands in streamed_ (read it after wait_gather()).
  void start_stream(std::vector<Statement> statements) {
    stream_list_ = std::move(statements);
    streamed_.clear();
    done_.store(false);
    error_ = nullptr;
    runner_ = std::thread([this] {
      try {
        auto stream = gatherer_->stream(stream_list_, Order::kInput);
        while (auto item = stream.next()) streamed_.push_back(std::move(*item));
      } catch (...) {
        error_ = std::current_exception();
      }
      done_.store(true);
    });
  }
  // True once gather() has returned or thrown (error_), within `timeout`.
  bool wait_gather(std::chrono::milliseconds timeout = 10s) {
    const auto deadline = Clock::now() + timeout;
    // Keeps reading, so that ACKs are checked and heartbeats answered.
    while (!done_.load()) {
      if (Clock::now() >= deadline) return false;
      if (auto m = recv_any(10ms); m && m->command != proto::Command::kHeartbeat &&
                                   m->command != proto::Command::kAck) {
        pending_.push_back(std::move(*m));
      }
    }
    runner_.join();
    return true;
  }
  // The code of the Error gather() threw, or nullopt if it returned.
  std::optional<StatusCode> gather_error() {
    if (!error_) return std::nullopt;
    try {
      std::rethrow_exception(error_);
    } catch (const Error& e) {
      return e.code();
    } catch (...) {
      ADD_FAILURE() << "gather() threw something other than gatherer::Error";
      return StatusCode::kInternal;
    }
  }
  // The message of the Error gather() threw, or "".
  std::string gather_error_message() {
    if (!error_) return "";
    try {
      std::rethrow_exception(error_);
    } catch (const std::exception& e) {
      return e.what();
    }
  }

  // Next message within `timeout`, HEARTBEAT and ACK included. Every
  // message goes through note().
  std::optional<Message> recv_any(std::chrono::milliseconds timeout = 5000ms) {
    auto m = testing::RecvRouted(router_, timeout);
    if (m) note(*m);
    return m;
  }
  // Answers every HEARTBEAT for `how_long`, as a broker that has the
  // session; fails (fatally) if the run ends meanwhile or anything else
  // comes. `beats` counts the HEARTBEATs.
  void answer_beats_for(Clock::duration how_long, int* beats = nullptr) {
    answer_beats_ = true;
    const auto start = Clock::now();
    while (Clock::now() - start < how_long) {
      ASSERT_FALSE(done_.load()) << "the run ended while the broker answered every heartbeat: "
                                 << (runner_.join(), gather_error_message());
      auto m = recv_any(50ms);
      if (m && m->command == proto::Command::kHeartbeat && beats != nullptr) ++*beats;
    }
    ASSERT_TRUE(pending_.empty()) << "unexpected message while the broker answered heartbeats";
  }
  // What the fake broker learns from a message: ACKs (checked and kept in
  // acks_), the highest index submitted, and heartbeats it answers when
  // answer_beats_ is set, as a broker that has the session (§3.2.7).
  void note(const Message& m) {
    if (m.command == proto::Command::kAck) {
      auto ack = proto::DecodeAck(m.frames);
      EXPECT_TRUE(ack.has_value()) << "malformed ACK";
      if (!ack) return;
      EXPECT_EQ(ack->session, std::optional<SessionId>(session_)) << "an ACK must name its session";
      EXPECT_LE(ack->seq, contiguous_sent()) << "ACK of a RESULTS seq the client cannot have received in order";
      acks_.push_back(ack->seq);
    } else if (m.command == proto::Command::kSync) {
      auto sync = proto::DecodeSync(m.frames);
      EXPECT_TRUE(sync.has_value()) << "malformed SYNC";
      if (sync) {
        EXPECT_LE(sync->ack, contiguous_sent()) << "SYNC acknowledges a seq that cannot have arrived in order";
      }
    } else if (m.command == proto::Command::kSubmit) {
      if (auto submit = proto::DecodeStatements(m.frames)) {
        for (const auto& ws : submit->statements) next_index_ = std::max(next_index_, ws.index + 1);
      }
    } else if (m.command == proto::Command::kHeartbeat && answer_beats_) {
      send(m.peer, proto::Encode(proto::BrokerBeat{session_, next_seq_ - 1, next_index_, 1}));
    }
  }
  // Next message other than HEARTBEAT and ACK within `timeout`: first those
  // set aside while waiting for something else (pending_).
  std::optional<Message> recv(std::chrono::milliseconds timeout = 5000ms) {
    if (!pending_.empty()) {
      Message m = std::move(pending_.front());
      pending_.pop_front();
      return m;
    }
    const auto deadline = Clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      if (left <= 0ms) return std::nullopt;
      auto m = recv_any(left);
      if (m && m->command != proto::Command::kHeartbeat && m->command != proto::Command::kAck) return m;
    }
  }
  // The next message other than HEARTBEAT and ACK, which must be `command`;
  // notes the client's routing id.
  Message expect(proto::Command command, std::chrono::milliseconds timeout = 5000ms) {
    auto m = recv(timeout);
    if (!m) {
      ADD_FAILURE() << "no message; expected " << proto::CommandName(command);
      return {};
    }
    EXPECT_EQ(m->command, command);
    peer_ = m->peer;
    return std::move(*m);
  }
  // The next SYNC, decoded (an empty one if none came).
  proto::Sync expect_sync(std::chrono::milliseconds timeout = 5000ms) {
    Message m = expect(proto::Command::kSync, timeout);
    auto sync = proto::DecodeSync(m.frames);
    EXPECT_TRUE(sync.has_value());
    if (!sync) return {};
    EXPECT_EQ(sync->session, session_);
    return *sync;
  }
  // Waits for the client's next HEARTBEAT (others are set aside in pending_).
  bool expect_beat(std::chrono::milliseconds timeout = 3000ms) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      auto m = recv_any(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      if (!m) continue;
      if (m->command == proto::Command::kHeartbeat) return true;
      if (m->command != proto::Command::kAck) pending_.push_back(std::move(*m));
    }
    ADD_FAILURE() << "no HEARTBEAT within " << timeout.count() << " ms";
    return false;
  }
  // Waits until the client has sent `count` ACKs in all (others are set
  // aside in pending_); the last one is acks_.back().
  bool wait_acks(std::size_t count, std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = Clock::now() + timeout;
    while (acks_.size() < count && Clock::now() < deadline) {
      auto m = recv_any(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      if (m && m->command != proto::Command::kHeartbeat && m->command != proto::Command::kAck) {
        pending_.push_back(std::move(*m));
      }
    }
    return acks_.size() >= count;
  }
  // Waits until an ACK of at least `seq` has come.
  bool wait_ack(std::uint64_t seq, std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = Clock::now() + timeout;
    while (acks_.empty() || acks_.back() < seq) {
      if (Clock::now() >= deadline) {
        ADD_FAILURE() << "no ACK of " << seq << " within " << timeout.count() << " ms (last: "
                      << (acks_.empty() ? 0 : acks_.back()) << ")";
        return false;
      }
      auto m = recv_any(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      if (m && m->command != proto::Command::kHeartbeat && m->command != proto::Command::kAck) {
        pending_.push_back(std::move(*m));
      }
    }
    return true;
  }
  // True if a message of `command` was set aside in pending_.
  bool pending(proto::Command command) const {
    return std::any_of(pending_.begin(), pending_.end(), [&](const Message& m) { return m.command == command; });
  }
  // Receives SUBMITs of this session until `n` statements came.
  std::vector<proto::WireStatement> recv_statements(std::size_t n) {
    std::vector<proto::WireStatement> out;
    while (out.size() < n) {
      auto m = recv();
      if (!m || m->command != proto::Command::kSubmit) {
        ADD_FAILURE() << "expected SUBMIT after " << out.size() << " of " << n << " statements";
        break;
      }
      peer_ = m->peer;
      auto submit = proto::DecodeStatements(m->frames);
      EXPECT_TRUE(submit.has_value());
      if (!submit) break;
      EXPECT_EQ(submit->session, session_);
      for (auto& ws : submit->statements) out.push_back(std::move(ws));
    }
    return out;
  }
  void send(const std::string& peer, proto::Frames&& frames) {
    // The transport's send tells ThreadSanitizer about the hand-off to
    // ZeroMQ's I/O thread (libzmq is not instrumented).
    proto::SendMessage(router_, peer, frames, /*block=*/true);
  }
  // OPENED with the heartbeat period the client is to use: tests that wait
  // for heartbeats (or for their absence) set a short one and scale their
  // bounds by it, rather than wait out whole seconds.
  void send_opened(std::chrono::milliseconds beat = 1000ms) {
    send(peer_, proto::Encode(proto::Opened{session_, static_cast<std::uint32_t>(beat.count()), 10000}));
  }
  // A gather of `n` statements with this broker timeout, opened with this
  // heartbeat period, its statements received: the start of the tests of
  // how a client judges a silent broker (§3.2.9, §3.3.1).
  void start_timed_gather(std::chrono::milliseconds broker_timeout, std::chrono::milliseconds beat, int n) {
    options_.broker_timeout = broker_timeout;
    connect(10);
    start_gather(Urls(n));
    expect(proto::Command::kOpen);
    send_opened(beat);
  }

  // A RESULTS of this session numbered `seq`, not counted as sent.
  proto::Frames encode_wire(std::vector<proto::WireResult> results, std::uint64_t seq) {
    return proto::Encode(proto::Results{session_, seq, std::move(results)});
  }
  proto::Frames encode_results(const Bodies& bodies, std::uint64_t seq) {
    std::vector<proto::WireResult> results;
    for (const auto& [index, body] : bodies) {
      proto::WireResult wr;
      wr.index = index;
      wr.response.status = 200;
      wr.response.body = body;
      results.push_back(std::move(wr));
    }
    return encode_wire(std::move(results), seq);
  }
  // The session's next RESULTS (§3.6.1): numbered, kept until a SYNC
  // acknowledges it, and counted as sent. Send it, or lose it on purpose.
  proto::Frames results_of(std::vector<proto::WireResult> results) {
    const std::uint64_t seq = next_seq_++;
    proto::Frames frames = encode_wire(std::move(results), seq);
    kept_[seq] = proto::CopyFrames(frames);
    sent_.insert(seq);
    return frames;
  }
  proto::Frames results(const Bodies& bodies) {
    proto::Frames frames = encode_results(bodies, next_seq_);
    kept_[next_seq_] = proto::CopyFrames(frames);
    sent_.insert(next_seq_++);
    return frames;
  }
  void send_results(const Bodies& bodies) { send(peer_, results(bodies)); }
  // Sends again the kept RESULTS numbered `seq`.
  void send_again(std::uint64_t seq) { send(peer_, proto::CopyFrames(kept_.at(seq))); }
  // Answers a SYNC as the broker does (§3.6.4): forgets the kept RESULTS up
  // to its ack, sends the others again in order, then SYNCED naming
  // `missing` (the listed statements this broker never received) and the
  // seq of the last RESULTS it sent.
  void answer_sync(const proto::Sync& sync, std::vector<proto::IndexRange> missing) {
    kept_.erase(kept_.begin(), kept_.upper_bound(sync.ack));
    for (auto& [seq, frames] : kept_) send(peer_, proto::CopyFrames(frames));
    send(peer_, proto::Encode(proto::Synced{session_, std::move(missing), next_seq_ - 1}));
  }
  // The broker's session is new (a re-open after not_found, §3.2.8): its
  // RESULTS are numbered from 1 again.
  void restart_seqs() {
    next_seq_ = 1;
    sent_.clear();
    kept_.clear();
  }
  // The highest seq up to which every RESULTS has been sent (lost ones count
  // as sent: the client may have them after a SYNC).
  std::uint64_t contiguous_sent() const {
    std::uint64_t n = 0;
    while (sent_.count(n + 1)) ++n;
    return n;
  }
  void send_not_found() {
    send(peer_, proto::Encode(proto::ErrorReply{StatusCode::kNotFound, "session not open", session_}));
  }
  std::vector<std::string> bodies() const {
    std::vector<std::string> out;
    for (const auto& r : gatherer_->responses) out.push_back(r.body);
    return out;
  }
  // The broker's ROUTER goes away and a new one is bound at the same
  // endpoint (a broker restarted in place, or every connection dropped).
  void replace_router() {
    ASSERT_TRUE(testing::ReplaceRouter(ctx_, router_, endpoint_)) << "cannot bind " << endpoint_ << " again";
  }

  // Ends the client: cancels a gather() still running, then destroys the
  // Gatherer while answering its CLOSE. Returns what it sent before CLOSE
  // other than HEARTBEAT and ACK.
  std::vector<Message> close() {
    std::vector<Message> seen;
    if (runner_.joinable()) {
      if (!done_.load()) gatherer_->cancel();
      EXPECT_TRUE(WaitFor([&] { return done_.load(); }, 10s)) << "gather() ignored cancel()";
      runner_.join();
    }
    if (!gatherer_) return seen;
    for (auto& m : pending_) seen.push_back(std::move(m));
    pending_.clear();
    std::atomic<bool> closed{false};
    std::thread closer([&] {
      gatherer_.reset();
      closed.store(true);
    });
    const auto deadline = Clock::now() + 10s;
    bool close_seen = false;
    while (!closed.load() && Clock::now() < deadline) {
      auto m = recv_any(20ms);
      if (!m) continue;
      if (m->command == proto::Command::kClose) {
        close_seen = true;
        send(m->peer, proto::Encode(proto::Command::kClosed, proto::SessionRef{session_}));
      } else if (!close_seen && m->command != proto::Command::kHeartbeat && m->command != proto::Command::kAck) {
        seen.push_back(std::move(*m));
      }
    }
    closer.join();
    return seen;
  }

  testing::IpcDir dir_;
  zmq::context_t ctx_{1};
  zmq::socket_t router_{ctx_, zmq::socket_type::router};
  std::string endpoint_;
  Options options_;
  std::unique_ptr<Gatherer> gatherer_;
  SessionId session_;
  std::string peer_;  // routing id of the client's connection
  std::thread runner_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;  // written by runner_ before done_, read after join
  std::vector<Statement> stream_list_;
  std::vector<Indexed> streamed_;  // written by runner_ before done_, read after join
  // The fake broker's state: messages set aside, ACKs received, RESULTS
  // numbering (§3.6.1) and the highest index submitted (for HEARTBEAT).
  std::deque<Message> pending_;
  std::vector<std::uint64_t> acks_;
  std::uint64_t next_seq_ = 1;
  std::set<std::uint64_t> sent_;
  std::map<std::uint64_t, proto::Frames> kept_;
  std::uint64_t next_index_ = 0;
  bool answer_beats_ = false;
};

// 1.1 "Clients and workers SHALL connect a DEALER socket."
TEST_P(ClientSpec, Clause_1_1_ClientConnectsADealer) {
  connect(1);
  Message open = expect(proto::Command::kOpen);
  ASSERT_FALSE(open.frames.empty());
  EXPECT_STREQ(open.frames[0].gets("Socket-Type"), "DEALER");
}

// 1.3 "Every peer SHALL set ZMQ_MAXMSGSIZE to at most 256 MiB (§5). ZeroMQ
// then closes the connection of a peer that sends a larger message."
TEST_P(ClientSpec, Clause_1_3_FrameOver256MiBClosesTheConnection) {
  connect(1);
  expect(proto::Command::kOpen);
  testing::SocketMonitor monitor(ctx_, router_, ZMQ_EVENT_DISCONNECTED);
  proto::Frames big = encode_results({{0, ""}}, next_seq_);
  big[4] = testing::ZeroPagesMessage((std::size_t{256} << 20) + 1);
  send(peer_, std::move(big));
  EXPECT_TRUE(monitor.wait_for(ZMQ_EVENT_DISCONNECTED, 10s)) << "the client took a frame over 256 MiB";
  // libzmq takes the oversized frame for a protocol error and never connects
  // that DEALER again; the Gatherer's sends block while it has no
  // connection, so its destructor would wait forever. It is parked instead.
  Park(std::move(gatherer_));
}

// 2.4 "A receiver SHALL treat as malformed: fewer than 3 frames; a header
// that is not exactly one msgpack value (trailing bytes count); a header of
// the wrong type or with fields of the wrong type; more frames than the
// command allows. A malformed message SHALL be dropped (...). It MUST NOT
// crash the receiver, and MUST NOT change any session's state."
TEST_P(ClientSpec, Clause_2_4_MalformedMessagesAreDropped) {
  connect(1);
  start_gather(Urls(1));
  expect(proto::Command::kOpen);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  // Each would answer statement 0 with "bad" if it were taken.
  std::vector<proto::Frames> bad;
  bad.emplace_back();
  bad.back().emplace_back("garbage", 7);
  bad.push_back(encode_results({{0, "bad"}}, next_seq_));
  bad.back()[0] = zmq::message_t("GTX\x01", 4);
  bad.push_back(encode_results({{0, "bad"}}, next_seq_));
  bad.back()[0] = zmq::message_t("GTR\x07", 4);
  bad.push_back(encode_results({{0, "bad"}}, next_seq_));
  testing::AppendToHeader(bad.back(), std::string("\xc0", 1));
  bad.push_back(encode_results({{0, "bad"}}, next_seq_));
  bad.back().emplace_back("extra", 5);
  bad.push_back(encode_results({{0, "bad"}}, next_seq_));
  bad.back().resize(2);
  bad.push_back(testing::Raw(proto::Command::kResults, [&](Packer& pk) {
    pk.pack_array(2);
    pk.pack(7);  // session id of the wrong type
    pk.pack_array(0);
  }));
  for (auto& f : bad) send(peer_, std::move(f));
  send_results({{0, "good"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  EXPECT_EQ(bodies(), (std::vector<std::string>{"good"}));
}

// 2.4 "A malformed message SHALL be dropped, counted and logged
// (rate-limited, at most one line per second per process)."
// The one clause about logging, so the one test that reads log lines.
TEST_P(ClientSpec, Clause_2_4_MalformedMessagesAreLoggedAtMostOncePerSecond) {
  testing::LogCapture log("malformed");
  connect(1, 0, /*log_level=*/30);
  start_gather(Urls(1));
  expect(proto::Command::kOpen);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) {
    proto::Frames garbage;
    garbage.emplace_back("garbage", 7);
    send(peer_, std::move(garbage));
  }
  send_results({{0, "ok"}});
  ASSERT_TRUE(wait_gather());
  EXPECT_EQ(gatherer_->malformed_messages(), 50u);
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - start);
  (void)close();  // nothing logs after this, so the capture may go
  EXPECT_GE(log.lines(), 1u) << "malformed messages were not logged";
  EXPECT_LE(log.lines(), 1u + seconds.count()) << "50 malformed messages, " << log.lines() << " log lines";
}

// 2.4 "... It MUST NOT crash the receiver, and MUST NOT change any session's
// state." A malformed OPENED must not end the wait for OPENED after a
// re-open (3.2.8): a stale not_found after it is still ignored.
TEST_P(ClientSpec, Clause_2_4_MalformedOpenedLeavesTheReopenPending) {
  connect(10);
  start_gather(Urls(2));
  expect(proto::Command::kOpen);
  ASSERT_EQ(IndicesOf(recv_statements(2)), (std::vector<std::uint64_t>{0, 1}));
  send_not_found();
  expect(proto::Command::kOpen);
  ASSERT_EQ(IndicesOf(recv_statements(2)), (std::vector<std::uint64_t>{0, 1}));
  proto::Frames trailing = proto::Encode(proto::Opened{session_, 1000, 10000});
  testing::AppendToHeader(trailing, std::string("\xc0", 1));
  send(peer_, std::move(trailing));
  send(peer_, testing::Raw(proto::Command::kOpened, [](Packer& pk) { pk.pack_map(0); }));
  proto::Frames extra = proto::Encode(proto::Opened{session_, 1000, 10000});
  extra.emplace_back("extra", 5);
  send(peer_, std::move(extra));
  send_not_found();  // answers the SUBMIT before the re-open: stale
  restart_seqs();
  send_opened();
  send_results({{0, "a"}, {1, "b"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  for (const Message& m : close()) {
    EXPECT_NE(m.command, proto::Command::kOpen)
        << "a malformed OPENED ended the wait, so the stale not_found re-opened the session";
  }
}

// 3.1 "`error_code` 0 means success; other values are the status codes of
// common/include/gatherer/status.h (...). A receiver SHALL map an unknown
// code to `internal`."
TEST_P(ClientSpec, Clause_3_1_UnknownErrorCodeIsInternal) {
  connect(1);
  start_gather(Urls(1));
  expect(proto::Command::kOpen);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  std::vector<proto::WireResult> r(1);
  r[0].index = 0;
  r[0].response.error = ResponseError{static_cast<StatusCode>(200), "from a newer worker"};
  send(peer_, results_of(std::move(r)));
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  ASSERT_TRUE(gatherer_->responses.at(0).error.has_value());
  EXPECT_EQ(gatherer_->responses[0].error->code, StatusCode::kInternal);
  EXPECT_EQ(gatherer_->responses[0].error->message, "from a newer worker");
  // The same in an ERROR: the gather fails as internal.
  start_gather(Urls(1));
  ASSERT_EQ(recv_statements(1).size(), 1u);
  send(peer_, proto::Encode(proto::ErrorReply{static_cast<StatusCode>(99), "from a newer broker", session_}));
  ASSERT_TRUE(wait_gather());
  EXPECT_EQ(gather_error(), StatusCode::kInternal);
}

// 3.2.1 "A client SHALL send OPEN before any SUBMIT of a session."
TEST_P(ClientSpec, Clause_3_2_1_OpenComesBeforeAnySubmit) {
  connect(2);
  start_gather(Urls(3));
  // This broker never answers OPENED: the order alone is checked.
  Message first = expect(proto::Command::kOpen);
  ASSERT_EQ(first.command, proto::Command::kOpen) << "the first message is not OPEN";
  auto open = proto::DecodeOpen(first.frames);
  ASSERT_TRUE(open.has_value());
  EXPECT_EQ(open->session, session_);
  EXPECT_EQ(open->settings.workers, 2u);
  EXPECT_EQ(IndicesOf(recv_statements(3)), (std::vector<std::uint64_t>{0, 1, 2}));
  send_results({{0, "a"}, {1, "b"}, {2, "c"}});
  ASSERT_TRUE(wait_gather());
  EXPECT_EQ(bodies(), (std::vector<std::string>{"a", "b", "c"}));
}

// 3.2.2 "The `index` of a statement is its position in the session's
// sequence of submitted statements, starting at 0 and never reused within a
// session. A client that calls gather() several times continues the
// numbering, so results of an earlier cancelled batch can be told apart by
// index."
TEST_P(ClientSpec, Clause_3_2_2_IndicesContinueAcrossGathers) {
  connect(5);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  EXPECT_EQ(IndicesOf(recv_statements(3)), (std::vector<std::uint64_t>{0, 1, 2}));
  send_results({{0, "a"}, {1, "b"}, {2, "c"}});
  ASSERT_TRUE(wait_gather());
  start_gather(Urls(2));
  EXPECT_EQ(IndicesOf(recv_statements(2)), (std::vector<std::uint64_t>{3, 4}));
  send_results({{3, "d"}, {4, "e"}});
  ASSERT_TRUE(wait_gather());
  EXPECT_EQ(bodies(), (std::vector<std::string>{"d", "e"}));
}

// 3.2.3 "A client SHALL keep at most `workers + prefetch` statements
// submitted and unanswered."
// "r<i>", built with += : GCC 12 at -O3 warns (-Wrestrict, a false positive)
// on "r" + std::to_string(i).
std::string Reply(std::uint64_t i) {
  std::string out = "r";
  out += std::to_string(i);
  return out;
}

TEST_P(ClientSpec, Clause_3_2_3_AtMostWindowPlusPrefetchUnanswered) {
  constexpr std::size_t kLimit = 2 + 3;
  constexpr std::size_t kTotal = 20;
  connect(2, 3);
  start_gather(Urls(static_cast<int>(kTotal)));
  expect(proto::Command::kOpen);
  std::deque<std::uint64_t> unanswered;
  for (const auto& s : recv_statements(kLimit)) unanswered.push_back(s.index);
  ASSERT_EQ(unanswered.size(), kLimit);
  EXPECT_FALSE(recv(300ms).has_value()) << "more than workers + prefetch submitted";
  std::size_t submitted = kLimit;
  // One answer frees one place, taken by exactly one statement.
  for (int round = 0; round < 3; ++round) {
    send_results({{unanswered.front(), Reply(unanswered.front())}});
    unanswered.pop_front();
    auto refill = recv_statements(1);
    ASSERT_EQ(refill.size(), 1u) << "one answer, more than one new statement";
    EXPECT_FALSE(recv(200ms).has_value()) << "one answer, more than one new statement";
    unanswered.push_back(refill[0].index);
    ++submitted;
  }
  // The rest, a window at a time.
  while (!unanswered.empty()) {
    std::vector<std::pair<std::uint64_t, std::string>> answers;
    for (auto i : unanswered) answers.emplace_back(i, Reply(i));
    unanswered.clear();
    send_results(answers);
    const std::size_t refill = std::min(kLimit, kTotal - submitted);
    for (const auto& s : recv_statements(refill)) unanswered.push_back(s.index);
    ASSERT_EQ(unanswered.size(), refill);
    submitted += refill;
  }
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  ASSERT_EQ(gatherer_->responses.size(), kTotal);
  for (std::size_t i = 0; i < kTotal; ++i) EXPECT_EQ(gatherer_->responses[i].body, Reply(i));
}

// 3.2.7 "While it waits for results a client SHALL send HEARTBEAT [session]
// once per heartbeat period (default 1 s)."
TEST_P(ClientSpec, Clause_3_2_7_HeartbeatNamesTheSessionOncePerPeriod) {
  constexpr auto kPeriod = 300ms;
  connect(1);
  start_gather(Urls(1));
  expect(proto::Command::kOpen);
  send_opened(kPeriod);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  std::vector<std::chrono::steady_clock::time_point> beats;
  const auto deadline = std::chrono::steady_clock::now() + 6s;
  while (beats.size() < 6) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    auto m = left > 0ms ? recv_any(left) : std::nullopt;
    ASSERT_TRUE(m.has_value()) << "only " << beats.size() << " heartbeats in 6 s";
    ASSERT_EQ(m->command, proto::Command::kHeartbeat) << "unexpected message while waiting for results";
    auto named = proto::DecodeHeartbeat(m->frames);
    ASSERT_TRUE(named.has_value());
    ASSERT_TRUE(named->has_value()) << "a client's HEARTBEAT is not the plain [] of a worker";
    EXPECT_EQ((*named)->session, session_) << "HEARTBEAT does not name the session";
    beats.push_back(std::chrono::steady_clock::now());
    // As a broker that has the session (§3.2.7): no RESULTS sent yet, one
    // past the highest index received, one worker.
    send(m->peer, proto::Encode(proto::BrokerBeat{session_, 0, 1, 1}));
  }
  // The mean gap, which one late delivery (a sanitizer's) does not move
  // much, is the period; no gap is several periods long.
  const auto mean = (beats.back() - beats.front()) / static_cast<int>(beats.size() - 1);
  EXPECT_GE(mean, kPeriod * 7 / 10) << "more than one HEARTBEAT per period";
  EXPECT_LE(mean, kPeriod * 2) << "periods without HEARTBEAT";
  for (std::size_t i = 1; i < beats.size(); ++i) {
    EXPECT_LE(beats[i] - beats[i - 1], kPeriod * 4) << "a HEARTBEAT missing for several periods";
  }
  send_results({{0, "ok"}});
  ASSERT_TRUE(wait_gather());
}

// 3.2.8 "On ERROR `not_found` naming its session (...), a client SHALL send
// OPEN for the same session id and then SUBMIT again every statement it has
// sent and not been answered, with the same indices. Until OPENED arrives,
// it SHALL ignore further `not_found` errors for the session (they answer
// messages sent before the OPEN). Results it already holds stay; late
// duplicates are dropped by index (§3.3.2)."
TEST_P(ClientSpec, Clause_3_2_8_ReopenAndResubmitTheUnansweredOnNotFound) {
  connect(10);
  const std::vector<Statement> statements = Urls(4);
  start_gather(statements);
  expect(proto::Command::kOpen);
  send(peer_, proto::Encode(proto::Opened{session_, 1000, 10000}));
  ASSERT_EQ(IndicesOf(recv_statements(4)), (std::vector<std::uint64_t>{0, 1, 2, 3}));
  send_results({{0, "r0"}, {2, "r2"}});
  send_not_found();
  Message reopen = expect(proto::Command::kOpen);
  EXPECT_EQ(proto::DecodeOpen(reopen.frames)->session, session_);
  auto again = recv_statements(2);
  ASSERT_EQ(IndicesOf(again), (std::vector<std::uint64_t>{1, 3}));
  EXPECT_EQ(again[0].statement.url, statements[1].url);
  EXPECT_EQ(again[1].statement.url, statements[3].url);
  // A stale not_found before OPENED is ignored ...
  send_not_found();
  restart_seqs();  // the broker's new session numbers its RESULTS from 1
  send_opened();
  send_results({{0, "late duplicate"}, {1, "r1"}});
  // ... one after OPENED is not: only 3 is unanswered now. (Had the stale
  // one been taken, this OPEN would be followed by 1 and 3.)
  send_not_found();
  expect(proto::Command::kOpen);
  EXPECT_EQ(IndicesOf(recv_statements(1)), (std::vector<std::uint64_t>{3}));
  restart_seqs();
  send_opened();
  send_results({{3, "r3"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
  for (const Message& m : close()) {
    ADD_FAILURE() << "sent " << (m.command ? proto::CommandName(*m.command) : "a malformed message")
                  << " after the last OPENED";
  }
}

// 3.3.2 "Results MAY arrive in any order and in batches of any size. A client
// SHALL place each result at its index and SHALL drop a result whose index it
// already has or that is outside the batch it is gathering (exactly-once
// delivery: a result may arrive twice after §3.6, and is used once)."
TEST_P(ClientSpec, Clause_3_3_2_DuplicateAndOutOfBatchResultsAreDropped) {
  connect(10);
  start_gather(Urls(2));
  expect(proto::Command::kOpen);
  ASSERT_EQ(recv_statements(2).size(), 2u);
  send_results({{1, "old1"}, {0, "old0"}});
  ASSERT_TRUE(wait_gather());
  start_gather(Urls(3));
  ASSERT_EQ(IndicesOf(recv_statements(3)), (std::vector<std::uint64_t>{2, 3, 4}));
  send_results({{3, "b"}});
  send_results({{0, "from the earlier batch"}, {3, "duplicate"}});
  send_results({{9, "beyond the batch"}});
  send_results({{4, "c"}, {2, "a"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  EXPECT_EQ(bodies(), (std::vector<std::string>{"a", "b", "c"}));
}

// ---- GTR/2 -----------------------------------------------------------------

// 1.5 "A client SHALL set ZMQ_ROUTING_ID to the byte `c` followed by the 16
// bytes of its session id (...)."
TEST_P(ClientSpec, Clause_1_5_RoutingIdIsCFollowedByTheSessionId) {
  connect(1);
  Message open = expect(proto::Command::kOpen);
  EXPECT_EQ(open.peer, "c" + std::string(session_.raw())) << "the routing frame the broker's ROUTER sees";
}

// 1.6 "A client or worker SHALL watch its socket's connections
// (`zmq_socket_monitor`, `ZMQ_EVENT_HANDSHAKE_SUCCEEDED`) and resynchronise
// (§3.6, §3.7) as soon as a connection after the first one completes its
// handshake: whatever was in flight on the old connection may be lost, in
// either direction."
// 3.6.3 "A client SHALL resynchronise with SYNC when (a) its connection to
// the broker has been made again (§1.6) (...). SYNC carries the client's
// `ack` and every index it submitted in its current run and has not been
// answered, as ranges."
TEST_P(ClientSpec, Clause_1_6_ClientSendsSyncWhenItsConnectionIsMadeAgain) {
  connect(10);
  start_gather(Urls(4));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(IndicesOf(recv_statements(4)), (std::vector<std::uint64_t>{0, 1, 2, 3}));
  send_results({{0, "r0"}});
  send_results({{2, "r2"}});
  ASSERT_TRUE(wait_ack(2));
  ASSERT_FALSE(pending(proto::Command::kSync)) << "SYNC before any reconnect";
  replace_router();
  const proto::Sync sync = expect_sync(10s);
  EXPECT_EQ(peer_, "c" + std::string(session_.raw())) << "a new connection under another routing id (§1.5)";
  EXPECT_EQ(sync.ack, 2u);
  EXPECT_EQ(Expand(sync.unanswered), (std::vector<std::uint64_t>{1, 3}));
  answer_sync(sync, {});
  send_results({{1, "r1"}, {3, "r3"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
}

// 3.6.2 "A client SHALL acknowledge with ACK `[session, ack]`, where `ack` is
// the highest seq up to which it has received every RESULTS of the session,
// at least once per pass over the messages it has received."
// (Every ACK is also checked against what was sent, in note().)
TEST_P(ClientSpec, Clause_3_6_2_AckNamesTheHighestSeqReceivedWithoutAGap) {
  connect(10);
  start_gather(Urls(5));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(5).size(), 5u);
  send_results({{0, "r0"}});
  ASSERT_TRUE(wait_ack(1));
  send_results({{1, "r1"}});
  send_results({{2, "r2"}});
  ASSERT_TRUE(wait_ack(3));
  proto::Frames lost = results({{3, "r3"}});  // seq 4, lost on the way
  send_results({{4, "r4"}});                  // seq 5, past the gap
  // The gap makes the client SYNC (§3.6.3 b), carrying its ack: still 3.
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 3u) << "a RESULTS past a gap advanced the ack";
  EXPECT_EQ(acks_.back(), 3u);
  send(peer_, std::move(lost));
  ASSERT_TRUE(wait_ack(4));
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3", "r4"}));
  EXPECT_TRUE(std::is_sorted(acks_.begin(), acks_.end())) << "ACKs went backwards";
}

// 3.6.3 "A client SHALL resynchronise with SYNC when (...) (b) a RESULTS
// arrives whose seq is past the next one it expects (...)."
// 3.6.4 "On SYNC the broker SHALL (...) send again every other kept
// RESULTS, in order and with its seq, and then answer SYNCED (...)."
TEST_P(ClientSpec, Clause_3_6_3_ResultsPastAGapMakeTheClientSync) {
  connect(10);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(3).size(), 3u);
  send_results({{0, "r0"}});           // seq 1
  (void)results({{1, "r1"}});          // seq 2, lost
  send_results({{2, "r2"}});           // seq 3
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 1u);
  const auto unanswered = Expand(sync.unanswered);
  EXPECT_TRUE(std::find(unanswered.begin(), unanswered.end(), 1) != unanswered.end())
      << "the lost statement is not listed (the exact list: Clause_3_6_3_SyncListsOnlyUnansweredIndices)";
  answer_sync(sync, {});  // seq 2 and 3 again, then SYNCED []
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2"}));
}

// 3.6.3 "(...) SYNC carries the client's `ack` and every index it submitted
// in its current run and has not been answered, as ranges."
// An index answered in the very RESULTS whose seq shows the gap has been
// answered: it is not listed.
TEST_P(ClientSpec, Clause_3_6_3_SyncListsOnlyUnansweredIndices) {
  connect(10);
  start_gather(Urls(4));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(4).size(), 4u);
  send_results({{0, "r0"}});   // seq 1
  (void)results({{1, "r1"}});  // seq 2, lost
  send_results({{2, "r2"}});   // seq 3: past the gap, answers 2
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 1u);
  EXPECT_EQ(Expand(sync.unanswered), (std::vector<std::uint64_t>{1, 3}))
      << "index 2, answered by the RESULTS that showed the gap, is listed as unanswered";
  answer_sync(sync, {});
  send_results({{3, "r3"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
}

// 3.6.3 "A client SHALL resynchronise with SYNC when (...) (c) the broker's
// HEARTBEAT names a `seq` past the highest it has received (everything the
// broker sent before that answer has arrived, so a RESULTS not seen was
// lost) (...)."
TEST_P(ClientSpec, Clause_3_6_3_HeartbeatNamingAnUnseenSeqMakesTheClientSync) {
  connect(10);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  send_opened(250ms);  // heartbeats come sooner
  ASSERT_EQ(recv_statements(3).size(), 3u);
  send_results({{0, "r0"}});
  ASSERT_TRUE(wait_ack(1));
  // An answer naming what arrived changes nothing. The ACK of the RESULTS
  // sent after it shows the client has read it: no SYNC came before.
  ASSERT_TRUE(expect_beat());
  send(peer_, proto::Encode(proto::BrokerBeat{session_, 1, 3, 1}));
  send_results({{1, "r1"}});
  ASSERT_TRUE(wait_ack(2));
  ASSERT_FALSE(pending(proto::Command::kSync)) << "SYNC on a heartbeat naming a seq that arrived";
  (void)results({{2, "r2"}});  // seq 3, lost
  ASSERT_TRUE(expect_beat());
  send(peer_, proto::Encode(proto::BrokerBeat{session_, 3, 3, 1}));
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 2u);
  EXPECT_EQ(Expand(sync.unanswered), (std::vector<std::uint64_t>{2}));
  answer_sync(sync, {});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2"}));
}

// 3.6.3 "A client SHALL resynchronise with SYNC when (...) (d) that
// HEARTBEAT's `next_index` (one past the highest index the broker has
// received) is at or below an index the client submitted before its
// HEARTBEAT and has not been answered (that SUBMIT was lost)."
TEST_P(ClientSpec, Clause_3_6_3_HeartbeatShowingALostSubmitMakesTheClientSync) {
  connect(10);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  send_opened(250ms);  // heartbeats come sooner
  ASSERT_EQ(recv_statements(3).size(), 3u);
  // The HEARTBEAT comes after the SUBMITs on the one connection.
  ASSERT_TRUE(expect_beat());
  send(peer_, proto::Encode(proto::BrokerBeat{session_, 0, 3, 1}));  // 0, 1, 2 all received
  send_results({{0, "r0"}});
  ASSERT_TRUE(wait_ack(1));
  ASSERT_FALSE(pending(proto::Command::kSync)) << "SYNC although the broker has every index";
  ASSERT_TRUE(expect_beat());
  // One past the highest index received is 2: index 2, unanswered, is lost.
  send(peer_, proto::Encode(proto::BrokerBeat{session_, 1, 2, 1}));
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 1u);
  EXPECT_EQ(Expand(sync.unanswered), (std::vector<std::uint64_t>{1, 2}));
  answer_sync(sync, {{2, 1}});
  EXPECT_EQ(IndicesOf(recv_statements(1)), (std::vector<std::uint64_t>{2}));
  send_results({{1, "r1"}, {2, "r2"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2"}));
}

// 3.6.3 "A client SHALL NOT send another SYNC until SYNCED arrives, or two
// heartbeat periods have passed without it (the answer was lost)."
TEST_P(ClientSpec, Clause_3_6_3_NoSecondSyncBeforeSyncedOrTwoPeriods) {
  constexpr auto kPeriod = 300ms;
  connect(10);
  start_gather(Urls(5));
  expect(proto::Command::kOpen);
  send_opened(kPeriod);
  ASSERT_EQ(recv_statements(5).size(), 5u);
  send_results({{0, "r0"}});   // seq 1
  (void)results({{1, "r1"}});  // seq 2, lost for now
  send_results({{2, "r2"}});   // seq 3: a gap
  const proto::Sync first = expect_sync();
  const auto first_at = Clock::now();
  EXPECT_EQ(first.ack, 1u);
  (void)results({{4, "r4"}});  // seq 4, lost
  send_results({{3, "r3"}});   // seq 5: another gap, while the SYNC is unanswered
  send_again(2);               // seq 2 in order: its ACK shows seq 5 was read
  ASSERT_TRUE(wait_ack(2));
  ASSERT_FALSE(pending(proto::Command::kSync)) << "a second SYNC before SYNCED";
  // SYNCED never comes (lost): after two periods the client asks again,
  // and nothing else comes in between (expect fails on any other message).
  const proto::Sync second = expect_sync(6s);
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - first_at);
  // Checked once per period: asked again two to three periods later.
  // (Measured from when the first SYNC arrived here, which a sanitizer may delay.)
  EXPECT_GE(waited, kPeriod * 3 / 2) << "the SYNC was asked again before two heartbeat periods";
  EXPECT_LE(waited, kPeriod * 5) << "an unanswered SYNC was not asked again after two periods";
  EXPECT_EQ(second.ack, 2u);
  EXPECT_EQ(Expand(second.unanswered), (std::vector<std::uint64_t>{4}));
  answer_sync(second, {});  // seq 3, 4, 5 again
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3", "r4"}));
}

// 3.6.4 "(...) answer SYNCED with the listed indices it has no trace of
// (...). Those SUBMITs never arrived. The client SHALL submit them again,
// with their indices; a statement that is not idempotent is included, as it
// cannot have run."
TEST_P(ClientSpec, Clause_3_6_4_ClientSubmitsAgainWhatSyncedNamesPostsIncluded) {
  std::vector<Statement> statements = Urls(4);
  for (std::size_t i : {1u, 3u}) {
    statements[i].method = "POST";
    statements[i].body = "body" + std::to_string(i);
  }
  connect(10);
  start_stream(statements);
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(4).size(), 4u);
  (void)results({{2, "r2"}});  // seq 1, lost
  send_results({{0, "r0"}});   // seq 2: a gap
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 0u);
  const auto unanswered = Expand(sync.unanswered);
  for (std::uint64_t i : {1, 2, 3}) {
    EXPECT_TRUE(std::find(unanswered.begin(), unanswered.end(), i) != unanswered.end()) << i << " not listed";
  }
  // The broker never received 1 and 3 (2 is in a kept RESULTS).
  answer_sync(sync, {{1, 1}, {3, 1}});
  const auto again = recv_statements(2);
  ASSERT_EQ(IndicesOf(again), (std::vector<std::uint64_t>{1, 3}));
  for (const auto& ws : again) {
    EXPECT_EQ(ws.statement.method, "POST");
    EXPECT_EQ(ws.statement.url, statements[ws.index].url);
    EXPECT_EQ(ws.statement.body, statements[ws.index].body);
  }
  send_results({{1, "r1"}, {3, "r3"}});  // seq 3
  ASSERT_TRUE(wait_ack(3));
  ASSERT_FALSE(pending(proto::Command::kSubmit)) << "submitted again a statement SYNCED did not name";
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  std::vector<std::uint64_t> order;
  std::vector<std::string> got;
  for (const auto& item : streamed_) {
    order.push_back(item.index);
    got.push_back(item.response.body);
  }
  EXPECT_EQ(order, (std::vector<std::uint64_t>{0, 1, 2, 3})) << "every response once, in order";
  EXPECT_EQ(got, (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
}

// 3.6.4 "(...) The client SHALL then count every RESULTS up to SYNCED's seq
// as received: the broker sent again all it keeps, and dropped the rest on
// purpose (CANCEL drops a session's kept RESULTS with its queue, §3.2.5)."
TEST_P(ClientSpec, Clause_3_6_4_ResultsUpToSyncedSeqCountAsReceived) {
  connect(10);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(3).size(), 3u);
  send_results({{0, "r0"}});  // seq 1
  ASSERT_TRUE(wait_ack(1));
  (void)results({{0, "late"}});  // seq 2: lost, and no longer kept (dropped by a CANCEL)
  kept_.erase(2);
  send_results({{1, "r1"}});  // seq 3: a gap
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 1u);
  answer_sync(sync, {});  // seq 3 again, then SYNCED naming seq 3
  ASSERT_TRUE(wait_ack(3)) << "the ack did not move on to SYNCED's seq";
  send_results({{2, "r2"}});  // seq 4: in order now
  ASSERT_TRUE(wait_ack(4));
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2"}));
  EXPECT_FALSE(pending(proto::Command::kSync)) << "SYNC again for the RESULTS SYNCED said were dropped";
}

// 3.6.5 "A client SHALL accept the results of every RESULTS it receives, in
// or out of order, and drop those it already has (§3.3.2); only in-order
// RESULTS advance its `ack`."
TEST_P(ClientSpec, Clause_3_6_5_OutOfOrderAndDuplicateResultsAreTakenOnce) {
  connect(10);
  start_stream(Urls(4));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(4).size(), 4u);
  (void)results({{0, "r0"}});  // seq 1, held back
  send_results({{1, "r1"}});   // seq 2, before seq 1
  const proto::Sync sync = expect_sync();
  EXPECT_EQ(sync.ack, 0u) << "an out-of-order RESULTS advanced the ack";
  answer_sync(sync, {});  // seq 1, then seq 2 again (a duplicate), SYNCED
  send_again(1);          // and a duplicate of seq 1
  send_results({{2, "r2"}, {1, "duplicate of r1"}, {0, "duplicate of r0"}});  // seq 3
  send_results({{3, "r3"}});                                                // seq 4
  ASSERT_TRUE(wait_ack(4));
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  std::vector<std::uint64_t> order;
  std::vector<std::string> got;
  for (const auto& item : streamed_) {
    order.push_back(item.index);
    got.push_back(item.response.body);
  }
  EXPECT_EQ(order, (std::vector<std::uint64_t>{0, 1, 2, 3})) << "every response once, in order";
  EXPECT_EQ(got, (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
}

// 3.2.8 "(...) The new session numbers its RESULTS from 1 again (§3.6): on
// OPENED the client SHALL reset its received and acknowledged seqs to 0."
TEST_P(ClientSpec, Clause_3_2_8_AcksStartAgainFromTheReopenedSessionsSeqs) {
  connect(10);
  start_gather(Urls(3));
  expect(proto::Command::kOpen);
  send_opened();
  ASSERT_EQ(recv_statements(3).size(), 3u);
  send_results({{0, "r0"}});
  send_results({{1, "r1"}});
  ASSERT_TRUE(wait_ack(2));
  send_not_found();
  expect(proto::Command::kOpen);
  ASSERT_EQ(IndicesOf(recv_statements(1)), (std::vector<std::uint64_t>{2}));
  restart_seqs();
  send_opened();
  const std::size_t before = acks_.size();
  send_results({{2, "r2"}});  // seq 1 of the new session
  ASSERT_TRUE(wait_acks(before + 1)) << "no ACK of the re-opened session's first RESULTS";
  EXPECT_EQ(acks_.back(), 1u);
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2"}));
  EXPECT_FALSE(pending(proto::Command::kSync)) << "the new session's seq 1 was taken for a gap or a stale one";
}

// 3.2.9 "A client SHALL give up on a run when it has heard nothing from the
// broker (no message of any kind) for its broker timeout (default 60 s), and
// report which broker, for how long, and how many statements were left
// unanswered. (...) Until then it SHALL keep waiting (...)."
TEST_P(ClientSpec, Clause_3_2_9_SilentBrokerEndsTheRunAfterTheBrokerTimeout) {
  start_timed_gather(600ms, 200ms, 2);
  const auto start = Clock::now();  // the client has heard nothing since
  ASSERT_EQ(recv_statements(2).size(), 2u);
  // Silent from here on: ZeroMQ still answers the client's ZMTP pings, so
  // the link stays up and only the application is silent.
  ASSERT_TRUE(wait_gather(10s)) << "gather() still waits for a broker silent for 10 s";
  const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start);
  EXPECT_EQ(gather_error(), StatusCode::kUnavailable);
  const std::string what = gather_error_message();
  EXPECT_NE(what.find(endpoint_), std::string::npos) << "does not name the broker: " << what;
  EXPECT_NE(what.find("2 statements"), std::string::npos) << "does not say how many are unanswered: " << what;
  EXPECT_NE(what.find("unanswered"), std::string::npos) << what;
  EXPECT_GE(took, 600ms) << "gave up before the broker timeout";
  EXPECT_LE(took, 3000ms) << "gave up long after the broker timeout (600 ms, checked once per 200 ms period)";
}

// 3.2.9 "(...) Until then it SHALL keep waiting (...)": a broker that only
// answers heartbeats, for longer than the broker timeout, is not silent.
TEST_P(ClientSpec, Clause_3_2_9_BrokerAnsweringHeartbeatsKeepsTheRunGoing) {
  start_timed_gather(1000ms, 200ms, 1);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  // Answered [session, 0, 1, 1]: nothing sent, index 0 received, a worker;
  // for two and a half broker timeouts.
  ASSERT_NO_FATAL_FAILURE(answer_beats_for(2500ms));
  send_results({{0, "r0"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0"}));
}

// 3.3.1 "(...) a client SHALL send its HEARTBEATs (§3.2.7) at that period,
// (...) and at least three times per its own broker timeout (§3.2.9), so that
// a live broker, answering each one, is never taken for silent."
// The broker's period (3 s) is three times the client's broker timeout (1 s):
// at the broker's period alone, the client would hear nothing for 3 s.
TEST_P(ClientSpec, Clause_3_3_1_ABrokerTimeoutShorterThanTheBrokersPeriodIsStillMet) {
  start_timed_gather(1000ms, 3000ms, 1);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  int beats = 0;
  ASSERT_NO_FATAL_FAILURE(answer_beats_for(3500ms, &beats));  // more than one broker period
  // A third of the broker timeout: about ten in 3.5 s; at the broker's
  // period, one.
  EXPECT_GE(beats, 6) << "the client heartbeats at the broker's 3 s period, not within its 1 s broker timeout";
  send_results({{0, "r0"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt) << gather_error_message();
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0"}));
}

// A broker timeout the client cannot keep (three heartbeats within it) is
// refused when the Gatherer is made, before anything is sent.
TEST(ClientOptions, BrokerTimeoutBelow150MsIsRefused) {
  try {
    Gatherer g({.broker = "tcp://127.0.0.1:1", .log_level = 40, .broker_timeout = 100ms});
    ADD_FAILURE() << "a 100 ms broker timeout was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("broker_timeout"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, ClientSpec, ::testing::Values("tcp", "ipc"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gatherer
