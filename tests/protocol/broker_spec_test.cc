// Broker-side clauses of common/PROTOCOL.md, one test per clause, each named
// after it with the clause quoted above it (tests/protocol/CLAUSES.md maps
// every clause to its test). A real gatherer::Broker runs in this process;
// raw DEALER sockets play clients and workers. Each test runs over tcp and
// ipc. Clauses proven by broker/src/broker_test.cc are not repeated here.

#include "gatherer/broker.h"

#include <iterator>
#include <map>
#include <set>

#include <gtest/gtest.h>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/worker.h"
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

// A raw DEALER playing a client or a worker. Owned by the test thread.
class Peer {
 public:
  Peer(zmq::context_t& ctx, const std::string& endpoint) : socket_(ctx, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    socket_.connect(endpoint);
  }
  // Through the transport's send, which tells ThreadSanitizer that the frames
  // are handed to ZeroMQ's I/O thread (libzmq is not instrumented).
  void send(proto::Frames&& frames) { proto::SendMessage(socket_, {}, frames, /*block=*/true); }
  // Next message within `timeout`, HEARTBEAT included; empty if none came.
  proto::Frames recv_any(std::chrono::milliseconds timeout = 5000ms) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, timeout);
    proto::Frames frames;
    (void)zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    return frames;
  }
  // Next message other than HEARTBEAT within `timeout`; empty if none came.
  proto::Frames recv(std::chrono::milliseconds timeout = 5000ms) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= 0ms) return {};
      proto::Frames frames = recv_any(left);
      if (!frames.empty() && CommandOf(frames) != proto::Command::kHeartbeat) return frames;
    }
  }
  zmq::socket_t& socket() { return socket_; }

 private:
  zmq::socket_t socket_;
};

std::vector<Statement> Urls(int n) {
  std::vector<Statement> out;
  for (int i = 0; i < n; ++i) out.push_back(Get("http://127.0.0.1:1/" + std::to_string(i)));
  return out;
}

// RESULTS for `indices`, body "<prefix><index>" each.
proto::Frames ResultsFor(const SessionId& sid, const std::vector<std::uint64_t>& indices,
                         const std::string& prefix = "body") {
  proto::Results r{sid, {}};
  for (auto i : indices) {
    proto::WireResult wr;
    wr.index = i;
    wr.response.status = 200;
    wr.response.body = prefix + std::to_string(i);
    r.results.push_back(std::move(wr));
  }
  return proto::Encode(std::move(r));
}

std::vector<std::uint64_t> IndicesOf(const proto::Frames& dispatch) {
  std::vector<std::uint64_t> out;
  auto m = proto::DecodeStatements(dispatch);
  if (m) {
    for (const auto& s : m->statements) out.push_back(s.index);
  }
  return out;
}

// True if `text` holds `number` as a word of its own ("version 7", not "17").
bool Mentions(const std::string& text, int number) {
  const std::string n = std::to_string(number);
  auto digit = [&](std::size_t i) { return i < text.size() && text[i] >= '0' && text[i] <= '9'; };
  for (auto at = text.find(n); at != std::string::npos; at = text.find(n, at + 1)) {
    if ((at == 0 || !digit(at - 1)) && !digit(at + n.size())) return true;
  }
  return false;
}

class BrokerSpec : public ::testing::TestWithParam<std::string> {
 protected:
  void TearDown() override { broker_.reset(); }

  // Starts the broker on this test's transport. The heartbeat period is
  // longer than any test runs, so no worker is presumed dead (§4.5) and no
  // session expires (§4.6) unless a test asks for it through `tweak`.
  void start(const std::function<void(BrokerOptions&)>& tweak = {}) {
    BrokerOptions o;
    o.endpoints = {dir_.endpoint(GetParam())};
    o.heartbeat_interval = 10s;
    if (tweak) tweak(o);
    broker_ = std::make_unique<Broker>(o);
    ASSERT_TRUE(broker_->start().ok());
    endpoint_ = broker_->endpoints().at(0);
  }
  const BrokerStats& stats() const { return broker_->stats(); }

  SessionId open(Peer& client, std::uint32_t window, std::uint32_t prefetch = 0) {
    const SessionId sid = NewSessionId();
    SessionSettings s;
    s.workers = window;
    client.send(proto::Encode(proto::Open{sid, s, prefetch}));
    auto reply = client.recv();
    EXPECT_EQ(CommandOf(reply), proto::Command::kOpened);
    return sid;
  }
  // READY has no reply: waits until the broker counts one more worker.
  void ready(Peer& worker, std::uint32_t slots) {
    const auto before = stats().workers.load();
    worker.send(proto::Encode(proto::Ready{"w", "h", slots}));
    ASSERT_TRUE(WaitFor([&] { return stats().workers.load() > before; }, 5s)) << "READY not taken";
  }
  // What a worker is sent for a session it does not hold yet: one SESSION,
  // then DISPATCHes until `n` statements came. Their indices, in order.
  std::vector<std::uint64_t> expect_session_and_dispatch(Peer& worker, const SessionId& sid, std::size_t n) {
    std::vector<std::uint64_t> out;
    auto session = proto::DecodeSession(worker.recv());
    EXPECT_TRUE(session.has_value()) << "no SESSION";
    if (session) {
      EXPECT_EQ(session->session, sid);
    }
    while (out.size() < n) {
      auto dispatch = worker.recv();
      if (CommandOf(dispatch) != proto::Command::kDispatch) {
        ADD_FAILURE() << "expected DISPATCH after " << out.size() << " of " << n << " statements";
        break;
      }
      auto m = proto::DecodeStatements(dispatch);
      EXPECT_EQ(m->session, sid);
      for (const auto& s : m->statements) out.push_back(s.index);
    }
    return out;
  }

