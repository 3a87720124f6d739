#include "gatherer/protocol.h"

#include <gtest/gtest.h>
#include <msgpack.hpp>

#include <sys/mman.h>

#include <cstring>
#include <functional>
#include <random>
#include <span>

#include "frames.h"

namespace gatherer::protocol {
namespace {

using testing::SampleSettings;

template <typename T>
T Must(Result<T> r) {
  EXPECT_TRUE(r.has_value()) << (r.has_value() ? "" : r.error().ToString());
  return std::move(*r);
}

Command CommandOf(const Frames& f) { return Must(PeekCommand(f)); }

TEST(ProtocolTest, OpenRoundTrips) {
  Open m{NewSessionId(), SampleSettings(), 50};
  Frames f = Encode(m);
  EXPECT_EQ(CommandOf(f), Command::kOpen);
  Open back = Must(DecodeOpen(f));
  EXPECT_EQ(back.session, m.session);
  EXPECT_EQ(back.prefetch, 50u);
  EXPECT_EQ(back.settings.workers, 50u);
  EXPECT_EQ(back.settings.base_url, m.settings.base_url);
  EXPECT_EQ(back.settings.headers, m.settings.headers);
  EXPECT_EQ(back.settings.timeout_ms, 1500u);
  EXPECT_EQ(back.settings.max_attempts, 2u);
  EXPECT_EQ(back.settings.max_body_bytes, 1u << 20);
  EXPECT_EQ(back.settings.accept_max, 299);
}

TEST(ProtocolTest, SubmitAndDispatchRoundTrip) {
  Statements m{NewSessionId(), {}, 41};
  for (std::uint64_t i = 0; i < 3; ++i) {
    WireStatement ws;
    ws.index = 1'000'000'000'000ull + i;
    ws.statement.method = i == 1 ? "POST" : "GET";
    ws.statement.url = "http://h/" + std::to_string(i);
    ws.statement.headers = {{"K", "v" + std::to_string(i)}};
    ws.statement.body = std::string("\0\xff\x01", 3);
    ws.statement.timeout_ms = 10 * i;
    if (i == 2) ws.statement.idempotent = false;
    m.statements.push_back(ws);
  }
  for (Command c : {Command::kSubmit, Command::kDispatch}) {
    Frames f = Encode(c, m);
    EXPECT_EQ(CommandOf(f), c);
    Statements back = Must(DecodeStatements(f));
    EXPECT_EQ(back.session, m.session);
    // Only DISPATCH carries the broker's order seq (§3.5, §3.7.3).
    EXPECT_EQ(back.seq, c == Command::kDispatch ? 41u : 0u) << CommandName(c);
    ASSERT_EQ(back.statements.size(), 3u);
    for (std::size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(back.statements[i].index, m.statements[i].index);
      EXPECT_EQ(back.statements[i].statement.method, m.statements[i].statement.method);
      EXPECT_EQ(back.statements[i].statement.url, m.statements[i].statement.url);
      EXPECT_EQ(back.statements[i].statement.headers, m.statements[i].statement.headers);
      EXPECT_EQ(back.statements[i].statement.body, m.statements[i].statement.body);
      EXPECT_EQ(back.statements[i].statement.timeout_ms, m.statements[i].statement.timeout_ms);
      EXPECT_EQ(back.statements[i].statement.idempotent, m.statements[i].statement.idempotent);
    }
  }
}

TEST(ProtocolTest, EncodeSubmitNumbersFromFirstIndex) {
  std::vector<Statement> list = {Get("http://a/0"), Get("http://a/1")};
  const SessionId sid = NewSessionId();
  Statements back = Must(DecodeStatements(EncodeSubmit(sid, 40, list)));
  ASSERT_EQ(back.statements.size(), 2u);
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.statements[0].index, 40u);
  EXPECT_EQ(back.statements[1].index, 41u);
  EXPECT_EQ(back.statements[1].statement.url, "http://a/1");
}

// §3.4.2: frame 2 is [session, seq], frame 3 the list of results, frame
// 4 + i the body of result i.
TEST(ProtocolTest, ResultsRoundTripWithBodyFrames) {
  Results m{NewSessionId(), 123'456'789'012ull, {}};
  WireResult ok;
  ok.index = 7;
  ok.response.status = 200;
  ok.response.headers = {{"Content-Type", "application/json"}};
  ok.response.body = std::string(100'000, 'x');
  ok.response.attempts = 1;
  ok.response.elapsed_us = 1500;
  ok.response.worker = "w1";
  WireResult bad;
  bad.index = 8;
  bad.response.status = 0;
  bad.response.error = ResponseError{StatusCode::kUnavailable, "connection refused"};
  bad.response.attempts = 4;
  m.results = {ok, bad};
  const SessionId sid = m.session;
  Frames f = Encode(std::move(m));
  ASSERT_EQ(f.size(), 6u);  // signature, command, [session, seq], results, 2 bodies
  EXPECT_EQ(f[4].size(), 100'000u);
  EXPECT_EQ(f[5].size(), 0u);
  // Frame 2 is exactly [session, seq].
  {
    auto head = msgpack::unpack(static_cast<const char*>(f[2].data()), f[2].size());
    ASSERT_EQ(head->type, msgpack::type::ARRAY);
    ASSERT_EQ(head->via.array.size, 2u);
    EXPECT_EQ(head->via.array.ptr[0].type, msgpack::type::BIN);
    EXPECT_EQ(head->via.array.ptr[1].as<std::uint64_t>(), 123'456'789'012ull);
    auto list = msgpack::unpack(static_cast<const char*>(f[3].data()), f[3].size());
    ASSERT_EQ(list->type, msgpack::type::ARRAY);
    EXPECT_EQ(list->via.array.size, 2u);
  }
  Results back = Must(DecodeResults(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.seq, 123'456'789'012ull);
  ASSERT_EQ(back.results.size(), 2u);
  EXPECT_EQ(back.results[0].index, 7u);
  EXPECT_EQ(back.results[0].response.status, 200);
  EXPECT_EQ(back.results[0].response.body, ok.response.body);
  EXPECT_EQ(back.results[0].response.headers, ok.response.headers);
  EXPECT_FALSE(back.results[0].response.error.has_value());
  EXPECT_EQ(back.results[0].response.worker, "w1");
  ASSERT_TRUE(back.results[1].response.error.has_value());
  EXPECT_EQ(back.results[1].response.error->code, StatusCode::kUnavailable);
  EXPECT_EQ(back.results[1].response.error->message, "connection refused");
  EXPECT_EQ(back.results[1].response.attempts, 4u);
  ResultsIndex idx = Must(DecodeResultsIndex(f));
  EXPECT_EQ(idx.session, sid);
  EXPECT_EQ(idx.seq, 123'456'789'012ull);
  EXPECT_EQ(idx.indices, (std::vector<std::uint64_t>{7, 8}));
}

// Short bodies are copied into their frame and long ones handed over; either
// way each body arrives whole, byte for byte, around the boundary too.
TEST(ProtocolTest, ResultsBodiesOfEverySizeArriveWhole) {
  Results m{NewSessionId(), 1, {}};
  const std::vector<std::size_t> sizes = {0, 1, 33, 34, 255, 256, 257, 4096, 1 << 20};
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    WireResult r;
    r.index = i;
    r.response.status = 200;
    r.response.body.resize(sizes[i]);
    for (std::size_t k = 0; k < sizes[i]; ++k) r.response.body[k] = static_cast<char>('a' + (k + i) % 26);
    m.results.push_back(std::move(r));
  }
  const Results sent = m;
  Frames f = Encode(std::move(m));
  ASSERT_EQ(f.size(), 4 + sizes.size());
  Results back = Must(DecodeResults(f));
  ASSERT_EQ(back.results.size(), sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    EXPECT_EQ(back.results[i].response.body, sent.results[i].response.body) << "body of " << sizes[i] << " bytes";
  }
}

// An empty RESULTS is still [session, seq] + an empty list, no body frame.
TEST(ProtocolTest, EmptyResultsRoundTrip) {
  const SessionId sid = NewSessionId();
  Frames f = Encode(Results{sid, 3, {}});
  ASSERT_EQ(f.size(), 4u);
  Results back = Must(DecodeResults(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.seq, 3u);
  EXPECT_TRUE(back.results.empty());
}

// §3.4.2, §3.6.1: the broker writes a frame 2 of its own and forwards
// frames 3 onwards unchanged.
TEST(ProtocolTest, RestampResultsReplacesOnlyFrameTwo) {
  const SessionId worker_sid = NewSessionId();
  Results m{worker_sid, 17, {}};
  for (std::uint64_t i : {4u, 5u}) {
    WireResult wr;
    wr.index = i;
    wr.response.status = 201;
    wr.response.body = "body" + std::to_string(i);
    m.results.push_back(std::move(wr));
  }
  Frames f = Encode(std::move(m));
  std::vector<std::string> before;
  for (const auto& frame : f) before.push_back(frame.to_string());
  const SessionId sid = NewSessionId();
  RestampResults(f, sid, 1);
  ASSERT_EQ(f.size(), before.size());
  for (std::size_t i = 0; i < f.size(); ++i) {
    if (i == 2) continue;
    EXPECT_EQ(f[i].to_string(), before[i]) << "frame " << i << " changed";
  }
  EXPECT_NE(f[2].to_string(), before[2]);
  Results back = Must(DecodeResults(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.seq, 1u);
  ASSERT_EQ(back.results.size(), 2u);
  EXPECT_EQ(back.results[1].index, 5u);
  EXPECT_EQ(back.results[1].response.status, 201);
  EXPECT_EQ(back.results[1].response.body, "body5");
  // Restamped again (a SYNC re-send keeps its seq; a new one is another).
  RestampResults(f, sid, 1ull << 40);
  EXPECT_EQ(Must(DecodeResultsIndex(f)).seq, 1ull << 40);
}

TEST(ProtocolTest, SessionRefMessagesRoundTrip) {
  const SessionId sid = NewSessionId();
  for (Command c : {Command::kCancel, Command::kClose, Command::kOpened, Command::kClosed}) {
    Frames f = Encode(c, SessionRef{sid});
    EXPECT_EQ(CommandOf(f), c);
    EXPECT_EQ(Must(DecodeSessionRef(f)).session, sid);
  }
}

TEST(ProtocolTest, SessionReadyErrorHeartbeatRoundTrip) {
  const SessionId sid = NewSessionId();
  Session s = Must(DecodeSession(Encode(Session{sid, SampleSettings(), 9})));
  EXPECT_EQ(s.session, sid);
  EXPECT_EQ(s.settings.base_url, "http://127.0.0.1:8080");
  EXPECT_EQ(s.seq, 9u);

  Ready r = Must(DecodeReady(Encode(Ready{"w-1", "host", 2048})));
  EXPECT_EQ(r.worker_id, "w-1");
  EXPECT_EQ(r.host, "host");
  EXPECT_EQ(r.slots, 2048u);
  EXPECT_EQ(r.pid, 0u);
  EXPECT_EQ(Must(DecodeReady(Encode(Ready{"w-1", "host", 1, 4242}))).pid, 4242u);

  ErrorReply e = Must(DecodeError(Encode(ErrorReply{StatusCode::kNotFound, "no such session", sid})));
  EXPECT_EQ(e.code, StatusCode::kNotFound);
  EXPECT_EQ(e.message, "no such session");
  EXPECT_EQ(e.session, sid);
  ErrorReply e2 = Must(DecodeError(Encode(ErrorReply{StatusCode::kInternal, "x", std::nullopt})));
  EXPECT_FALSE(e2.session.has_value());

  EXPECT_EQ(CommandOf(EncodeHeartbeat()), Command::kHeartbeat);
}

TEST(ProtocolTest, MaxBodyBytesOverOneFrameIsMalformed) {
  SessionSettings s;
  s.max_body_bytes = kMaxResponseBody + 1;
  EXPECT_FALSE(DecodeOpen(Encode(Open{NewSessionId(), s, 0})).has_value());
  s.max_body_bytes = kMaxResponseBody;
  EXPECT_TRUE(DecodeOpen(Encode(Open{NewSessionId(), s, 0})).has_value());
}

TEST(ProtocolTest, DrainingAndDisconnectRoundTrip) {
  for (Command c : {Command::kDraining, Command::kDisconnect}) {
    Frames f = EncodeEmpty(c);
    EXPECT_EQ(CommandOf(f), c);
    EXPECT_TRUE(DecodeEmpty(f).ok());
  }
  // The header must still be an array, and no body frames are allowed.
  Frames bad = Encode(Command::kDisconnect, SessionRef{NewSessionId()});
  bad[2] = zmq::message_t("\xc0", 1);  // msgpack nil
  EXPECT_EQ(DecodeEmpty(bad).code(), StatusCode::kInvalidArgument);
  Frames extra = EncodeEmpty(Command::kDraining);
  extra.emplace_back("x", 1);
  EXPECT_FALSE(DecodeEmpty(extra).ok());
}

// ---- GTR/2 messages (§3.2, §3.3, §3.4, §3.5) -------------------------------

// §3.5: END_SESSION is [session, seq].
TEST(ProtocolTest, EndSessionRoundTrips) {
  const SessionId sid = NewSessionId();
  Frames f = Encode(EndSession{sid, 77});
  EXPECT_EQ(CommandOf(f), Command::kEndSession);
  EXPECT_EQ(f.size(), 3u);
  EndSession back = Must(DecodeEndSession(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.seq, 77u);
  // Without its seq it is malformed.
  EXPECT_FALSE(DecodeEndSession(Encode(Command::kEndSession, SessionRef{sid})).has_value());
}

// §3.5: SESSION is [session, settings, seq]; without the seq, malformed.
TEST(ProtocolTest, SessionCarriesItsOrderSeq) {
  const SessionId sid = NewSessionId();
  Session back = Must(DecodeSession(Encode(Session{sid, SampleSettings(), 1ull << 33})));
  EXPECT_EQ(back.seq, 1ull << 33);
  EXPECT_EQ(back.settings.workers, 50u);
  auto no_seq = testing::Raw(Command::kSession, [&](auto& pk) {
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_map(0);
  });
  EXPECT_FALSE(DecodeSession(no_seq).has_value());
}

// §3.5: DISPATCH is [session, [statement, ...], seq]; a SUBMIT layout under
// the DISPATCH command (no seq) is malformed, and so is a seq that is not
// an unsigned integer.
TEST(ProtocolTest, DispatchWithoutSeqIsMalformed) {
  const SessionId sid = NewSessionId();
  Statements m{sid, {WireStatement{5, Get("http://a/")}}, 12};
  Frames dispatch = Encode(Command::kDispatch, m);
  EXPECT_EQ(Must(DecodeStatements(dispatch)).seq, 12u);
  Frames submit = Encode(Command::kSubmit, m);
  EXPECT_EQ(Must(DecodeStatements(submit)).seq, 0u);
  // The SUBMIT's header under DISPATCH's command byte.
  const auto byte = static_cast<std::uint8_t>(Command::kDispatch);
  submit[1] = zmq::message_t(&byte, 1);
  auto missing = DecodeStatements(submit);
  ASSERT_FALSE(missing.has_value());
  EXPECT_EQ(missing.error().code(), StatusCode::kInvalidArgument);
  auto negative = testing::Raw(Command::kDispatch, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(0);
    pk.pack(-1);
  });
  EXPECT_FALSE(DecodeStatements(negative).has_value());
  auto nil_seq = testing::Raw(Command::kDispatch, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(0);
    pk.pack_nil();
  });
  EXPECT_FALSE(DecodeStatements(nil_seq).has_value());
}

// §3.2 ACK [session, ack] (client -> broker); §3.5 ACK [ack] (broker -> worker).
TEST(ProtocolTest, AckRoundTripsInBothForms) {
  const SessionId sid = NewSessionId();
  Frames from_client = Encode(Ack{sid, 42});
  EXPECT_EQ(CommandOf(from_client), Command::kAck);
  Ack a = Must(DecodeAck(from_client));
  EXPECT_EQ(a.session, sid);
  EXPECT_EQ(a.seq, 42u);
  Frames to_worker = Encode(Ack{std::nullopt, 1ull << 50});
  EXPECT_EQ(CommandOf(to_worker), Command::kAck);
  Ack b = Must(DecodeAck(to_worker));
  EXPECT_FALSE(b.session.has_value());
  EXPECT_EQ(b.seq, 1ull << 50);
  // ack 0 means none has arrived (§3.1); it is valid.
  EXPECT_EQ(Must(DecodeAck(Encode(Ack{sid, 0}))).seq, 0u);
  // [session] without the ack, [] and a negative ack are malformed.
  auto session_only = testing::Raw(Command::kAck, [&](auto& pk) {
    pk.pack_array(1);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
  });
  EXPECT_FALSE(DecodeAck(session_only).has_value());
  EXPECT_FALSE(DecodeAck(testing::Raw(Command::kAck, [](auto& pk) { pk.pack_array(0); })).has_value());
  EXPECT_FALSE(DecodeAck(testing::Raw(Command::kAck, [](auto& pk) {
                 pk.pack_array(1);
                 pk.pack(-3);
               })).has_value());
}

// §3.2 SYNC [session, ack, [range, ...]].
TEST(ProtocolTest, SyncRoundTrips) {
  const SessionId sid = NewSessionId();
  Sync m{sid, 9, {{0, 1}, {5, 3}, {1ull << 40, 65536}}};
  Frames f = Encode(m);
  EXPECT_EQ(CommandOf(f), Command::kSync);
  EXPECT_EQ(f.size(), 3u);
  Sync back = Must(DecodeSync(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.ack, 9u);
  EXPECT_EQ(back.unanswered, m.unanswered);
  // No range at all is a valid SYNC (nothing unanswered).
  Sync empty = Must(DecodeSync(Encode(Sync{sid, 0, {}})));
  EXPECT_TRUE(empty.unanswered.empty());
}

// §3.3 SYNCED [session, [range, ...], seq].
TEST(ProtocolTest, SyncedRoundTrips) {
  const SessionId sid = NewSessionId();
  Synced m{sid, {{2, 2}, {10, 1}}, 1ull << 41};
  Frames f = Encode(m);
  EXPECT_EQ(CommandOf(f), Command::kSynced);
  Synced back = Must(DecodeSynced(f));
  EXPECT_EQ(back.session, sid);
  EXPECT_EQ(back.missing, m.missing);
  EXPECT_EQ(back.seq, 1ull << 41);
  Synced none = Must(DecodeSynced(Encode(Synced{sid, {}, 0})));
  EXPECT_TRUE(none.missing.empty());
  EXPECT_EQ(none.seq, 0u);
  // Without its seq (the layout before §3.6.4 named it) it is malformed.
  auto no_seq = testing::Raw(Command::kSynced, [&](auto& pk) {
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(0);
  });
  EXPECT_FALSE(DecodeSynced(no_seq).has_value());
}

// §3.1 "range: [first, count]; 1 <= count <= 65,536", in SYNC and SYNCED.
TEST(ProtocolTest, RangeCountOutsideOneTo65536IsMalformed) {
  const SessionId sid = NewSessionId();
  for (std::uint32_t count : {0u, 65537u, 0xffffffffu}) {
    EXPECT_FALSE(DecodeSync(Encode(Sync{sid, 0, {{1, 1}, {7, count}}})).has_value()) << count;
    EXPECT_FALSE(DecodeSynced(Encode(Synced{sid, {{7, count}}, 0})).has_value()) << count;
  }
  EXPECT_TRUE(DecodeSync(Encode(Sync{sid, 0, {{7, 65536}}})).has_value());
  EXPECT_TRUE(DecodeSynced(Encode(Synced{sid, {{7, 1}}, 0})).has_value());
  // A range that is not a pair, and a count over uint32.
  auto single = testing::Raw(Command::kSync, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack(0);
    pk.pack_array(1);
    pk.pack_array(1);
    pk.pack(4);
  });
  EXPECT_FALSE(DecodeSync(single).has_value());
  auto wide = testing::Raw(Command::kSynced, [&](auto& pk) {
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(1);
    pk.pack_array(2);
    pk.pack(4);
    pk.pack(std::uint64_t{1} << 32);
    pk.pack(0);
  });
  EXPECT_FALSE(DecodeSynced(wide).has_value());
  // SYNC without its ack.
  auto no_ack = testing::Raw(Command::kSync, [&](auto& pk) {
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(0);
  });
  EXPECT_FALSE(DecodeSync(no_ack).has_value());
}

// §3.4 HOLDING [seq, [[session, [index, ...]], ...]].
TEST(ProtocolTest, HoldingRoundTrips) {
  const SessionId a = NewSessionId(), b = NewSessionId();
  Holding m{31, {{a, {0, 7, 1ull << 45}}, {b, {}}}};
  Frames f = Encode(m);
  EXPECT_EQ(CommandOf(f), Command::kHolding);
  Holding back = Must(DecodeHolding(f));
  EXPECT_EQ(back.seq, 31u);
  ASSERT_EQ(back.sessions.size(), 2u);
  EXPECT_EQ(back.sessions[0].first, a);
  EXPECT_EQ(back.sessions[0].second, (std::vector<std::uint64_t>{0, 7, 1ull << 45}));
  EXPECT_EQ(back.sessions[1].first, b);
  EXPECT_TRUE(back.sessions[1].second.empty());
  Holding none = Must(DecodeHolding(Encode(Holding{0, {}})));
  EXPECT_EQ(none.seq, 0u);
  EXPECT_TRUE(none.sessions.empty());
  // Malformed: no session list; an entry without its indices; an index not
  // an unsigned integer.
  EXPECT_FALSE(DecodeHolding(testing::Raw(Command::kHolding, [](auto& pk) {
                 pk.pack_array(1);
                 pk.pack(3);
               })).has_value());
  EXPECT_FALSE(DecodeHolding(testing::Raw(Command::kHolding, [&](auto& pk) {
                 pk.pack_array(2);
                 pk.pack(3);
                 pk.pack_array(1);
                 pk.pack_array(1);
                 pk.pack_bin(16);
                 pk.pack_bin_body(a.raw().data(), 16);
               })).has_value());
  EXPECT_FALSE(DecodeHolding(testing::Raw(Command::kHolding, [&](auto& pk) {
                 pk.pack_array(2);
                 pk.pack(3);
                 pk.pack_array(1);
                 pk.pack_array(2);
                 pk.pack_bin(16);
                 pk.pack_bin_body(a.raw().data(), 16);
                 pk.pack_array(1);
                 pk.pack(std::string("1"));
               })).has_value());
}

// §3.2.7 a client's HEARTBEAT names its session; §3.4 a worker's is [].
TEST(ProtocolTest, ClientAndWorkerHeartbeatsRoundTrip) {
  const SessionId sid = NewSessionId();
  Frames client = Encode(ClientBeat{sid});
  EXPECT_EQ(CommandOf(client), Command::kHeartbeat);
  auto named = Must(DecodeHeartbeat(client));
  ASSERT_TRUE(named.has_value());
  EXPECT_EQ(named->session, sid);
  // EncodeHeartbeat(session) is the same message.
  EXPECT_EQ(EncodeHeartbeat(sid)[2].to_string(), client[2].to_string());
  auto plain = Must(DecodeHeartbeat(EncodeHeartbeat()));
  EXPECT_FALSE(plain.has_value());
  // A client heartbeat whose session is not 16 bytes is malformed.
  EXPECT_FALSE(DecodeHeartbeat(testing::Raw(Command::kHeartbeat, [](auto& pk) {
                 pk.pack_array(1);
                 pk.pack_bin(3);
                 pk.pack_bin_body("abc", 3);
               })).has_value());
}

// §3.3 HEARTBEAT [session, seq, next_index, workers] to a client; §3.5
// HEARTBEAT [seq] to a worker (READY's answer is [0], §3.4.1).
TEST(ProtocolTest, BrokerHeartbeatRoundTripsInBothForms) {
  const SessionId sid = NewSessionId();
  Frames to_client = Encode(BrokerBeat{sid, 12, 1ull << 36, 70000});
  EXPECT_EQ(CommandOf(to_client), Command::kHeartbeat);
  BrokerBeat c = Must(DecodeBrokerHeartbeat(to_client));
  EXPECT_EQ(c.session, sid);
  EXPECT_EQ(c.seq, 12u);
  EXPECT_EQ(c.next_index, 1ull << 36);
  EXPECT_EQ(c.workers, 70000u);
  EXPECT_EQ(Must(DecodeBrokerHeartbeat(Encode(BrokerBeat{sid, 0, 0, 0}))).workers, 0u);
  Frames to_worker = Encode(BrokerBeat{std::nullopt, 99, 0, 0});
  EXPECT_EQ(CommandOf(to_worker), Command::kHeartbeat);
  BrokerBeat w = Must(DecodeBrokerHeartbeat(to_worker));
  EXPECT_FALSE(w.session.has_value());
  EXPECT_EQ(w.seq, 99u);
  // READY's answer: exactly [0].
  Frames ready_answer = Encode(BrokerBeat{std::nullopt, 0, 0, 0});
  auto h = msgpack::unpack(static_cast<const char*>(ready_answer[2].data()), ready_answer[2].size());
  ASSERT_EQ(h->type, msgpack::type::ARRAY);
  ASSERT_EQ(h->via.array.size, 1u);
  EXPECT_EQ(h->via.array.ptr[0].as<std::uint64_t>(), 0u);
  // Malformed: [], [session, seq] without next_index, [session, seq,
  // next_index] without workers, workers over uint32, a negative seq.
  EXPECT_FALSE(DecodeBrokerHeartbeat(EncodeHeartbeat()).has_value());
  EXPECT_FALSE(DecodeBrokerHeartbeat(testing::Raw(Command::kHeartbeat, [&](auto& pk) {
                 pk.pack_array(2);
                 pk.pack_bin(16);
                 pk.pack_bin_body(sid.raw().data(), 16);
                 pk.pack(1);
               })).has_value());
  EXPECT_FALSE(DecodeBrokerHeartbeat(testing::Raw(Command::kHeartbeat, [&](auto& pk) {
                 pk.pack_array(3);
                 pk.pack_bin(16);
                 pk.pack_bin_body(sid.raw().data(), 16);
                 pk.pack(1);
                 pk.pack(2);
               })).has_value());
  EXPECT_FALSE(DecodeBrokerHeartbeat(testing::Raw(Command::kHeartbeat, [&](auto& pk) {
                 pk.pack_array(4);
                 pk.pack_bin(16);
                 pk.pack_bin_body(sid.raw().data(), 16);
                 pk.pack(1);
                 pk.pack(2);
                 pk.pack(std::uint64_t{1} << 32);
               })).has_value());
  EXPECT_FALSE(DecodeBrokerHeartbeat(testing::Raw(Command::kHeartbeat, [](auto& pk) {
                 pk.pack_array(1);
                 pk.pack(-1);
               })).has_value());
}

// §2.2: ERROR's layout [code, message, session | nil] is the same in every
// version, so an ERROR from a GTR/1 broker decodes here (DecodeError does
// not look at the version; only PeekCommand does).
TEST(ProtocolTest, Clause_2_2_ErrorLayoutIsTheSameAcrossVersions) {
  const SessionId sid = NewSessionId();
  // As GTR/1 wrote it, by hand.
  for (std::uint8_t version : {1, 2}) {
    Frames f = testing::Raw(Command::kError, [&](auto& pk) {
      pk.pack_array(3);
      pk.pack(static_cast<std::uint8_t>(9));
      pk.pack(std::string("unsupported protocol version 2, this peer speaks 1"));
      pk.pack_bin(16);
      pk.pack_bin_body(sid.raw().data(), 16);
    });
    const std::uint8_t sig[] = {'G', 'T', 'R', version};
    f[0] = zmq::message_t(sig, 4);
    EXPECT_EQ(PeekCommand(f).has_value(), version == kVersion);
    ErrorReply e = Must(DecodeError(f));
    EXPECT_EQ(e.code, StatusCode::kFailedPrecondition);
    EXPECT_EQ(e.message, "unsupported protocol version 2, this peer speaks 1");
    EXPECT_EQ(e.session, sid);
  }
  // And GTR/2's encoder writes exactly that layout.
  Frames ours = Encode(ErrorReply{StatusCode::kNotFound, "gone", std::nullopt});
  auto h = msgpack::unpack(static_cast<const char*>(ours[2].data()), ours[2].size());
  ASSERT_EQ(h->type, msgpack::type::ARRAY);
  ASSERT_EQ(h->via.array.size, 3u);
  EXPECT_EQ(h->via.array.ptr[0].type, msgpack::type::POSITIVE_INTEGER);
  EXPECT_EQ(h->via.array.ptr[0].as<int>(), 5);
  EXPECT_EQ(h->via.array.ptr[1].type, msgpack::type::STR);
  EXPECT_EQ(h->via.array.ptr[2].type, msgpack::type::NIL);
  EXPECT_EQ(ours.size(), 3u);
}

// ---- malformations: each is rejected with a Status, never a crash ----------

TEST(ProtocolTest, RejectsWrongVersionAsFailedPrecondition) {
  EXPECT_EQ(kVersion, 2);
  EXPECT_EQ(kSignature[3], 2);
  for (std::uint8_t version : {1, 3}) {
    Frames f = EncodeHeartbeat();
    const std::uint8_t sig[] = {'G', 'T', 'R', version};
    f[0] = zmq::message_t(sig, 4);
    auto c = PeekCommand(f);
    ASSERT_FALSE(c.has_value());
    EXPECT_EQ(c.error().code(), StatusCode::kFailedPrecondition);
    // Names both versions (§2.2).
    EXPECT_NE(c.error().message().find("version " + std::to_string(version)), std::string::npos)
        << c.error().message();
    EXPECT_NE(c.error().message().find("speaks 2"), std::string::npos) << c.error().message();
  }
}

TEST(ProtocolTest, RejectsBadSignature) {
  Frames f = EncodeHeartbeat();
  f[0] = zmq::message_t("HTTP", 4);
  EXPECT_EQ(PeekCommand(f).error().code(), StatusCode::kInvalidArgument);
  f[0] = zmq::message_t("GTR", 3);
  EXPECT_EQ(PeekCommand(f).error().code(), StatusCode::kInvalidArgument);
}

// §3.4: READY's pid was appended; a 3-element READY (pid unknown) is still valid.
TEST(ProtocolTest, Clause_3_4_1_ReadyWithoutPidIsAccepted) {
  auto f = testing::Raw(Command::kReady, [](auto& pk) {
    pk.pack_array(3);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(8);
  });
  const Ready r = Must(DecodeReady(f));
  EXPECT_EQ(r.slots, 8u);
  EXPECT_EQ(r.pid, 0u);
  auto bad = testing::Raw(Command::kReady, [](auto& pk) {
    pk.pack_array(4);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(8);
    pk.pack(std::string("pid"));
  });
  EXPECT_FALSE(DecodeReady(bad).has_value());
}

// §3.9: every control message round-trips, with its command byte.
TEST(ProtocolTest, Clause_3_9_ControlMessagesRoundTrip) {
  for (Command c : {Command::kStatus, Command::kListWorkers, Command::kListSessions, Command::kShutdown,
                    Command::kDrain}) {
    Frames f = EncodeEmpty(c);
    EXPECT_EQ(CommandOf(f), c);
    EXPECT_TRUE(DecodeEmpty(f).ok());
  }
  const StatusReport st{"0.1.0", 12345, 2, 3, 40, 50, 1000, 7, 9, 11, 250500, 99000};
  Frames fs = Encode(st);
  EXPECT_EQ(CommandOf(fs), Command::kStatusReport);
  EXPECT_EQ(Must(DecodeStatusReport(fs)), st);

  const std::vector<WorkerRow> workers = {{"w-1", "host-a", 4242, 64, 10, 1000, 3, 150, "busy"},
                                          {"w-2", "host-b", 1, 8, 0, 0, 0, 2500, "unresponsive"}};
  Frames fw = Encode(workers);
  EXPECT_EQ(CommandOf(fw), Command::kWorkersReport);
  EXPECT_EQ(Must(DecodeWorkersReport(fw)), workers);
  EXPECT_TRUE(Must(DecodeWorkersReport(Encode(std::vector<WorkerRow>{}))).empty());

  const std::vector<SessionRow> sessions = {{NewSessionId(), "127.0.0.1", 25, 5, 25, 100, 1, 60000, 12500}};
  Frames fr = Encode(sessions);
  EXPECT_EQ(CommandOf(fr), Command::kSessionsReport);
  EXPECT_EQ(Must(DecodeSessionsReport(fr)), sessions);

  Frames fn = Encode(WorkerName{"w-1"});
  EXPECT_EQ(CommandOf(fn), Command::kDrainWorker);
  EXPECT_EQ(Must(DecodeWorkerName(fn)).worker_id, "w-1");

  Frames fd = Encode(Done{"session cancelled"});
  EXPECT_EQ(CommandOf(fd), Command::kDone);
  EXPECT_EQ(Must(DecodeDone(fd)).message, "session cancelled");

  const SessionId sid = NewSessionId();
  Frames fc = Encode(Command::kCancelSession, SessionRef{sid});
  EXPECT_EQ(CommandOf(fc), Command::kCancelSession);
  EXPECT_EQ(Must(DecodeSessionRef(fc)).session, sid);
}

// §3.9, §2.4: control messages of the wrong shape are malformed.
TEST(ProtocolTest, Clause_3_9_MalformedControlMessagesAreRejected) {
  auto short_status = testing::Raw(Command::kStatusReport, [](auto& pk) {
    pk.pack_array(11);
    pk.pack(std::string("v"));
    for (int i = 0; i < 10; ++i) pk.pack(i);
  });
  EXPECT_EQ(DecodeStatusReport(short_status).error().code(), StatusCode::kInvalidArgument);
  auto bad_row = testing::Raw(Command::kWorkersReport, [](auto& pk) {
    pk.pack_array(1);
    pk.pack_array(9);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(-5);  // pid
    for (int i = 0; i < 5; ++i) pk.pack(i);
    pk.pack(std::string("busy"));
  });
  EXPECT_FALSE(DecodeWorkersReport(bad_row).has_value());
  auto short_session = testing::Raw(Command::kSessionsReport, [](auto& pk) {
    pk.pack_array(1);
    pk.pack_array(8);
    for (int i = 0; i < 8; ++i) pk.pack(i);
  });
  EXPECT_FALSE(DecodeSessionsReport(short_session).has_value());
  auto empty_name = testing::Raw(Command::kDrainWorker, [](auto& pk) {
    pk.pack_array(1);
    pk.pack(std::string(""));
  });
  EXPECT_FALSE(DecodeWorkerName(empty_name).has_value());
  auto numeric_done = testing::Raw(Command::kDone, [](auto& pk) {
    pk.pack_array(1);
    pk.pack(3);
  });
  EXPECT_FALSE(DecodeDone(numeric_done).has_value());
  Frames extra = EncodeEmpty(Command::kStatus);
  extra.emplace_back("x", 1);
  EXPECT_FALSE(DecodeEmpty(extra).ok());
}

// §3.9.7: the rate keys travel as STATUS_REPORT's 13th element, written only
// when there are any; a 12-element report (an older broker) or a nil 13th
// lists none, and an older reader's 12 fields are unchanged by the 13th.
TEST(ProtocolTest, Clause_3_9_7_StatusReportRateKeysRoundTripAndAreOptional) {
  StatusReport st{"0.1.0", 12345, 2, 3, 40, 50, 1000, 7, 9, 11, 250500, 99000};
  st.rate_keys = {{"api.example:443", {{20, 1000}, {100, 120000}}, 1234, 2, 850},
                  {"matches@api.example:443", {{5, 10000}}, 17, 0, 0},
                  {"GET /a/{}@api.example:443", {}, 3, 1, 0},
                  {"odd \"key\" \\ here", {{1, 86'400'000}}, std::uint64_t{1} << 40, 0, 60000}};
  Frames f = Encode(st);
  EXPECT_EQ(CommandOf(f), Command::kStatusReport);
  EXPECT_EQ(Must(DecodeStatusReport(f)), st);

  const StatusReport none{"0.1.0", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  auto count_elements = [](const Frames& fr) {
    auto h = msgpack::unpack(static_cast<const char*>(fr[2].data()), fr[2].size());
    return h.get().via.array.size;
  };
  EXPECT_EQ(count_elements(Encode(none)), 12u);  // encodes as before
  EXPECT_EQ(count_elements(f), 13u);
  EXPECT_TRUE(Must(DecodeStatusReport(Encode(none))).rate_keys.empty());

  auto nil_keys = testing::Raw(Command::kStatusReport, [](auto& pk) {
    pk.pack_array(13);
    pk.pack(std::string("v"));
    for (int i = 0; i < 11; ++i) pk.pack(i);
    pk.pack_nil();
  });
  auto r = Must(DecodeStatusReport(nil_keys));
  EXPECT_TRUE(r.rate_keys.empty());
  EXPECT_EQ(r.rate_1m_milli, 10u);

  // Trailing elements beyond the 13th are ignored (§2.5).
  auto longer = testing::Raw(Command::kStatusReport, [](auto& pk) {
    pk.pack_array(14);
    pk.pack(std::string("v"));
    for (int i = 0; i < 11; ++i) pk.pack(i);
    pk.pack_array(1);
    pk.pack_array(5);
    pk.pack(std::string("k"));
    pk.pack_array(1);
    pk.pack_array(2);
    pk.pack(3);
    pk.pack(1000);
    pk.pack(4);
    pk.pack(0);
    pk.pack(0);
    pk.pack(std::string("later"));
  });
  auto l = Must(DecodeStatusReport(longer));
  ASSERT_EQ(l.rate_keys.size(), 1u);
  EXPECT_EQ(l.rate_keys[0], (RateKeyRow{"k", {{3, 1000}}, 4, 0, 0}));
}

// §3.9.7, §2.4: a rate key row of the wrong shape makes the report malformed.
TEST(ProtocolTest, Clause_3_9_7_MalformedStatusRateKeysAreRejected) {
  const auto report = [](const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& keys) {
    return testing::Raw(Command::kStatusReport, [&](auto& pk) {
      pk.pack_array(13);
      pk.pack(std::string("v"));
      for (int i = 0; i < 11; ++i) pk.pack(i);
      keys(pk);
    });
  };
  const auto row = [](msgpack::packer<msgpack::sbuffer>& pk, std::uint32_t count, int used) {
    pk.pack_array(1);
    pk.pack_array(5);
    pk.pack(std::string("k"));
    pk.pack_array(1);
    pk.pack_array(2);
    pk.pack(count);
    pk.pack(1000);
    pk.pack(used);
    pk.pack(0);
    pk.pack(0);
  };
  EXPECT_TRUE(DecodeStatusReport(report([&](auto& pk) { row(pk, 5, 1); })).has_value());
  EXPECT_FALSE(DecodeStatusReport(report([&](auto& pk) { row(pk, 0, 1); })).has_value());   // count 0
  EXPECT_FALSE(DecodeStatusReport(report([&](auto& pk) { row(pk, 5, -1); })).has_value());  // negative
  EXPECT_FALSE(DecodeStatusReport(report([](auto& pk) { pk.pack(7); })).has_value());        // not an array
  EXPECT_FALSE(DecodeStatusReport(report([](auto& pk) {
                 pk.pack_array(1);
                 pk.pack_array(4);
                 pk.pack(std::string("k"));
                 pk.pack_array(0);
                 pk.pack(1);
                 pk.pack(0);
               })).has_value());  // a 4-element row
}

// DecodeResultsIndex counts failures and retries (for the broker's figures, §3.9.2).
TEST(ProtocolTest, ResultsIndexCountsFailuresAndRetries) {
  Results m{NewSessionId(), 1, {}};
  for (int i = 0; i < 4; ++i) {
    WireResult r;
    r.index = static_cast<std::uint64_t>(i);
    r.response.status = 200;
    r.response.attempts = static_cast<std::uint32_t>(i + 1);  // 0 + 1 + 2 + 3 retries
    if (i % 2) r.response.error = ResponseError{StatusCode::kHttpStatus, "503"};
    m.results.push_back(std::move(r));
  }
  const ResultsIndex idx = Must(DecodeResultsIndex(Encode(std::move(m))));
  EXPECT_EQ(idx.failed, 2u);
  EXPECT_EQ(idx.retries, 6u);
}

TEST(ProtocolTest, RejectsUnknownCommand) {
  Frames f = EncodeHeartbeat();
  const std::uint8_t unknown = 0x7f;
  f[1] = zmq::message_t(&unknown, 1);
  EXPECT_EQ(PeekCommand(f).error().code(), StatusCode::kInvalidArgument);
  f[1] = zmq::message_t("ab", 2);
  EXPECT_FALSE(PeekCommand(f).has_value());
}

TEST(ProtocolTest, RejectsTooFewFrames) {
  Frames f;
  f.emplace_back(kSignature.data(), kSignature.size());
  EXPECT_FALSE(PeekCommand(f).has_value());
  Frames g = Encode(Command::kClose, SessionRef{NewSessionId()});
  g.pop_back();  // no header
  EXPECT_FALSE(DecodeSessionRef(g).has_value());
}

TEST(ProtocolTest, RejectsTruncatedHeader) {
  Statements m{NewSessionId(), {}, 0};
  m.statements.push_back(WireStatement{0, Get("http://a/")});
  Frames f = Encode(Command::kSubmit, m);
  const std::size_t full = f[2].size();
  for (std::size_t cut = 0; cut < full; ++cut) {
    Frames t;
    t.emplace_back(f[0].data(), f[0].size());
    t.emplace_back(f[1].data(), f[1].size());
    t.emplace_back(f[2].data(), cut);
    EXPECT_FALSE(DecodeStatements(t).has_value()) << "cut at " << cut;
    EXPECT_FALSE(DecodeSubmit(t).has_value()) << "cut at " << cut;
  }
}

TEST(ProtocolTest, RejectsTrailingBytes) {
  Frames f = Encode(Command::kClose, SessionRef{NewSessionId()});
  std::string h(static_cast<const char*>(f[2].data()), f[2].size());
  h.push_back('\xc0');  // a second msgpack value (nil)
  f[2] = zmq::message_t(h.data(), h.size());
  EXPECT_FALSE(DecodeSessionRef(f).has_value());
}

TEST(ProtocolTest, RejectsWrongTypes) {
  // Session id as an integer.
  auto f1 = testing::Raw(Command::kClose, [](auto& pk) { pk.pack_array(1); pk.pack(5); });
  EXPECT_EQ(DecodeSessionRef(f1).error().code(), StatusCode::kInvalidArgument);
  // Session id of 15 bytes.
  auto f2 = testing::Raw(Command::kClose, [](auto& pk) {
    pk.pack_array(1);
    pk.pack_bin(15);
    pk.pack_bin_body("123456789012345", 15);
  });
  EXPECT_FALSE(DecodeSessionRef(f2).has_value());
  // Header is a map, not an array.
  auto f3 = testing::Raw(Command::kReady, [](auto& pk) { pk.pack_map(0); });
  EXPECT_FALSE(DecodeReady(f3).has_value());
  // Negative slots.
  auto f4 = testing::Raw(Command::kReady, [](auto& pk) {
    pk.pack_array(3);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(-1);
  });
  EXPECT_FALSE(DecodeReady(f4).has_value());
  // Zero slots is out of range.
  auto f5 = testing::Raw(Command::kReady, [](auto& pk) {
    pk.pack_array(3);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(0);
  });
  EXPECT_FALSE(DecodeReady(f5).has_value());
  // Statement with a numeric url.
  const SessionId sid = NewSessionId();
  auto f6 = testing::Raw(Command::kSubmit, [&](auto& pk) {
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(1);
    pk.pack_array(7);
    pk.pack(0);
    pk.pack(std::string("GET"));
    pk.pack(42);
    pk.pack_array(0);
    pk.pack_bin(0);
    pk.pack(0);
    pk.pack_nil();
  });
  EXPECT_FALSE(DecodeStatements(f6).has_value());
  EXPECT_FALSE(DecodeSubmit(f6).has_value());
  // Settings with window 0.
  auto f7 = testing::Raw(Command::kOpen, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_map(1);
    pk.pack(std::string("workers"));
    pk.pack(0);
    pk.pack(0);
  });
  EXPECT_FALSE(DecodeOpen(f7).has_value());
}

TEST(ProtocolTest, IgnoresUnknownSettingsKeys) {
  const SessionId sid = NewSessionId();
  auto f = testing::Raw(Command::kOpen, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_map(2);
    pk.pack(std::string("from_the_future"));
    pk.pack(1);
    pk.pack(std::string("workers"));
    pk.pack(9);
    pk.pack(0);
  });
  Open o = Must(DecodeOpen(f));
  EXPECT_EQ(o.settings.workers, 9u);
}

TEST(ProtocolTest, RejectsResultsWithWrongBodyFrameCount) {
  Results m{NewSessionId(), 1, {}};
  m.results.resize(2);
  Frames f = Encode(std::move(m));
  f.pop_back();
  EXPECT_FALSE(DecodeResults(f).has_value());
  EXPECT_FALSE(DecodeResultsIndex(f).has_value());
  f.emplace_back("a", 1);
  f.emplace_back("b", 1);
  EXPECT_FALSE(DecodeResults(f).has_value());
}

// §3.4.2: frame 2 must be [session, seq] and frame 3 the results list.
TEST(ProtocolTest, RejectsResultsWithABadFrameTwo) {
  const SessionId sid = NewSessionId();
  auto results_with_head = [&](const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& head) {
    Frames f = Encode(Results{sid, 1, std::vector<WireResult>(1)});
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    head(pk);
    f[2] = zmq::message_t(buf.data(), buf.size());
    return f;
  };
  std::vector<std::pair<const char*, Frames>> bad;
  bad.emplace_back("[session] (GTR/1)", results_with_head([&](auto& pk) {
                     pk.pack_array(1);
                     pk.pack_bin(16);
                     pk.pack_bin_body(sid.raw().data(), 16);
                   }));
  bad.emplace_back("[session, nil]", results_with_head([&](auto& pk) {
                     pk.pack_array(2);
                     pk.pack_bin(16);
                     pk.pack_bin_body(sid.raw().data(), 16);
                     pk.pack_nil();
                   }));
  bad.emplace_back("[session, -1]", results_with_head([&](auto& pk) {
                     pk.pack_array(2);
                     pk.pack_bin(16);
                     pk.pack_bin_body(sid.raw().data(), 16);
                     pk.pack(-1);
                   }));
  bad.emplace_back("[seq, session]", results_with_head([&](auto& pk) {
                     pk.pack_array(2);
                     pk.pack(1);
                     pk.pack_bin(16);
                     pk.pack_bin_body(sid.raw().data(), 16);
                   }));
  bad.emplace_back("a map", results_with_head([&](auto& pk) { pk.pack_map(0); }));
  bad.emplace_back("trailing bytes", results_with_head([&](auto& pk) {
                     pk.pack_array(2);
                     pk.pack_bin(16);
                     pk.pack_bin_body(sid.raw().data(), 16);
                     pk.pack(1);
                     pk.pack_nil();
                   }));
  // GTR/1's layout: frame 2 [session, [result, ...]], bodies from frame 3.
  {
    Frames v1 = Encode(Results{sid, 1, std::vector<WireResult>(1)});
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_array(0);
    v1[2] = zmq::message_t(buf.data(), buf.size());
    v1.erase(v1.begin() + 3);
    bad.emplace_back("GTR/1 layout", std::move(v1));
  }
  for (auto& [what, f] : bad) {
    EXPECT_FALSE(DecodeResults(f).has_value()) << what;
    EXPECT_FALSE(DecodeResultsIndex(f).has_value()) << what;
  }
}

TEST(ProtocolTest, RejectsResultsWithoutFrameThree) {
  Frames f = Encode(Results{NewSessionId(), 1, {}});
  ASSERT_EQ(f.size(), 4u);
  f.pop_back();
  auto full = DecodeResults(f);
  ASSERT_FALSE(full.has_value());
  EXPECT_EQ(full.error().code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(DecodeResultsIndex(f).has_value());
  // Frame 3 that is not a list of results.
  Frames g = Encode(Results{NewSessionId(), 1, {}});
  g[3] = zmq::message_t("\xc0", 1);
  EXPECT_FALSE(DecodeResults(g).has_value());
  EXPECT_FALSE(DecodeResultsIndex(g).has_value());
  // Frame 3 with trailing bytes.
  Frames h = Encode(Results{NewSessionId(), 1, {}});
  std::string list = h[3].to_string() + std::string("\xc0", 1);
  h[3] = zmq::message_t(list.data(), list.size());
  EXPECT_FALSE(DecodeResults(h).has_value());
}

// §3.4.2 "The number of body frames SHALL equal the number of results".
TEST(ProtocolTest, RejectsResultsWhoseBodyCountDoesNotMatch) {
  for (std::size_t results : {0u, 1u, 3u}) {
    for (std::size_t bodies : {0u, 1u, 2u, 3u, 4u}) {
      Frames f = Encode(Results{NewSessionId(), 1, std::vector<WireResult>(results)});
      f.resize(4);
      for (std::size_t i = 0; i < bodies; ++i) f.emplace_back("b", 1);
      EXPECT_EQ(DecodeResults(f).has_value(), bodies == results) << results << " results, " << bodies << " bodies";
      EXPECT_EQ(DecodeResultsIndex(f).has_value(), bodies == results)
          << results << " results, " << bodies << " bodies";
    }
  }
}

// §4.3: a RESULTS the broker forwards untouched must be one its client can
// decode, so the index-only decoder checks every field as the full one does.
TEST(ProtocolTest, ResultsIndexRejectsWhatDecodeResultsRejects) {
  const SessionId sid = NewSessionId();
  auto with_result = [&](const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& result) {
    Frames f = Encode(Results{sid, 1, std::vector<WireResult>(1)});
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(1);
    result(pk);
    f[3] = zmq::message_t(buf.data(), buf.size());
    return f;
  };
  // Field k of an otherwise valid result replaced by `bad`.
  auto result_with = [&](int k, const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& bad) {
    return with_result([&](auto& pk) {
      pk.pack_array(8);
      if (k == 0) bad(pk); else pk.pack(3);
      if (k == 1) bad(pk); else pk.pack(200);
      if (k == 2) bad(pk); else pk.pack_array(0);
      if (k == 3) bad(pk); else pk.pack(0);
      if (k == 4) bad(pk); else pk.pack(std::string(""));
      if (k == 5) bad(pk); else pk.pack(1);
      if (k == 6) bad(pk); else pk.pack(10);
      if (k == 7) bad(pk); else pk.pack(std::string("w"));
    });
  };
  Frames good = result_with(-1, {});
  EXPECT_TRUE(DecodeResults(good).has_value());
  EXPECT_EQ(Must(DecodeResultsIndex(good)).indices, (std::vector<std::uint64_t>{3}));
  std::vector<std::pair<const char*, Frames>> bad;
  bad.emplace_back("index negative", result_with(0, [](auto& pk) { pk.pack(-1); }));
  bad.emplace_back("status over uint16", result_with(1, [](auto& pk) { pk.pack(70000); }));
  bad.emplace_back("headers a map", result_with(2, [](auto& pk) { pk.pack_map(0); }));
  bad.emplace_back("header not a pair", result_with(2, [](auto& pk) {
                     pk.pack_array(1);
                     pk.pack_array(1);
                     pk.pack(std::string("X"));
                   }));
  bad.emplace_back("header value not str", result_with(2, [](auto& pk) {
                     pk.pack_array(1);
                     pk.pack_array(2);
                     pk.pack(std::string("X"));
                     pk.pack(1);
                   }));
  bad.emplace_back("error code over uint8", result_with(3, [](auto& pk) { pk.pack(300); }));
  bad.emplace_back("error message not str", result_with(4, [](auto& pk) { pk.pack_nil(); }));
  bad.emplace_back("attempts negative", result_with(5, [](auto& pk) { pk.pack(-2); }));
  bad.emplace_back("elapsed_us a string", result_with(6, [](auto& pk) { pk.pack(std::string("1")); }));
  bad.emplace_back("worker not str", result_with(7, [](auto& pk) { pk.pack(7); }));
  bad.emplace_back("a 7-array", with_result([](auto& pk) {
                     pk.pack_array(7);
                     for (int i = 0; i < 7; ++i) pk.pack(0);
                   }));
  for (const auto& [what, f] : bad) {
    EXPECT_FALSE(DecodeResults(f).has_value()) << what;
    EXPECT_FALSE(DecodeResultsIndex(f).has_value()) << what;
  }
}

// §2.4: the broker answers a malformed message whose header starts with a
// session id, naming it; PeekSession finds that id in any command's header.
// An extra element nested `containers` deep in itself, as a newer peer
// might add (§2.5).
void PackExtra(msgpack::packer<msgpack::sbuffer>& pk, int containers) {
  for (int d = 1; d < containers; ++d) pk.pack_array(1);
  if (containers > 0) {
    pk.pack_map(2);
    pk.pack(std::string("future"));
    pk.pack(-1.5);
    pk.pack(std::string("more"));
    pk.pack_nil();
  } else {
    pk.pack(std::string("future"));
  }
}

// A statement at depth 3 of a SUBMIT or DISPATCH header: index 42 in a
// wider format than needed, GET http://a/x, one header [X-A, 1] with an
// extra element reaching depth 8, timeout 5000 in a signed format, idempotent;
// then an 8th element (nil, or shaped like a DISPATCH's rate wait when
// `wait_like`) and a 9th nested `deep` containers deep.
void PackStatementWithExtras(msgpack::packer<msgpack::sbuffer>& pk, bool wait_like, int deep) {
  pk.pack_array(9);                        // depth 3
  pk.pack_fix_uint64(42);
  pk.pack(std::string("GET"));
  pk.pack(std::string("http://a/x"));
  pk.pack_array(1);                        // depth 4
  pk.pack_array(3);                        // depth 5
  pk.pack(std::string("X-A"));
  pk.pack(std::string("1"));
  PackExtra(pk, 3);                        // 5 + 3 = 8
  pk.pack_bin(0);
  pk.pack_bin_body("", 0);
  pk.pack_fix_int32(5000);
  pk.pack(true);
  if (wait_like) {
    pk.pack_array(2);  // [rate_wait_us, throttled]
    pk.pack(123);
    pk.pack(4);
  } else {
    pk.pack_nil();
  }
  PackExtra(pk, deep);
}

// §2.5, §2.6: a newer peer's extra trailing elements (of any kind, nested
// within §5's depth), integers in wider formats than needed and str for bin
// decode to the same values in the per-statement decoders, which read their
// frames in place; one level of nesting more than §5 allows is malformed.
TEST(ProtocolTest, Clause_2_5_ExtraTrailingElementsOfStatementsAndResultsAreIgnored) {
  const SessionId sid = NewSessionId();
  const std::string raw(reinterpret_cast<const char*>(sid.raw().data()), 16);
  // A DISPATCH whose statement, header pair and header carry extra elements;
  // the statement's extra is nested `deep` containers deep.
  auto dispatch = [&](int deep) {
    return testing::Raw(Command::kDispatch, [&](auto& pk) {
      pk.pack_array(4);                        // depth 1
      pk.pack(raw);                            // str for bin
      pk.pack_array(1);                        // depth 2
      PackStatementWithExtras(pk, false, deep);
      pk.pack_fix_uint32(7);                   // seq
      PackExtra(pk, 7);                        // 1 + 7 = 8
    });
  };
  const Statements m = Must(DecodeStatements(dispatch(5)));  // 3 + 5 = 8
  EXPECT_EQ(m.session, sid);
  EXPECT_EQ(m.seq, 7u);
  ASSERT_EQ(m.statements.size(), 1u);
  const WireStatement& ws = m.statements[0];
  EXPECT_EQ(ws.index, 42u);
  EXPECT_EQ(ws.statement.url, "http://a/x");
  EXPECT_EQ(ws.statement.headers, (Headers{{"X-A", "1"}}));
  EXPECT_EQ(ws.statement.timeout_ms, 5000u);
  EXPECT_EQ(ws.statement.idempotent, std::optional<bool>(true));
  EXPECT_FALSE(DecodeStatements(dispatch(6)).has_value()) << "9 levels";

  auto results = [&](int deep) {
    Frames f = Encode(Results{sid, 1, std::vector<WireResult>(1)});
    msgpack::sbuffer head;
    msgpack::packer<msgpack::sbuffer> hp(head);
    hp.pack_array(3);
    hp.pack(raw);
    hp.pack_fix_uint16(9);  // seq
    PackExtra(hp, 7);
    f[2] = zmq::message_t(head.data(), head.size());
    msgpack::sbuffer list;
    msgpack::packer<msgpack::sbuffer> pk(list);
    pk.pack_array(1);    // depth 1
    pk.pack_array(11);   // depth 2
    pk.pack(3);
    pk.pack_fix_uint32(503);
    pk.pack_array(1);    // depth 3
    pk.pack_array(3);    // depth 4
    pk.pack(std::string("Retry-After"));
    pk.pack(std::string("1"));
    PackExtra(pk, 4);        // 4 + 4 = 8
    pk.pack(static_cast<int>(StatusCode::kHttpStatus));
    pk.pack(std::string("503"));
    pk.pack(2);
    pk.pack(10);
    pk.pack(std::string("w"));
    pk.pack_nil();
    pk.pack_nil();
    PackExtra(pk, deep);
    f[3] = zmq::message_t(list.data(), list.size());
    return f;
  };
  const Results r = Must(DecodeResults(results(6)));  // 2 + 6 = 8
  EXPECT_EQ(r.seq, 9u);
  ASSERT_EQ(r.results.size(), 1u);
  EXPECT_EQ(r.results[0].index, 3u);
  EXPECT_EQ(r.results[0].response.status, 503);
  EXPECT_EQ(r.results[0].response.headers, (Headers{{"Retry-After", "1"}}));
  ASSERT_TRUE(r.results[0].response.error.has_value());
  EXPECT_EQ(r.results[0].response.error->message, "503");
  EXPECT_EQ(r.results[0].response.attempts, 2u);
  EXPECT_EQ(r.results[0].response.worker, "w");
  const ResultsIndex idx = Must(DecodeResultsIndex(results(6)));
  EXPECT_EQ(idx.indices, (std::vector<std::uint64_t>{3}));
  EXPECT_EQ(idx.failed, 1u);
  EXPECT_EQ(idx.retries, 1u);
  EXPECT_FALSE(DecodeResults(results(7)).has_value()) << "9 levels";
  EXPECT_FALSE(DecodeResultsIndex(results(7)).has_value()) << "9 levels";
}

std::string Bytes(const zmq::message_t& frame) { return std::string(static_cast<const char*>(frame.data()), frame.size()); }

// The broker holds SUBMITted statements as their encoded elements and
// forwards them in DISPATCH: what the worker receives is, byte for byte,
// what encoding the decoded statements would give, the broker's rate fields
// (§3.8.8) included.
TEST(ProtocolTest, HeldStatementsAreDispatchedAsTheyCame) {
  const SessionId sid = NewSessionId();
  std::vector<Statement> list(4, Get("http://a/"));
  list[0].url = "http://api.example/v1/items?id=1&x=%20";
  list[1].method = "POST";
  list[1].headers = {{"Content-Type", "application/json"}, {"X-Key", std::string(300, 'k')}};
  list[1].body = std::string("\0\xff{\"a\":1}", 10);
  list[1].timeout_ms = 2500;
  list[2].idempotent = false;
  list[3].method = "POST";
  list[3].idempotent = true;
  list[3].body.assign(70'000, 'b');  // bin 32
  const HeldStatements held = Must(DecodeSubmit(EncodeSubmit(sid, 900, list)));
  EXPECT_EQ(held.session, sid);
  ASSERT_EQ(held.statements.size(), list.size());

  std::vector<HeldStatement> chunk = held.statements;
  chunk[1].rate_wait_us = 1'500'000;
  chunk[1].throttled = 2;
  chunk[2].attempts = 3;
  Statements reference{sid, {}, 77};
  for (std::size_t i = 0; i < list.size(); ++i) {
    EXPECT_EQ(chunk[i].index, 900 + i);
    EXPECT_EQ(chunk[i].encoded, Hold(900 + i, list[i]).encoded) << i;
    reference.statements.push_back(
        WireStatement{900 + i, list[i], chunk[i].rate_wait_us, chunk[i].throttled, chunk[i].attempts});
  }
  const Frames dispatch = EncodeDispatch(sid, chunk, 77);
  const Frames expected = Encode(Command::kDispatch, reference);
  ASSERT_EQ(dispatch.size(), expected.size());
  for (std::size_t i = 0; i < dispatch.size(); ++i) EXPECT_EQ(Bytes(dispatch[i]), Bytes(expected[i])) << "frame " << i;
  const Statements back = Must(DecodeStatements(dispatch));
  EXPECT_EQ(back.seq, 77u);
  ASSERT_EQ(back.statements.size(), list.size());
  EXPECT_EQ(back.statements[1].statement.headers, list[1].headers);
  EXPECT_EQ(back.statements[1].statement.body, list[1].body);
  EXPECT_EQ(back.statements[1].rate_wait_us, 1'500'000u);
  EXPECT_EQ(back.statements[1].throttled, 2u);
  EXPECT_EQ(back.statements[2].attempts, 3u);
  EXPECT_EQ(back.statements[3].statement.body.size(), 70'000u);

  // What the broker reads of a held statement, in place.
  EXPECT_EQ(chunk[0].method(), "GET");
  EXPECT_EQ(chunk[0].url(), list[0].url);
  EXPECT_EQ(chunk[1].method(), "POST");
  EXPECT_TRUE(chunk[0].idempotent());   // GET by default
  EXPECT_FALSE(chunk[1].idempotent());  // POST by default
  EXPECT_FALSE(chunk[2].idempotent());  // a GET marked not idempotent
  EXPECT_TRUE(chunk[3].idempotent());   // a POST marked idempotent
}

// §2.5 at the broker: a SUBMITted statement's elements past the seventh
// (of any kind, nested within §5's depth) are not kept, so its DISPATCH
// carries no 8th element the broker did not put there (§3.8.8); an extra
// element inside a header pair travels on, for the worker to ignore. One
// level of nesting more than §5 allows is malformed, as for every decoder.
TEST(ProtocolTest, Clause_2_5_ExtraElementsOfASubmittedStatementAreNotForwarded) {
  const SessionId sid = NewSessionId();
  auto submit = [&](int deep) {
    return testing::Raw(Command::kSubmit, [&](auto& pk) {
      pk.pack_array(3);                        // depth 1
      pk.pack_bin(16);
      pk.pack_bin_body(reinterpret_cast<const char*>(sid.raw().data()), 16);
      pk.pack_array(1);                        // depth 2
      PackStatementWithExtras(pk, true, deep);
      pk.pack(std::string("a third element of the header"));
    });
  };
  const HeldStatements held = Must(DecodeSubmit(submit(5)));  // 3 + 5 = 8
  ASSERT_EQ(held.statements.size(), 1u);
  EXPECT_EQ(held.statements[0].index, 42u);
  EXPECT_EQ(held.statements[0].url(), "http://a/x");
  const Statements back = Must(DecodeStatements(EncodeDispatch(sid, held.statements, 1)));
  ASSERT_EQ(back.statements.size(), 1u);
  EXPECT_EQ(back.statements[0].statement.headers, (Headers{{"X-A", "1"}}));
  EXPECT_EQ(back.statements[0].statement.timeout_ms, 5000u);
  EXPECT_EQ(back.statements[0].rate_wait_us, 0u);
  EXPECT_EQ(back.statements[0].throttled, 0u);
  EXPECT_FALSE(DecodeSubmit(submit(6)).has_value()) << "9 levels";
}

TEST(ProtocolTest, PeekSessionFindsTheSessionAHeaderStartsWith) {
  const SessionId sid = NewSessionId();
  EXPECT_EQ(PeekSession(Encode(Open{sid, SampleSettings(), 0})), sid);
  EXPECT_EQ(PeekSession(EncodeSubmit(sid, 0, std::vector<Statement>{Get("http://a/")})), sid);
  EXPECT_EQ(PeekSession(Encode(Command::kCancel, SessionRef{sid})), sid);
  EXPECT_EQ(PeekSession(Encode(Sync{sid, 0, {}})), sid);
  EXPECT_EQ(PeekSession(Encode(Ack{sid, 1})), sid);
  EXPECT_EQ(PeekSession(Encode(Results{sid, 1, std::vector<WireResult>(1)})), sid);
  EXPECT_EQ(PeekSession(EncodeHeartbeat(sid)), sid);
  // Malformed otherwise, but the header still starts with the session.
  auto bad_open = testing::Raw(Command::kOpen, [&](auto& pk) {
    pk.pack_array(3);
    pk.pack_bin(16);
    pk.pack_bin_body(sid.raw().data(), 16);
    pk.pack_map(0);
    pk.pack(-1);
  });
  EXPECT_FALSE(DecodeOpen(bad_open).has_value());
  EXPECT_EQ(PeekSession(bad_open), sid);
  Frames extra = Encode(Command::kClose, SessionRef{sid});
  extra.emplace_back("x", 1);
  EXPECT_EQ(PeekSession(extra), sid);
  // No session to find.
  EXPECT_EQ(PeekSession(Encode(Ready{"w", "h", 1})), std::nullopt);
  EXPECT_EQ(PeekSession(Encode(Holding{1, {{sid, {0}}}})), std::nullopt);
  EXPECT_EQ(PeekSession(Encode(Ack{std::nullopt, 1})), std::nullopt);
  EXPECT_EQ(PeekSession(EncodeHeartbeat()), std::nullopt);
  Frames short_one = Encode(Command::kClose, SessionRef{sid});
  short_one.pop_back();
  EXPECT_EQ(PeekSession(short_one), std::nullopt);
  EXPECT_EQ(PeekSession(testing::Raw(Command::kClose, [](auto& pk) { pk.pack_map(0); })), std::nullopt);
  EXPECT_EQ(PeekSession(testing::Raw(Command::kClose, [](auto& pk) {
              pk.pack_array(1);
              pk.pack_bin(15);
              pk.pack_bin_body("123456789012345", 15);
            })),
            std::nullopt);
  Frames garbage = Encode(Command::kClose, SessionRef{sid});
  garbage[2] = zmq::message_t("\xc1", 1);  // never used in msgpack
  EXPECT_EQ(PeekSession(garbage), std::nullopt);
}

TEST(ProtocolTest, RejectsExtraFramesOnSingleFrameCommands) {
  Frames f = Encode(Command::kClose, SessionRef{NewSessionId()});
  f.emplace_back("x", 1);
  EXPECT_FALSE(DecodeSessionRef(f).has_value());
}

TEST(ProtocolTest, RejectsDeepNestingAndHugeArrays) {
  auto deep = testing::Raw(Command::kClose, [](auto& pk) {
    for (int i = 0; i < 64; ++i) pk.pack_array(1);
    pk.pack(1);
  });
  EXPECT_FALSE(DecodeSessionRef(deep).has_value());
  // An array header claiming 2^32-1 elements with no data must not allocate them.
  auto huge = testing::Raw(Command::kSubmit, [](auto& pk) { pk.pack_array(0xffffffffu); });
  EXPECT_FALSE(DecodeStatements(huge).has_value());
  EXPECT_FALSE(DecodeSubmit(huge).has_value());
}

// ---- limits of PROTOCOL.md §5, each at its bound --------------------------

// §5 "header frame | 64 MiB | decoders". The frame is an OPEN whose unknown
// setting is a str of zero bytes, valid but for its size, backed by pages
// never touched (so the test costs no memory).
TEST(ProtocolTest, Clause_5_HeaderFrameOver64MiBIsMalformed) {
  const std::size_t size = kMaxHeaderBytes + 1;
  void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(data, MAP_FAILED);
  msgpack::sbuffer prefix;
  msgpack::packer<msgpack::sbuffer> pk(prefix);
  const SessionId sid = NewSessionId();
  pk.pack_array(3);
  pk.pack_bin(16);
  pk.pack_bin_body(sid.raw().data(), 16);
  pk.pack_map(1);
  pk.pack(std::string("pad"));
  // str 32 header; its bytes, and the prefetch 0 after them, are the zero pages.
  const std::uint32_t pad = static_cast<std::uint32_t>(size - prefix.size() - 5 - 1);
  pk.pack_str(pad);
  std::memcpy(data, prefix.data(), prefix.size());
  Frames f;
  f.emplace_back(kSignature.data(), kSignature.size());
  const auto open = static_cast<std::uint8_t>(Command::kOpen);
  f.emplace_back(&open, 1);
  f.emplace_back(data, size, [](void* p, void* hint) { munmap(p, reinterpret_cast<std::size_t>(hint)); },
                 reinterpret_cast<void*>(size));
  ASSERT_LT(pad, kMaxHeaderBytes) << "the str alone must be within the decoder's str limit";
  EXPECT_FALSE(DecodeOpen(f).has_value());
}

// §5 "statements / results per message | 65,536 | decoders"
TEST(ProtocolTest, Clause_5_AtMost65536StatementsOrResultsPerMessage) {
  const SessionId sid = NewSessionId();
  const std::vector<Statement> statements(kMaxBatch + 1, Get("http://a/"));
  EXPECT_TRUE(DecodeStatements(EncodeSubmit(sid, 0, std::span(statements).first(kMaxBatch))).has_value());
  EXPECT_FALSE(DecodeStatements(EncodeSubmit(sid, 0, statements)).has_value());
  EXPECT_TRUE(DecodeSubmit(EncodeSubmit(sid, 0, std::span(statements).first(kMaxBatch))).has_value());
  EXPECT_FALSE(DecodeSubmit(EncodeSubmit(sid, 0, statements)).has_value());
  for (std::size_t n : {kMaxBatch, kMaxBatch + 1}) {
    Results m{sid, 1, std::vector<WireResult>(n)};
    Frames f = Encode(std::move(m));
    EXPECT_EQ(DecodeResultsIndex(f).has_value(), n == kMaxBatch) << n << " results";
    EXPECT_EQ(DecodeResults(f).has_value(), n == kMaxBatch) << n << " results";
  }
}

// §5 "statement body | 16 MiB | client validation and decoders"
TEST(ProtocolTest, Clause_5_StatementBodyOver16MiBIsMalformed) {
  Statements m{NewSessionId(), {WireStatement{0, Get("http://a/")}}, 0};
  m.statements[0].statement.method = "POST";
  m.statements[0].statement.body.assign(kMaxStatementBody, 'x');
  EXPECT_TRUE(DecodeStatements(Encode(Command::kSubmit, m)).has_value());
  EXPECT_TRUE(DecodeSubmit(Encode(Command::kSubmit, m)).has_value());
  m.statements[0].statement.body.push_back('x');
  EXPECT_FALSE(DecodeStatements(Encode(Command::kSubmit, m)).has_value());
  EXPECT_FALSE(DecodeSubmit(Encode(Command::kSubmit, m)).has_value());
}

// §5 "msgpack nesting depth | 8 | decoders". An unknown setting (ignored,
// §2.5) nested to depth 8 in all is taken; one more level is malformed.
TEST(ProtocolTest, Clause_5_NestingDeeperThan8IsMalformed) {
  const SessionId sid = NewSessionId();
  auto open_nested = [&](int depth) {
    return testing::Raw(Command::kOpen, [&](auto& pk) {
      pk.pack_array(3);  // depth 1
      pk.pack_bin(16);
      pk.pack_bin_body(sid.raw().data(), 16);
      pk.pack_map(1);  // depth 2
      pk.pack(std::string("from_the_future"));
      for (int d = 3; d <= depth; ++d) pk.pack_array(1);
      pk.pack(1);
      pk.pack(0);
    });
  };
  EXPECT_TRUE(DecodeOpen(open_nested(8)).has_value());
  EXPECT_FALSE(DecodeOpen(open_nested(9)).has_value());
}

TEST(ProtocolTest, RandomBytesNeverCrashDecoders) {
  std::mt19937 rng(42);
  for (int round = 0; round < 2000; ++round) {
    std::string junk(rng() % 64, '\0');
    for (auto& c : junk) c = static_cast<char>(rng());
    Frames f;
    f.emplace_back(kSignature.data(), kSignature.size());
    const std::uint8_t c = static_cast<std::uint8_t>(0x10 + rng() % 0x4c);
    f.emplace_back(&c, 1);
    f.emplace_back(junk.data(), junk.size());
    (void)PeekCommand(f);
    (void)DecodeOpen(f);
    (void)DecodeStatements(f);
    (void)DecodeSubmit(f);
    (void)DecodeResults(f);
    (void)DecodeResultsIndex(f);
    (void)DecodeSession(f);
    (void)DecodeReady(f);
    (void)DecodeError(f);
    (void)DecodeSessionRef(f);
    (void)DecodeEndSession(f);
    (void)DecodeAck(f);
    (void)DecodeSync(f);
    (void)DecodeSynced(f);
    (void)DecodeHolding(f);
    (void)DecodeHeartbeat(f);
    (void)DecodeBrokerHeartbeat(f);
    (void)DecodeEmpty(f);
    (void)DecodeStatusReport(f);
    (void)DecodeWorkersReport(f);
    (void)DecodeSessionsReport(f);
    (void)DecodeWorkerName(f);
    (void)DecodeDone(f);
    (void)PeekSession(f);
    // The same junk as frame 3 of a RESULTS with a valid frame 2.
    Frames r = Encode(Results{NewSessionId(), 1, {}});
    r[3] = zmq::message_t(junk.data(), junk.size());
    (void)DecodeResults(r);
    (void)DecodeResultsIndex(r);
  }
  SUCCEED();
}

}  // namespace
}  // namespace gatherer::protocol

// ---- §3.8 Rate limits -------------------------------------------------------

namespace gatherer::protocol {
namespace {

Frames OpenWithRawSettings(const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& settings) {
  Frames f = Encode(Open{NewSessionId(), SessionSettings{}, 0});
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_array(3);
  const SessionId sid = NewSessionId();
  pk.pack_bin(16);
  pk.pack_bin_body(reinterpret_cast<const char*>(sid.raw().data()), 16);
  settings(pk);
  pk.pack(std::uint32_t{0});
  f[2] = zmq::message_t(buf.data(), buf.size());
  return f;
}

// 3.8.1: the rate keys round-trip, and are left out when unset, so that a
// session without limits encodes exactly as before.
TEST(ProtocolTest, Clause_3_8_1_RateSettingsRoundTripAndAreOmittedWhenUnset) {
  SessionSettings s;
  s.rate_limits = {*ParseRateRule("20:1,100:120"), *ParseRateRule("match=GET /matches/{id} 250:10")};
  s.learn_rate_limits = true;
  Open back = Must(DecodeOpen(Encode(Open{NewSessionId(), s, 0})));
  EXPECT_EQ(back.settings.rate_limits, s.rate_limits);
  EXPECT_TRUE(back.settings.learn_rate_limits);
  EXPECT_TRUE(back.settings.rate_aware());
  const Frames plain = Encode(Open{NewSessionId(), SessionSettings{}, 0});
  const std::string header = plain[2].to_string();
  EXPECT_EQ(header.find("rate_limits"), std::string::npos);
  EXPECT_EQ(header.find("learn_rate_limits"), std::string::npos);
  EXPECT_FALSE(Must(DecodeOpen(plain)).settings.rate_aware());
}

TEST(ProtocolTest, Clause_3_8_1_OutOfRangeRateSettingsAreMalformed) {
  auto with_rules = [](const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& rules) {
    return OpenWithRawSettings([&](auto& pk) {
      pk.pack_map(1);
      pk.pack_str(11);
      pk.pack_str_body("rate_limits", 11);
      rules(pk);
    });
  };
  auto rule = [](std::string_view name, std::string_view path, std::uint32_t count, std::uint32_t window_ms) {
    return [=](msgpack::packer<msgpack::sbuffer>& pk) {
      pk.pack_array(1);
      pk.pack_array(4);
      pk.pack(std::string(name));
      pk.pack(std::string());
      pk.pack(std::string(path));
      pk.pack_array(1);
      pk.pack_array(2);
      pk.pack(count);
      pk.pack(window_ms);
    };
  };
  EXPECT_TRUE(DecodeOpen(with_rules(rule("", "", 20, 1000))).has_value());
  EXPECT_TRUE(DecodeOpen(with_rules(rule("m", "/a/{id}", 20, 1000))).has_value());
  EXPECT_FALSE(DecodeOpen(with_rules(rule("", "", 0, 1000))).has_value());
  EXPECT_FALSE(DecodeOpen(with_rules(rule("", "", 20, 0))).has_value());
  EXPECT_FALSE(DecodeOpen(with_rules(rule("", "", kMaxRateCount + 1, 1000))).has_value());
  EXPECT_FALSE(DecodeOpen(with_rules(rule("", "", 20, kMaxRateWindowMs + 1))).has_value());
  EXPECT_FALSE(DecodeOpen(with_rules(rule("m", "a/b", 20, 1000))).has_value()) << "path without '/'";
  EXPECT_FALSE(DecodeOpen(with_rules(rule("", "/a", 20, 1000))).has_value()) << "unnamed endpoint rule";
  EXPECT_FALSE(DecodeOpen(with_rules([](auto& pk) { pk.pack(7); })).has_value());
  EXPECT_FALSE(DecodeOpen(OpenWithRawSettings([](auto& pk) {
                 pk.pack_map(1);
                 pk.pack(std::string("learn_rate_limits"));
                 pk.pack(1);
               })).has_value())
      << "learn_rate_limits must be a boolean";
}

// 3.1: the TLS and proxy keys round-trip, are left out when unset, and a
// certificate without its key (or a key without its certificate) is malformed.
TEST(ProtocolTest, Clause_3_1_TlsAndProxySettingsRoundTripAndAreOmittedWhenUnset) {
  SessionSettings s;
  s.tls_ca_pem = "-----BEGIN CERTIFICATE-----\nca\n-----END CERTIFICATE-----\n";
  s.tls_cert_pem = "-----BEGIN CERTIFICATE-----\nme\n-----END CERTIFICATE-----\n";
  s.tls_key_pem = "-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n";
  s.tls_insecure = true;
  s.proxy = "socks5h://127.0.0.1:1080";
  s.no_proxy = "localhost,10.0.0.0/8";
  const SessionSettings back = Must(DecodeOpen(Encode(Open{NewSessionId(), s, 0}))).settings;
  EXPECT_EQ(back.tls_ca_pem, s.tls_ca_pem);
  EXPECT_EQ(back.tls_cert_pem, s.tls_cert_pem);
  EXPECT_EQ(back.tls_key_pem, s.tls_key_pem);
  EXPECT_TRUE(back.tls_insecure);
  EXPECT_EQ(back.proxy, s.proxy);
  EXPECT_EQ(back.no_proxy, s.no_proxy);
  const std::string header = Encode(Open{NewSessionId(), SessionSettings{}, 0})[2].to_string();
  for (const char* key : {"tls_", "proxy"}) EXPECT_EQ(header.find(key), std::string::npos) << key;
  EXPECT_FALSE(DecodeOpen(OpenWithRawSettings([](auto& pk) {
                 pk.pack_map(1);
                 pk.pack(std::string("tls_cert_pem"));
                 pk.pack(std::string("-----BEGIN CERTIFICATE-----"));
               })).has_value())
      << "a certificate without its key";
  EXPECT_FALSE(DecodeOpen(OpenWithRawSettings([](auto& pk) {
                 pk.pack_map(1);
                 pk.pack(std::string("tls_insecure"));
                 pk.pack(1);
               })).has_value())
      << "tls_insecure must be a boolean";
}

// 3.8.6: a result's rate report travels as its 9th element, in both
// decoders; a result without one stays an 8-array.
TEST(ProtocolTest, Clause_3_8_6_RateReportsRoundTripInBothDecoders) {
  const SessionId sid = NewSessionId();
  Results m{sid, 3, std::vector<WireResult>(3)};
  for (std::uint64_t i = 0; i < 3; ++i) m.results[i].index = i;
  const RateReport report{.throttled = true, .type = RateLimitType::kMethod, .retry_after_ms = 2000,
                          .app = {{20, 1000}, {100, 120'000}}, .method = {{250, 10'000}}};
  m.results[1].rate = report;
  Frames f = Encode(std::move(m));
  {
    auto list = msgpack::unpack(static_cast<const char*>(f[3].data()), f[3].size());
    EXPECT_EQ(list->via.array.ptr[0].via.array.size, 8u);
    EXPECT_EQ(list->via.array.ptr[1].via.array.size, 9u);
  }
  Results back = Must(DecodeResults(f));
  EXPECT_FALSE(back.results[0].rate.has_value());
  ASSERT_TRUE(back.results[1].rate.has_value());
  EXPECT_EQ(*back.results[1].rate, report);
  ResultsIndex index = Must(DecodeResultsIndex(f));
  ASSERT_EQ(index.rates.size(), 1u);
  EXPECT_EQ(index.rates[0].first, 1u);
  EXPECT_EQ(index.rates[0].second, report);
}

TEST(ProtocolTest, Clause_3_8_6_MalformedRateReportsAreMalformed) {
  const SessionId sid = NewSessionId();
  auto with_report = [&](const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& report) {
    Frames f = Encode(Results{sid, 1, std::vector<WireResult>(1)});
    const std::string list = testing::OneResultWithReport(429, report);
    f[3] = zmq::message_t(list.data(), list.size());
    return f;
  };
  auto report = [](std::uint8_t flags, std::uint8_t type, std::uint32_t count) {
    return [=](msgpack::packer<msgpack::sbuffer>& pk) {
      pk.pack_array(5);
      pk.pack(flags);
      pk.pack(type);
      pk.pack(std::uint32_t{0});
      pk.pack_array(1);
      pk.pack_array(2);
      pk.pack(count);
      pk.pack(std::uint32_t{1000});
      pk.pack_array(0);
    };
  };
  EXPECT_TRUE(DecodeResults(with_report(report(1, 2, 20))).has_value());
  EXPECT_TRUE(DecodeResults(with_report([](auto& pk) { pk.pack_nil(); })).has_value());
  const auto retry = DecodeResults(with_report(report(2, 0, 20)));
  ASSERT_TRUE(retry.has_value()) << "flags 2: a failure handed back to run again";
  EXPECT_TRUE(retry->results[0].rate->retry);
  EXPECT_FALSE(retry->results[0].rate->throttled);
  for (const auto& bad : {with_report(report(3, 0, 20)), with_report(report(0, 4, 20)),
                          with_report(report(0, 0, 0)), with_report([](auto& pk) { pk.pack(1); }),
                          with_report([](auto& pk) { pk.pack_array(2); pk.pack(0); pk.pack(0); })}) {
    EXPECT_FALSE(DecodeResults(bad).has_value());
    EXPECT_FALSE(DecodeResultsIndex(bad).has_value());
  }
}

// 3.8.8: what a statement waited travels as the 8th element of a
// statement and comes back as the 10th of its result; absent when zero.
TEST(ProtocolTest, Clause_3_8_8_RateWaitTravelsWithTheStatementAndItsResult) {
  const SessionId sid = NewSessionId();
  Statements d{sid, std::vector<WireStatement>(2), 5};
  d.statements[0].statement.url = "http://h/0";
  d.statements[1].index = 1;
  d.statements[1].statement.url = "http://h/1";
  d.statements[1].rate_wait_us = 1'234'567;
  d.statements[1].throttled = 2;
  d.statements.push_back(d.statements[1]);
  d.statements[2].index = 2;
  d.statements[2].attempts = 3;
  Frames df = Encode(Command::kDispatch, d);
  Statements back = Must(DecodeStatements(df));
  EXPECT_EQ(back.statements[0].rate_wait_us, 0u);
  EXPECT_EQ(back.statements[1].rate_wait_us, 1'234'567u);
  EXPECT_EQ(back.statements[1].throttled, 2u);
  EXPECT_EQ(back.statements[1].attempts, 0u);
  EXPECT_EQ(back.statements[2].attempts, 3u) << "attempts of earlier DISPATCHes (§3.8.6)";
  {
    // The third element only when there were attempts: [wait, throttled] otherwise.
    auto message = msgpack::unpack(static_cast<const char*>(df[2].data()), df[2].size());
    const auto& statements = message->via.array.ptr[1].via.array;
    EXPECT_EQ(statements.ptr[1].via.array.ptr[7].via.array.size, 2u);
    EXPECT_EQ(statements.ptr[2].via.array.ptr[7].via.array.size, 3u);
  }
  Results r{sid, 1, std::vector<WireResult>(2)};
  r.results[1].index = 1;
  r.results[1].response.rate_wait_us = 99;
  r.results[1].response.throttled = 1;
  Frames f = Encode(std::move(r));
  {
    auto list = msgpack::unpack(static_cast<const char*>(f[3].data()), f[3].size());
    EXPECT_EQ(list->via.array.ptr[0].via.array.size, 8u);
    EXPECT_EQ(list->via.array.ptr[1].via.array.size, 10u);
    EXPECT_EQ(list->via.array.ptr[1].via.array.ptr[8].type, msgpack::type::NIL);
  }
  Results rb = Must(DecodeResults(f));
  EXPECT_EQ(rb.results[1].response.rate_wait_us, 99u);
  EXPECT_EQ(rb.results[1].response.throttled, 1u);
  EXPECT_FALSE(rb.results[1].rate.has_value());
  EXPECT_TRUE(DecodeResultsIndex(f).has_value());
}

}  // namespace
}  // namespace gatherer::protocol
