// Client-side clauses of common/PROTOCOL.md, one test per clause, each named
// after it with the clause quoted above it (tests/protocol/CLAUSES.md maps
// every clause to its test). A raw ROUTER on the test thread plays the
// broker; the client is a real gatherer::Gatherer connected to it, whose
// gather() runs on a second thread. Each test runs over tcp and ipc.

#include <atomic>
#include <deque>
#include <iterator>
#include <thread>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/gatherer.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "socket_monitor.h"
#include "spec_util.h"
#include "wait_for.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using namespace std::chrono_literals;
using testing::CommandOf;
using testing::Packer;
using testing::WaitFor;

std::vector<Statement> Urls(int n) {
  std::vector<Statement> out;
  for (int i = 0; i < n; ++i) out.push_back(Get("http://127.0.0.1:1/" + std::to_string(i)));
  return out;
}

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
struct Message {
  std::string peer;  // routing id
  proto::Frames frames;
  std::optional<proto::Command> command;
};

class ClientSpec : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    router_.set(zmq::sockopt::linger, 0);
    router_.set(zmq::sockopt::router_mandatory, 1);
    router_.bind(dir_.endpoint(GetParam()));
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
  }
  void TearDown() override { (void)close(); }

  // Creates the Gatherer; its constructor connects to this fake broker.
  void connect(int workers, int prefetch = 0, int log_level = 40) {
    Options o;
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
  // True once gather() has returned or thrown (error_), within `timeout`.
  bool wait_gather(std::chrono::milliseconds timeout = 10s) {
    if (!WaitFor([&] { return done_.load(); }, timeout)) return false;
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

  // Next message within `timeout`, HEARTBEAT included.
  std::optional<Message> recv_any(std::chrono::milliseconds timeout = 5000ms) {
    zmq::pollitem_t item{router_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, timeout);
    std::vector<zmq::message_t> frames;
    if (!zmq::recv_multipart(router_, std::back_inserter(frames), zmq::recv_flags::dontwait)) return std::nullopt;
    Message m;
    m.peer = frames[0].to_string();
    m.frames.assign(std::make_move_iterator(frames.begin() + 1), std::make_move_iterator(frames.end()));
    m.command = CommandOf(m.frames);
    return m;
  }
  // Next message other than HEARTBEAT within `timeout`.
  std::optional<Message> recv(std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= 0ms) return std::nullopt;
      auto m = recv_any(left);
      if (m && m->command != proto::Command::kHeartbeat) return m;
    }
  }
  // The next message other than HEARTBEAT, which must be `command`; notes
  // the client's routing id.
  Message expect(proto::Command command) {
    auto m = recv();
    if (!m) {
      ADD_FAILURE() << "no message; expected " << proto::CommandName(command);
      return {};
    }
    EXPECT_EQ(m->command, command);
    peer_ = m->peer;
    return std::move(*m);
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
  proto::Frames results(const std::vector<std::pair<std::uint64_t, std::string>>& bodies) {
    proto::Results r{session_, {}};
    for (const auto& [index, body] : bodies) {
      proto::WireResult wr;
      wr.index = index;
      wr.response.status = 200;
      wr.response.body = body;
      r.results.push_back(std::move(wr));
    }
    return proto::Encode(std::move(r));
  }
  void send_results(const std::vector<std::pair<std::uint64_t, std::string>>& bodies) {
    send(peer_, results(bodies));
  }
  void send_not_found() {
    send(peer_, proto::Encode(proto::ErrorReply{StatusCode::kNotFound, "session not open", session_}));
  }
  std::vector<std::string> bodies() const {
    std::vector<std::string> out;
    for (const auto& r : gatherer_->responses) out.push_back(r.body);
    return out;
  }

  // Ends the client: cancels a gather() still running, then destroys the
  // Gatherer while answering its CLOSE. Returns what it sent before CLOSE.
  std::vector<Message> close() {
    std::vector<Message> seen;
    if (runner_.joinable()) {
      if (!done_.load()) gatherer_->cancel();
      EXPECT_TRUE(WaitFor([&] { return done_.load(); }, 10s)) << "gather() ignored cancel()";
      runner_.join();
    }
    if (!gatherer_) return seen;
    std::atomic<bool> closed{false};
    std::thread closer([&] {
      gatherer_.reset();
      closed.store(true);
    });
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    bool close_seen = false;
    while (!closed.load() && std::chrono::steady_clock::now() < deadline) {
      auto m = recv_any(20ms);
      if (!m) continue;
      if (m->command == proto::Command::kClose) {
        close_seen = true;
        send(m->peer, proto::Encode(proto::Command::kClosed, proto::SessionRef{session_}));
      } else if (!close_seen) {
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
  std::unique_ptr<Gatherer> gatherer_;
  SessionId session_;
  std::string peer_;  // routing id of the client's connection
  std::thread runner_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;  // written by runner_ before done_, read after join
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
  proto::Frames big = results({{0, ""}});
  big[3] = testing::ZeroPagesMessage((std::size_t{256} << 20) + 1);
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
  bad.push_back(results({{0, "bad"}}));
  bad.back()[0] = zmq::message_t("GTX\x01", 4);
  bad.push_back(results({{0, "bad"}}));
  bad.back()[0] = zmq::message_t("GTR\x07", 4);
  bad.push_back(results({{0, "bad"}}));
  testing::AppendToHeader(bad.back(), std::string("\xc0", 1));
  bad.push_back(results({{0, "bad"}}));
  bad.back().emplace_back("extra", 5);
  bad.push_back(results({{0, "bad"}}));
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
  proto::Frames trailing = proto::Encode(proto::Command::kOpened, proto::SessionRef{session_});
  testing::AppendToHeader(trailing, std::string("\xc0", 1));
  send(peer_, std::move(trailing));
  send(peer_, testing::Raw(proto::Command::kOpened, [](Packer& pk) { pk.pack_map(0); }));
  proto::Frames extra = proto::Encode(proto::Command::kOpened, proto::SessionRef{session_});
  extra.emplace_back("extra", 5);
  send(peer_, std::move(extra));
  send_not_found();  // answers the SUBMIT before the re-open: stale
  send(peer_, proto::Encode(proto::Command::kOpened, proto::SessionRef{session_}));
  send_results({{0, "a"}, {1, "b"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  for (const Message& m : close()) {
    EXPECT_EQ(m.command, proto::Command::kHeartbeat)
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
  proto::Results r{session_, {}};
  proto::WireResult wr;
  wr.index = 0;
  wr.response.error = ResponseError{static_cast<StatusCode>(200), "from a newer worker"};
  r.results.push_back(std::move(wr));
  send(peer_, proto::Encode(std::move(r)));
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
  connect(1);
  start_gather(Urls(1));
  expect(proto::Command::kOpen);
  ASSERT_EQ(recv_statements(1).size(), 1u);
  std::vector<std::chrono::steady_clock::time_point> beats;
  const auto deadline = std::chrono::steady_clock::now() + 6s;
  while (beats.size() < 3) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    auto m = left > 0ms ? recv_any(left) : std::nullopt;
    ASSERT_TRUE(m.has_value()) << "only " << beats.size() << " heartbeats in 6 s";
    ASSERT_EQ(m->command, proto::Command::kHeartbeat) << "unexpected message while waiting for results";
    auto named = proto::DecodeHeartbeat(m->frames);
    ASSERT_TRUE(named.has_value());
    EXPECT_EQ(*named, std::optional<SessionId>(session_)) << "HEARTBEAT does not name the session";
    beats.push_back(std::chrono::steady_clock::now());
    send(m->peer, proto::EncodeHeartbeat());  // as a broker that has the session
  }
  for (std::size_t i = 1; i < beats.size(); ++i) {
    EXPECT_GE(beats[i] - beats[i - 1], 500ms) << "more than one HEARTBEAT per period";
    EXPECT_LE(beats[i] - beats[i - 1], 2500ms) << "a period without HEARTBEAT";
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
  send(peer_, proto::Encode(proto::Command::kOpened, proto::SessionRef{session_}));
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
  send(peer_, proto::Encode(proto::Command::kOpened, proto::SessionRef{session_}));
  send_results({{0, "late duplicate"}, {1, "r1"}});
  // ... one after OPENED is not: only 3 is unanswered now. (Had the stale
  // one been taken, this OPEN would be followed by 1 and 3.)
  send_not_found();
  expect(proto::Command::kOpen);
  EXPECT_EQ(IndicesOf(recv_statements(1)), (std::vector<std::uint64_t>{3}));
  send(peer_, proto::Encode(proto::Command::kOpened, proto::SessionRef{session_}));
  send_results({{3, "r3"}});
  ASSERT_TRUE(wait_gather());
  ASSERT_EQ(gather_error(), std::nullopt);
  EXPECT_EQ(bodies(), (std::vector<std::string>{"r0", "r1", "r2", "r3"}));
  for (const Message& m : close()) {
    EXPECT_EQ(m.command, proto::Command::kHeartbeat) << "sent more after the last OPENED";
  }
}

// 3.3.2 "Results MAY arrive in any order and in batches of any size. A client
// SHALL place each result at its index and SHALL drop a result whose index it
// already has or that is outside the batch it is gathering (exactly-once
// delivery, DESIGN §5.2)."
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

INSTANTIATE_TEST_SUITE_P(Transports, ClientSpec, ::testing::Values("tcp", "ipc"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gatherer