  testing::IpcDir dir_;
  zmq::context_t ctx_{1};
  std::unique_ptr<Broker> broker_;
  std::string endpoint_;
};

// 1.1 "The broker SHALL bind one ZeroMQ ROUTER socket per endpoint (tcp://,
// ipc:// or, inside one process, inproc://). Clients and workers SHALL
// connect a DEALER socket."
// Bound to a tcp and an ipc endpoint at once, the broker answers from a
// ROUTER on both, and the two are one broker: a client on one reaches a
// worker on the other.
TEST(BrokerSpecEndpoints, Clause_1_1_ARouterServesEveryEndpoint) {
  testing::IpcDir dir;
  BrokerOptions o;
  o.endpoints = {"tcp://127.0.0.1:*", dir.endpoint("ipc")};
  o.heartbeat_interval = 10s;
  Broker broker(o);
  ASSERT_TRUE(broker.start().ok());
  ASSERT_EQ(broker.endpoints().size(), 2u);
  zmq::context_t ctx(1);
  Peer client(ctx, broker.endpoints()[0]), worker(ctx, broker.endpoints()[1]);
  worker.send(proto::Encode(proto::Ready{"w", "h", 10}));
  ASSERT_TRUE(WaitFor([&] { return broker.stats().workers.load() == 1; }, 5s));
  const SessionId sid = NewSessionId();
  client.send(proto::Encode(proto::Open{sid, SessionSettings{}, 0}));
  auto opened = client.recv();
  ASSERT_EQ(CommandOf(opened), proto::Command::kOpened);
  EXPECT_STREQ(opened[0].gets("Socket-Type"), "ROUTER");
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  auto session = worker.recv();
  ASSERT_EQ(CommandOf(session), proto::Command::kSession);
  EXPECT_STREQ(session[0].gets("Socket-Type"), "ROUTER");
  ASSERT_EQ(CommandOf(worker.recv()), proto::Command::kDispatch);
  worker.send(ResultsFor(sid, {0}));
  auto results = client.recv();
  ASSERT_EQ(CommandOf(results), proto::Command::kResults);
  EXPECT_EQ(proto::DecodeResults(results)->results.at(0).response.body, "body0");
}

// 1.2 "The broker SHALL set ZMQ_ROUTER_MANDATORY, so a message to a peer
// that has gone is reported and dropped, never silently queued."
// The report is the broker's own (without the option ZeroMQ drops such a
// message without a word); its only trace outside is the debug log line,
// which this test reads.
TEST_P(BrokerSpec, Clause_1_2_MessageToAGonePeerIsReported) {
  SetLogLevel(10);
  testing::LogCapture log("unreachable");
  start();
  auto client = std::make_unique<Peer>(ctx_, endpoint_);
  Peer worker(ctx_, endpoint_);
  ready(worker, 100);
  constexpr int kStatements = 50;
  const SessionId sid = open(*client, kStatements);
  client->send(proto::EncodeSubmit(sid, 0, Urls(kStatements)));
  const auto leased = expect_session_and_dispatch(worker, sid, kStatements);
  ASSERT_EQ(leased.size(), static_cast<std::size_t>(kStatements));
  client.reset();  // gone; the broker's ROUTER learns it a moment later
  // Each result is forwarded to the gone client: once the ROUTER knows it
  // has gone, that send is reported.
  bool reported = false;
  for (int i = 0; i < kStatements && !reported; ++i) {
    worker.send(ResultsFor(sid, {leased[i]}));
    reported = WaitFor([&] { return log.lines() > 0; }, 100ms);
  }
  broker_.reset();  // nothing logs after this, so the capture may go
  EXPECT_TRUE(reported) << "results for a gone client were dropped without a report";
}

// 1.3 "Every peer SHALL set ZMQ_MAXMSGSIZE to at most 256 MiB (§5). ZeroMQ
// then closes the connection of a peer that sends a larger message."
TEST_P(BrokerSpec, Clause_1_3_FrameOver256MiBClosesTheConnection) {
  start();
  Peer peer(ctx_, endpoint_);
  // Connected: a HEARTBEAT naming an unknown session is answered (3.2.7).
  peer.send(proto::EncodeHeartbeat(NewSessionId()));
  ASSERT_EQ(CommandOf(peer.recv_any()), proto::Command::kError);
  testing::SocketMonitor monitor(ctx_, peer.socket(), ZMQ_EVENT_DISCONNECTED);
  proto::Frames big = ResultsFor(NewSessionId(), {0});
  big[3] = testing::ZeroPagesMessage((std::size_t{256} << 20) + 1);
  peer.send(std::move(big));
  EXPECT_TRUE(monitor.wait_for(ZMQ_EVENT_DISCONNECTED, 10s)) << "the broker took a frame over 256 MiB";
  // The broker goes on serving the others. (That DEALER stays disconnected:
  // libzmq does not reconnect after a protocol error.)
  Peer other(ctx_, endpoint_);
  open(other, 1);
}

// 2.1 "A receiver SHALL check the first three bytes of frame 0; a message
// whose frame 0 is not 4 bytes or does not start with "GTR" is malformed."
TEST_P(BrokerSpec, Clause_2_1_FrameZeroMustBeTheSignature) {
  start();
  Peer peer(ctx_, endpoint_);
  // Plain HEARTBEATs but for frame 0: each would be answered if taken (3.2.7).
  const std::vector<std::string> signatures = {std::string("GTX\x01", 4), std::string("GTR", 3),
                                               std::string("GTR\x01\x00", 5), std::string()};
  for (const auto& sig : signatures) {
    proto::Frames f = proto::EncodeHeartbeat();
    f[0] = zmq::message_t(sig.data(), sig.size());
    peer.send(std::move(f));
  }
  // Replies come in order: the first one must answer this probe.
  const SessionId stranger = NewSessionId();
  peer.send(proto::EncodeHeartbeat(stranger));
  auto reply = peer.recv_any();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError) << "a message with a bad signature was answered";
  EXPECT_EQ(proto::DecodeError(reply)->session, stranger);
  EXPECT_EQ(stats().malformed.load(), signatures.size());
}

// 2.2 "A receiver SHALL compare the version byte with its own. On a mismatch
// the message is malformed, and a broker SHALL answer it with ERROR (code
// failed_precondition, a message that names both versions) so that a
// mismatched peer is told clearly what is wrong."
TEST_P(BrokerSpec, Clause_2_2_OtherVersionIsAnsweredFailedPrecondition) {
  start();
  Peer client(ctx_, endpoint_);
  const SessionId sid = NewSessionId();
  proto::Frames open = proto::Encode(proto::Open{sid, SessionSettings{}, 0});
  const std::uint8_t v7[] = {'G', 'T', 'R', 7};
  open[0] = zmq::message_t(v7, sizeof(v7));
  client.send(std::move(open));
  auto reply = client.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  auto e = proto::DecodeError(reply);
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->code, StatusCode::kFailedPrecondition);
  EXPECT_TRUE(Mentions(e->message, 7) && Mentions(e->message, proto::kVersion))
      << "does not name both versions: " << e->message;
  EXPECT_EQ(stats().malformed.load(), 1u);
  // Malformed, so it opened nothing.
  client.send(proto::EncodeHeartbeat(sid));
  auto probe = client.recv();
  ASSERT_EQ(CommandOf(probe), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(probe)->code, StatusCode::kNotFound);
}

// 2.3 "Frame 1 MUST be exactly one byte holding a command listed in §3; any
// other value is malformed."
TEST_P(BrokerSpec, Clause_2_3_UnlistedCommandIsMalformed) {
  start();
  Peer client(ctx_, endpoint_);
  const SessionId sid = NewSessionId();
  // An OPEN's frames with another command frame: taken as OPEN, any of them
  // would open the session.
  const std::vector<std::string> commands = {std::string("\x7f", 1), std::string("\x00", 1),
                                             std::string("\x10\x10", 2), std::string()};
  for (const auto& c : commands) {
    proto::Frames f = proto::Encode(proto::Open{sid, SessionSettings{}, 0});
    f[1] = zmq::message_t(c.data(), c.size());
    client.send(std::move(f));
  }
  client.send(proto::EncodeHeartbeat(sid));
  auto reply = client.recv_any();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError) << "a message with a bad command frame was answered";
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kNotFound) << "a bad command frame opened the session";
  EXPECT_EQ(stats().malformed.load(), commands.size());
  EXPECT_EQ(stats().sessions.load(), 0u);
}

// 2.4 "A receiver SHALL treat as malformed: fewer than 3 frames; a header
// that is not exactly one msgpack value (trailing bytes count); a header of
// the wrong type or with fields of the wrong type; more frames than the
// command allows. A malformed message SHALL be dropped, counted and logged
// (...). It MUST NOT crash the receiver, and MUST NOT change any session's
// state."
TEST_P(BrokerSpec, Clause_2_4_MalformedMessagesAreDroppedLeavingSessionsAlone) {
  start();
  Peer client(ctx_, endpoint_);
  const SessionId sid = open(client, 2);
  client.send(proto::EncodeSubmit(sid, 0, Urls(3)));  // no worker yet: all queued
  ASSERT_TRUE(WaitFor([&] { return stats().queued.load() == 3; }, 5s));
  // Each of these, if taken, would close, cancel, re-open or grow the session.
  std::vector<proto::Frames> bad;
  bad.push_back(proto::Encode(proto::Command::kClose, proto::SessionRef{sid}));
  bad.back().pop_back();  // fewer than 3 frames
  bad.push_back(proto::Encode(proto::Command::kClose, proto::SessionRef{sid}));
  testing::AppendToHeader(bad.back(), std::string("\xc0", 1));  // a second msgpack value
  bad.push_back(testing::Raw(proto::Command::kClose, [&](Packer& pk) {  // header of the wrong type
    pk.pack_map(1);
    testing::PackStr(pk, "session");
    testing::PackBin(pk, sid.raw());
  }));
  bad.push_back(proto::Encode(proto::Command::kCancel, proto::SessionRef{sid}));
  bad.back().emplace_back("extra", 5);  // more frames than CANCEL allows
  bad.push_back(testing::Raw(proto::Command::kOpen, [&](Packer& pk) {  // prefetch not unsigned
    pk.pack_array(3);
    testing::PackBin(pk, sid.raw());
    pk.pack_map(1);
    testing::PackStr(pk, "workers");
    pk.pack(50);
    pk.pack(-1);
  }));
  bad.push_back(testing::Raw(proto::Command::kOpen, [&](Packer& pk) {  // window out of range (3.1)
    pk.pack_array(3);
    testing::PackBin(pk, sid.raw());
    pk.pack_map(1);
    testing::PackStr(pk, "workers");
    pk.pack(0);
    pk.pack(0);
  }));
  bad.push_back(testing::Raw(proto::Command::kSubmit, [&](Packer& pk) {  // a statement's url not str
    pk.pack_array(2);
    testing::PackBin(pk, sid.raw());
    pk.pack_array(1);
    pk.pack_array(7);
    pk.pack(3);
    testing::PackStr(pk, "GET");
    pk.pack(42);
    pk.pack_array(0);
    testing::PackBin(pk, "");
    pk.pack(0);
    pk.pack_nil();
  }));
  const std::size_t count = bad.size();
  for (auto& f : bad) client.send(std::move(f));
  // Replies come in order: the first one must answer this probe, and the
  // session must still be there.
  client.send(proto::EncodeHeartbeat(sid));
  auto reply = client.recv_any();
  ASSERT_EQ(CommandOf(reply), proto::Command::kHeartbeat) << "a malformed message was answered or ended the session";
  EXPECT_EQ(stats().malformed.load(), count);
  EXPECT_EQ(stats().sessions.load(), 1u);
  EXPECT_EQ(stats().queued.load(), 3u);
  // Window and queue are as they were: a worker gets the window, 2 of the 3.
  Peer worker(ctx_, endpoint_);
  ready(worker, 100);
  auto session = worker.recv();
  ASSERT_EQ(CommandOf(session), proto::Command::kSession);
  EXPECT_EQ(proto::DecodeSession(session)->settings.workers, 2u);
  EXPECT_EQ(IndicesOf(worker.recv()), (std::vector<std::uint64_t>{0, 1}));
}

// 2.4 "A malformed message SHALL be dropped, counted and logged
// (rate-limited, at most one line per second per process)."
// The one clause about logging, so the one test that reads log lines.
TEST_P(BrokerSpec, Clause_2_4_MalformedMessagesAreLoggedAtMostOncePerSecond) {
  testing::LogCapture log("malformed");
  start();
  Peer peer(ctx_, endpoint_);
  const auto begin = std::chrono::steady_clock::now();
  for (int i = 0; i < 50; ++i) {
    proto::Frames garbage;
    garbage.emplace_back("garbage", 7);
    peer.send(std::move(garbage));
  }
  peer.send(proto::EncodeHeartbeat(NewSessionId()));
  ASSERT_EQ(CommandOf(peer.recv_any()), proto::Command::kError);
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(std::chrono::steady_clock::now() - begin);
  EXPECT_EQ(stats().malformed.load(), 50u);
  broker_.reset();  // nothing logs after this, so the capture may go
  EXPECT_GE(log.lines(), 1u) << "malformed messages were not logged";
  EXPECT_LE(log.lines(), 1u + seconds.count()) << "50 malformed messages, " << log.lines() << " log lines";
}

// 2.4 "A receiver SHALL treat as malformed: (...) a header that is not
// exactly one msgpack value (trailing bytes count); a header of the wrong
// type (...); more frames than the command allows. A malformed message SHALL
// be dropped, counted (...)." Also a registered worker's HEARTBEAT.
TEST_P(BrokerSpec, Clause_2_4_MalformedHeartbeatFromAWorkerIsCounted) {
  start();
  Peer worker(ctx_, endpoint_);
  ready(worker, 10);
  proto::Frames trailing = proto::EncodeHeartbeat();
  testing::AppendToHeader(trailing, std::string("\xc0", 1));
  worker.send(std::move(trailing));
  worker.send(testing::Raw(proto::Command::kHeartbeat, [](Packer& pk) { pk.pack_map(0); }));
  proto::Frames extra = proto::EncodeHeartbeat();
  extra.emplace_back("extra", 5);
  worker.send(std::move(extra));
  EXPECT_TRUE(WaitFor([&] { return stats().malformed.load() == 3; }, 2s))
      << stats().malformed.load() << " of 3 malformed HEARTBEATs counted";
}

// 2.5 "Unknown keys in a msgpack map (session settings) SHALL be ignored, so
// that a newer client can add settings."
TEST_P(BrokerSpec, Clause_2_5_UnknownSettingsKeysAreIgnored) {
  start();
  Peer client(ctx_, endpoint_);
  const SessionId sid = NewSessionId();
  client.send(testing::Raw(proto::Command::kOpen, [&](Packer& pk) {
    pk.pack_array(3);
    testing::PackBin(pk, sid.raw());
    pk.pack_map(3);
    testing::PackStr(pk, "from_the_future");
    pk.pack_map(1);
    testing::PackStr(pk, "nested");
    pk.pack_array(2);
    pk.pack(1);
    pk.pack(2);
    testing::PackStr(pk, "workers");
    pk.pack(3);
    testing::PackStr(pk, "also_new");
    testing::PackStr(pk, "x");
    pk.pack(0);
  }));
  auto opened = client.recv();
  ASSERT_EQ(CommandOf(opened), proto::Command::kOpened);
  EXPECT_EQ(proto::DecodeSessionRef(opened)->session, sid);
  // The known key still counts: a window of 3.
  client.send(proto::EncodeSubmit(sid, 0, Urls(5)));
  Peer worker(ctx_, endpoint_);
  ready(worker, 100);
  auto session = worker.recv();
  ASSERT_EQ(CommandOf(session), proto::Command::kSession);
  EXPECT_EQ(proto::DecodeSession(session)->settings.workers, 3u);
  EXPECT_EQ(IndicesOf(worker.recv()).size(), 3u);
}

// 2.6 "Integers are msgpack unsigned integers unless stated; strings are
// msgpack str (UTF-8); byte strings are msgpack bin (a receiver SHALL also
// accept str for them)."
TEST_P(BrokerSpec, Clause_2_6_StrIsAcceptedForBin) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  const SessionId sid = NewSessionId();
  client.send(testing::Raw(proto::Command::kOpen, [&](Packer& pk) {
    pk.pack_array(3);
    testing::PackStr(pk, sid.raw());  // session id as str
    pk.pack_map(0);
    pk.pack(0);
  }));
  auto opened = client.recv();
  ASSERT_EQ(CommandOf(opened), proto::Command::kOpened);
  EXPECT_EQ(proto::DecodeSessionRef(opened)->session, sid);
  client.send(testing::Raw(proto::Command::kSubmit, [&](Packer& pk) {
    pk.pack_array(2);
    testing::PackStr(pk, sid.raw());
    pk.pack_array(1);
    pk.pack_array(7);
    pk.pack(0);
    testing::PackStr(pk, "POST");
    testing::PackStr(pk, "http://127.0.0.1:1/p");
    pk.pack_array(0);
    testing::PackStr(pk, "payload");  // body as str
    pk.pack(0);
    pk.pack_nil();
  }));
  ASSERT_EQ(CommandOf(worker.recv()), proto::Command::kSession);
  auto dispatch = proto::DecodeStatements(worker.recv());
  ASSERT_TRUE(dispatch.has_value());
  EXPECT_EQ(dispatch->session, sid);
  ASSERT_EQ(dispatch->statements.size(), 1u);
  EXPECT_EQ(dispatch->statements[0].statement.body, "payload");
}

// 3.2.1 "OPEN of a session the broker already has SHALL update its settings
// and owner (the sender), keeping its queues: this is how a client re-opens
// its session after reconnecting."
TEST_P(BrokerSpec, Clause_3_2_1_OpenAgainUpdatesSettingsAndOwnerKeepingTheQueue) {
  start();
  Peer old_client(ctx_, endpoint_), new_client(ctx_, endpoint_);
  const SessionId sid = open(old_client, 1);
  old_client.send(proto::EncodeSubmit(sid, 0, Urls(3)));
  ASSERT_TRUE(WaitFor([&] { return stats().queued.load() == 3; }, 5s));
  SessionSettings wider;
  wider.workers = 3;
  new_client.send(proto::Encode(proto::Open{sid, wider, 0}));
  auto opened = new_client.recv();
  ASSERT_EQ(CommandOf(opened), proto::Command::kOpened);
  EXPECT_EQ(proto::DecodeSessionRef(opened)->session, sid);
  EXPECT_EQ(stats().queued.load(), 3u) << "re-opening dropped the queue";
  // New settings: the worker is told a window of 3 and gets all 3.
  Peer worker(ctx_, endpoint_);
  ready(worker, 100);
  auto session = worker.recv();
  ASSERT_EQ(CommandOf(session), proto::Command::kSession);
  EXPECT_EQ(proto::DecodeSession(session)->settings.workers, 3u);
  EXPECT_EQ(IndicesOf(worker.recv()), (std::vector<std::uint64_t>{0, 1, 2}));
  // New owner: results go to the connection that re-opened.
  worker.send(ResultsFor(sid, {0, 1, 2}));
  auto results = new_client.recv();
  ASSERT_EQ(CommandOf(results), proto::Command::kResults);
  EXPECT_EQ(proto::DecodeResults(results)->results.size(), 3u);
  old_client.send(proto::EncodeHeartbeat(NewSessionId()));
  EXPECT_EQ(CommandOf(old_client.recv_any()), proto::Command::kError) << "the old owner got results";
}

// 3.2.5 "CANCEL SHALL drop the session's queued statements and leases and
// send END_SESSION to every worker that holds the session. The session stays
// open. CANCEL has no reply."
TEST_P(BrokerSpec, Clause_3_2_5_CancelDropsQueueAndLeasesAndEndsTheSessionOnWorkers) {
  start();
  Peer client(ctx_, endpoint_), w1(ctx_, endpoint_), w2(ctx_, endpoint_);
  ready(w1, 2);
  ready(w2, 2);
  const SessionId sid = open(client, 4);
  client.send(proto::EncodeSubmit(sid, 0, Urls(6)));
  // Both workers fill their 2 slots; 2 statements stay queued.
  const auto on_w1 = expect_session_and_dispatch(w1, sid, 2);
  const auto on_w2 = expect_session_and_dispatch(w2, sid, 2);
  ASSERT_EQ(on_w1.size() + on_w2.size(), 4u);
  ASSERT_TRUE(WaitFor([&] { return stats().queued.load() == 2 && stats().in_flight.load() == 4; }, 5s));
  client.send(proto::Encode(proto::Command::kCancel, proto::SessionRef{sid}));
  for (Peer* w : {&w1, &w2}) {
    auto end = w->recv();
    ASSERT_EQ(CommandOf(end), proto::Command::kEndSession);
    EXPECT_EQ(proto::DecodeSessionRef(end)->session, sid);
  }
  // No reply to CANCEL, and the session is still open: the first answer the
  // client gets is its probe's HEARTBEAT.
  client.send(proto::EncodeHeartbeat(sid));
  ASSERT_EQ(CommandOf(client.recv_any()), proto::Command::kHeartbeat);
  EXPECT_EQ(stats().sessions.load(), 1u);
  EXPECT_EQ(stats().queued.load(), 0u);
  EXPECT_EQ(stats().in_flight.load(), 0u);
  // The leases are gone: a late result is a duplicate ...
  w1.send(ResultsFor(sid, {on_w1.at(0)}));
  ASSERT_TRUE(WaitFor([&] { return stats().duplicates_dropped.load() == 1; }, 5s));
  // ... and both workers have their whole credit for another session.
  Peer other(ctx_, endpoint_);
  const SessionId sid2 = open(other, 8);
  other.send(proto::EncodeSubmit(sid2, 0, Urls(8)));
  EXPECT_EQ(expect_session_and_dispatch(w1, sid2, 2).size(), 2u);
  EXPECT_EQ(expect_session_and_dispatch(w2, sid2, 2).size(), 2u);
  // The client of the cancelled session got nothing meanwhile.
  client.send(proto::EncodeHeartbeat(sid));
  EXPECT_EQ(CommandOf(client.recv_any()), proto::Command::kHeartbeat);
}

// 3.2.7 "A broker that has the session SHALL note the client alive (and its
// current routing id) and answer HEARTBEAT"
TEST_P(BrokerSpec, Clause_3_2_7_HeartbeatNamingASessionIsAnsweredAndMovesItsOwner) {
  start();
  Peer first(ctx_, endpoint_), second(ctx_, endpoint_);
  const SessionId sid = open(first, 1);
  first.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  ASSERT_TRUE(WaitFor([&] { return stats().queued.load() == 1; }, 5s));
  // The client reconnected: its heartbeat comes from a new routing id.
  second.send(proto::EncodeHeartbeat(sid));
  ASSERT_EQ(CommandOf(second.recv_any()), proto::Command::kHeartbeat);
  Peer worker(ctx_, endpoint_);
  ready(worker, 1);
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 1), (std::vector<std::uint64_t>{0}));
  worker.send(ResultsFor(sid, {0}));
  auto results = second.recv();
  ASSERT_EQ(CommandOf(results), proto::Command::kResults) << "results did not follow the heartbeat's routing id";
  first.send(proto::EncodeHeartbeat(NewSessionId()));
  EXPECT_EQ(CommandOf(first.recv_any()), proto::Command::kError) << "results went to the old routing id";
}

// 3.4.4 "A broker that receives RESULTS or a plain HEARTBEAT [] from a peer
// that is not a registered worker SHALL drop them and answer ERROR
// not_found (session nil)." A registered worker's HEARTBEAT gets no answer.
TEST_P(BrokerSpec, Clause_3_4_4_PlainHeartbeatFromAnUnknownPeerIsNotFound) {
  start();
  Peer peer(ctx_, endpoint_);
  peer.send(proto::EncodeHeartbeat());
  auto reply = peer.recv_any();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  auto e = proto::DecodeError(reply);
  EXPECT_EQ(e->code, StatusCode::kNotFound);
  EXPECT_EQ(e->session, std::nullopt);
  ready(peer, 10);
  peer.send(proto::EncodeHeartbeat());
  // A probe answered in order: OPENED must be the next reply.
  peer.send(proto::Encode(proto::Open{NewSessionId(), SessionSettings{}, 0}));
  EXPECT_EQ(CommandOf(peer.recv_any()), proto::Command::kOpened) << "a registered worker's HEARTBEAT was answered";
}

// 3.3.1 "The broker SHALL answer OPEN with OPENED, or with ERROR
// resource_exhausted when it has max_sessions sessions open."
TEST_P(BrokerSpec, Clause_3_3_1_OpenBeyondMaxSessionsIsResourceExhausted) {
  start([](BrokerOptions& o) { o.max_sessions = 2; });
  Peer client(ctx_, endpoint_);
  const SessionId a = open(client, 1);
  const SessionId b = open(client, 1);
  const SessionId c = NewSessionId();
  client.send(proto::Encode(proto::Open{c, SessionSettings{}, 0}));
  auto refused = client.recv();
  ASSERT_EQ(CommandOf(refused), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(refused)->code, StatusCode::kResourceExhausted);
  EXPECT_EQ(stats().sessions.load(), 2u);
  // Re-opening an open session is no new session.
  client.send(proto::Encode(proto::Open{a, SessionSettings{}, 0}));
  EXPECT_EQ(CommandOf(client.recv()), proto::Command::kOpened);
  // Room again once one is closed.
  client.send(proto::Encode(proto::Command::kClose, proto::SessionRef{b}));
  ASSERT_EQ(CommandOf(client.recv()), proto::Command::kClosed);
  client.send(proto::Encode(proto::Open{c, SessionSettings{}, 0}));
  auto opened = client.recv();
  ASSERT_EQ(CommandOf(opened), proto::Command::kOpened);
  EXPECT_EQ(proto::DecodeSessionRef(opened)->session, c);
}

// 3.4.2 "The number of body frames SHALL equal the number of results;
// otherwise the message is malformed."
TEST_P(BrokerSpec, Clause_3_4_2_ResultsWithWrongBodyCountAreMalformed) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{0, 1}));
  proto::Frames short_one = ResultsFor(sid, {0, 1}, "bad");
  short_one.pop_back();
  proto::Frames long_one = ResultsFor(sid, {0, 1}, "bad");
  long_one.emplace_back("extra", 5);
  worker.send(std::move(short_one));
  worker.send(std::move(long_one));
  ASSERT_TRUE(WaitFor([&] { return stats().malformed.load() == 2; }, 5s));
  // Dropped without settling a lease: the well-formed answer is forwarded whole.
  worker.send(ResultsFor(sid, {0, 1}));
  auto forwarded = proto::DecodeResults(client.recv());
  ASSERT_TRUE(forwarded.has_value());
  ASSERT_EQ(forwarded->results.size(), 2u);
  EXPECT_EQ(forwarded->results[0].response.body, "body0");
  EXPECT_EQ(forwarded->results[1].response.body, "body1");
}

// 3.4.4 "A broker that receives RESULTS from a peer that is not a registered
// worker SHALL drop them and answer ERROR not_found"
TEST_P(BrokerSpec, Clause_3_4_4_ResultsFromAnUnregisteredPeerAreDropped) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_), stranger(ctx_, endpoint_);
  ready(worker, 100);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 1), (std::vector<std::uint64_t>{0}));
  stranger.send(ResultsFor(sid, {0}, "forged"));
  auto reply = stranger.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kNotFound);
  // The lease is untouched: the registered worker's result is the one forwarded.
  worker.send(ResultsFor(sid, {0}));
  auto forwarded = proto::DecodeResults(client.recv());
  ASSERT_TRUE(forwarded.has_value());
  EXPECT_EQ(forwarded->results.at(0).response.body, "body0");
}

// 3.4.6 "Broker and workers SHALL use the same heartbeat period; a worker
// heartbeating slower than the broker's `liveness` periods is presumed dead
// again and again."
// Deployments choose the period (--heartbeat-ms on both); the defaults of
// the library, which both programs start from, must agree.
TEST(BrokerSpecDefaults, Clause_3_4_6_BrokerAndWorkerDefaultToTheSameHeartbeat) {
  EXPECT_EQ(BrokerOptions{}.heartbeat_interval, WorkerOptions{}.heartbeat_interval);
}

// 3.5.1 "The broker SHALL send SESSION to a worker before the first DISPATCH
// of that session to it. Settings travel once per session and worker, never
// per statement."
TEST_P(BrokerSpec, Clause_3_5_1_SessionOncePerWorkerBeforeItsFirstDispatch) {
  start();
  Peer client(ctx_, endpoint_), w1(ctx_, endpoint_), w2(ctx_, endpoint_);
  ready(w1, 1);
  ready(w2, 1);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(6)));
  // One slot each: every result frees the worker for one more DISPATCH.
  std::map<Peer*, int> sessions_seen;
  std::set<std::uint64_t> done;
  for (int round = 0; round < 3; ++round) {
    for (Peer* w : {&w1, &w2}) {
      proto::Frames f = w->recv();
      while (CommandOf(f) == proto::Command::kSession) {
        EXPECT_EQ(proto::DecodeSession(f)->session, sid);
        EXPECT_EQ(proto::DecodeSession(f)->settings.workers, 10u);
        ++sessions_seen[w];
        f = w->recv();
      }
      ASSERT_EQ(CommandOf(f), proto::Command::kDispatch);
      EXPECT_EQ(sessions_seen[w], 1) << "DISPATCH without exactly one SESSION before it";
      const auto indices = IndicesOf(f);
      ASSERT_EQ(indices.size(), 1u);
      done.insert(indices[0]);
      w->send(ResultsFor(sid, indices));
    }
  }
  EXPECT_EQ(done.size(), 6u);
}

// 3.5.1 "The broker SHALL send SESSION to a worker before the first DISPATCH
// of that session to it." A worker that sends READY again has dropped every
// session it held (3.4.5), so its next DISPATCH of one needs a SESSION again.
TEST_P(BrokerSpec, Clause_3_5_1_SessionAgainAfterTheWorkerRegistersAgain) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 10);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{0, 1}));
  worker.send(ResultsFor(sid, {0, 1}));  // nothing leased any more
  ASSERT_EQ(CommandOf(client.recv()), proto::Command::kResults);
  worker.send(proto::Encode(proto::Ready{"w", "h", 10}));
  // READY has no reply. A result for an index never leased, sent after it on
  // the same connection, is counted once READY has been taken.
  worker.send(ResultsFor(sid, {99}));
  ASSERT_TRUE(WaitFor([&] { return stats().duplicates_dropped.load() == 1; }, 5s));
  client.send(proto::EncodeSubmit(sid, 2, Urls(2)));
  EXPECT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{2, 3}));
}

// 3.5.3 "A later DISPATCH of the same session is preceded by a new SESSION."
TEST_P(BrokerSpec, Clause_3_5_3_DispatchAfterEndSessionIsPrecededByANewSession) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{0, 1}));
  client.send(proto::Encode(proto::Command::kCancel, proto::SessionRef{sid}));
  ASSERT_EQ(CommandOf(worker.recv()), proto::Command::kEndSession);
  client.send(proto::EncodeSubmit(sid, 2, Urls(2)));
  EXPECT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{2, 3}));
}

// 4.3 "The broker SHALL forward a result to the session's owner only if the
// statement is leased to the sending worker, and then SHALL end the lease;
// other results are duplicates (...) and SHALL be dropped and counted."
TEST_P(BrokerSpec, Clause_4_3_ResultFromAWorkerWithoutTheLeaseIsDropped) {
  start();
  Peer client(ctx_, endpoint_), holder(ctx_, endpoint_);
  ready(holder, 100);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(1)));
  ASSERT_EQ(expect_session_and_dispatch(holder, sid, 1), (std::vector<std::uint64_t>{0}));
  Peer other(ctx_, endpoint_);
  ready(other, 100);
  other.send(ResultsFor(sid, {0}, "other"));
  ASSERT_TRUE(WaitFor([&] { return stats().duplicates_dropped.load() == 1; }, 5s));
  holder.send(ResultsFor(sid, {0}, "holder"));
  auto forwarded = proto::DecodeResults(client.recv());
  ASSERT_TRUE(forwarded.has_value());
  EXPECT_EQ(forwarded->results.at(0).response.body, "holder0");
  EXPECT_EQ(stats().in_flight.load(), 0u);
}

// 4.3 "When every result of a RESULTS message is forwarded, the broker SHALL
// forward the worker's frames unchanged (no re-encoding, no body copy)."
TEST_P(BrokerSpec, Clause_4_3_FullyForwardedResultsKeepTheWorkersFrames) {
  start();
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 100);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(2)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 2), (std::vector<std::uint64_t>{0, 1}));
  // Valid, but not as Gatherer's encoder writes it: fixed-width integers
  // where one byte would do. A re-encoded message would differ.
  auto pack_result = [](Packer& pk, std::uint64_t index) {
    pk.pack_array(8);
    pk.pack_fix_uint64(index);
    pk.pack_fix_uint16(200);
    pk.pack_array(1);
    pk.pack_array(2);
    testing::PackStr(pk, "X-Seen");
    testing::PackStr(pk, "yes");
    pk.pack_fix_uint8(0);
    testing::PackStr(pk, "");
    pk.pack_fix_uint32(1);
    pk.pack_fix_uint64(1234);
    testing::PackStr(pk, "w");
  };
  proto::Frames sent = testing::Raw(proto::Command::kResults, [&](Packer& pk) {
    pk.pack_array(2);
    testing::PackBin(pk, sid.raw());
    pk.pack_array(2);
    pack_result(pk, 0);
    pack_result(pk, 1);
  });
  sent.emplace_back("first body", 10);
  sent.emplace_back(std::string(100'000, 'b').data(), 100'000);
  std::vector<std::string> expected;
  for (const auto& f : sent) expected.push_back(f.to_string());
  worker.send(std::move(sent));
  auto forwarded = client.recv();
  ASSERT_EQ(forwarded.size(), expected.size());
  for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_EQ(forwarded[i].to_string(), expected[i]) << "frame " << i;
}

// 4.6 "Every message from a client naming a session (OPEN, SUBMIT,
// HEARTBEAT) keeps the session alive."
TEST_P(BrokerSpec, Clause_4_6_MessagesNamingTheSessionKeepItAlive) {
  constexpr auto kTtl = 300ms;
  start([&](BrokerOptions& o) {
    o.heartbeat_interval = 50ms;
    o.heartbeat_liveness = 1000;  // no raw worker here is presumed dead
    o.session_ttl = kTtl;
  });
  Peer client(ctx_, endpoint_);
  const SessionId sid = open(client, 1);
  std::uint64_t next_index = 0;
  // Each kind alone, for 2.5 TTLs, every 50 ms.
  const std::vector<std::pair<const char*, std::function<void()>>> kinds = {
      {"HEARTBEAT", [&] {
         client.send(proto::EncodeHeartbeat(sid));
         EXPECT_EQ(CommandOf(client.recv_any()), proto::Command::kHeartbeat);
       }},
      {"SUBMIT", [&] {
         client.send(proto::EncodeSubmit(sid, next_index++, Urls(1)));  // no worker: queued, no reply
         (void)client.recv_any(50ms);
       }},
      {"OPEN", [&] {
         SessionSettings s;
         s.workers = 1;
         client.send(proto::Encode(proto::Open{sid, s, 0}));
         EXPECT_EQ(CommandOf(client.recv_any()), proto::Command::kOpened);
       }},
  };
  for (const auto& [name, send_one] : kinds) {
    const auto until = std::chrono::steady_clock::now() + kTtl * 5 / 2;
    while (std::chrono::steady_clock::now() < until) {
      send_one();
      (void)client.recv_any(50ms);  // the client's own pace; nothing else is sent
    }
    EXPECT_EQ(stats().sessions_expired.load(), 0u) << name << " did not keep the session alive";
  }
  client.send(proto::EncodeHeartbeat(sid));
  EXPECT_EQ(CommandOf(client.recv_any()), proto::Command::kHeartbeat);
}

// 4.6 "A session that nothing has kept alive for `session_ttl` (default
// 10 s) SHALL be cancelled as by CANCEL (§3.2.5) and forgotten."
TEST_P(BrokerSpec, Clause_4_6_SilentSessionIsCancelledAndForgotten) {
  start([](BrokerOptions& o) {
    o.heartbeat_interval = 50ms;
    o.heartbeat_liveness = 1000;  // the raw worker need not heartbeat
    o.session_ttl = 300ms;
  });
  Peer client(ctx_, endpoint_), worker(ctx_, endpoint_);
  ready(worker, 1);
  const SessionId sid = open(client, 10);
  client.send(proto::EncodeSubmit(sid, 0, Urls(3)));
  ASSERT_EQ(expect_session_and_dispatch(worker, sid, 1), (std::vector<std::uint64_t>{0}));
  // The client falls silent. Cancelled: the worker holding it is told.
  auto end = worker.recv();
  ASSERT_EQ(CommandOf(end), proto::Command::kEndSession);
  EXPECT_EQ(proto::DecodeSessionRef(end)->session, sid);
  EXPECT_EQ(stats().queued.load(), 0u);
  EXPECT_EQ(stats().in_flight.load(), 0u);
  // Forgotten (the counters are published right after END_SESSION).
  EXPECT_TRUE(WaitFor([&] { return stats().sessions.load() == 0 && stats().sessions_expired.load() == 1; }, 5s));
  client.send(proto::EncodeHeartbeat(sid));
  auto reply = client.recv();
  ASSERT_EQ(CommandOf(reply), proto::Command::kError);
  EXPECT_EQ(proto::DecodeError(reply)->code, StatusCode::kNotFound);
}

INSTANTIATE_TEST_SUITE_P(Transports, BrokerSpec, ::testing::Values("tcp", "ipc"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace gatherer
