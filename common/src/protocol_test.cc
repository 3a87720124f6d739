#include "gatherer/protocol.h"

#include <gtest/gtest.h>
#include <msgpack.hpp>

#include <sys/mman.h>

#include <cstring>
#include <functional>
#include <random>
#include <span>

namespace gatherer::protocol {
namespace {

SessionSettings SampleSettings() {
  SessionSettings s;
  s.workers = 77;
  s.base_url = "http://127.0.0.1:8080";
  s.headers = {{"Authorization", "token"}, {"X-A", "1"}};
  s.timeout_ms = 1234;
  s.max_attempts = 2;
  s.max_body_bytes = 999;
  s.accept_min = 200;
  s.accept_max = 299;
  return s;
}

template <typename T>
T Must(Result<T> r) {
  EXPECT_TRUE(r.has_value()) << (r.has_value() ? "" : r.error().ToString());
  return std::move(*r);
}

Command CommandOf(const Frames& f) { return Must(PeekCommand(f)); }

// Builds frames with a hand-written header, for malformation tests.
Frames WithHeader(Command c, const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& pack) {
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pack(pk);
  Frames f;
  f.emplace_back(kSignature.data(), kSignature.size());
  const auto b = static_cast<std::uint8_t>(c);
  f.emplace_back(&b, 1);
  f.emplace_back(buf.data(), buf.size());
  return f;
}

TEST(ProtocolTest, OpenRoundTrips) {
  Open m{NewSessionId(), SampleSettings(), 50};
  Frames f = Encode(m);
  EXPECT_EQ(CommandOf(f), Command::kOpen);
  Open back = Must(DecodeOpen(f));
  EXPECT_EQ(back.session, m.session);
  EXPECT_EQ(back.prefetch, 50u);
  EXPECT_EQ(back.settings.workers, 77u);
  EXPECT_EQ(back.settings.base_url, m.settings.base_url);
  EXPECT_EQ(back.settings.headers, m.settings.headers);
  EXPECT_EQ(back.settings.timeout_ms, 1234u);
  EXPECT_EQ(back.settings.max_attempts, 2u);
  EXPECT_EQ(back.settings.max_body_bytes, 999u);
  EXPECT_EQ(back.settings.accept_max, 299);
}

TEST(ProtocolTest, SubmitAndDispatchRoundTrip) {
  Statements m{NewSessionId(), {}};
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

TEST(ProtocolTest, ResultsRoundTripWithBodyFrames) {
  Results m{NewSessionId(), {}};
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
  ASSERT_EQ(f.size(), 5u);  // signature, command, header, 2 bodies
  EXPECT_EQ(f[3].size(), 100'000u);
  Results back = Must(DecodeResults(f));
  EXPECT_EQ(back.session, sid);
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
  EXPECT_EQ(idx.indices, (std::vector<std::uint64_t>{7, 8}));
}

TEST(ProtocolTest, SessionRefMessagesRoundTrip) {
  const SessionId sid = NewSessionId();
  for (Command c : {Command::kCancel, Command::kClose, Command::kOpened, Command::kClosed, Command::kEndSession}) {
    Frames f = Encode(c, SessionRef{sid});
    EXPECT_EQ(CommandOf(f), c);
    EXPECT_EQ(Must(DecodeSessionRef(f)).session, sid);
  }
}

TEST(ProtocolTest, SessionReadyErrorHeartbeatRoundTrip) {
  const SessionId sid = NewSessionId();
  Session s = Must(DecodeSession(Encode(Session{sid, SampleSettings()})));
  EXPECT_EQ(s.session, sid);
  EXPECT_EQ(s.settings.base_url, "http://127.0.0.1:8080");

  Ready r = Must(DecodeReady(Encode(Ready{"w-1", "host", 2048})));
  EXPECT_EQ(r.worker_id, "w-1");
  EXPECT_EQ(r.host, "host");
  EXPECT_EQ(r.slots, 2048u);

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

// ---- malformations: each is rejected with a Status, never a crash ----------

TEST(ProtocolTest, RejectsWrongVersionAsFailedPrecondition) {
  Frames f = EncodeHeartbeat();
  const std::uint8_t v2[] = {'G', 'T', 'R', 2};
  f[0] = zmq::message_t(v2, 4);
  auto c = PeekCommand(f);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(c.error().message().find("version 2"), std::string::npos);
}

TEST(ProtocolTest, RejectsBadSignature) {
  Frames f = EncodeHeartbeat();
  f[0] = zmq::message_t("HTTP", 4);
  EXPECT_EQ(PeekCommand(f).error().code(), StatusCode::kInvalidArgument);
  f[0] = zmq::message_t("GTR", 3);
  EXPECT_EQ(PeekCommand(f).error().code(), StatusCode::kInvalidArgument);
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
  Statements m{NewSessionId(), {}};
  m.statements.push_back(WireStatement{0, Get("http://a/")});
  Frames f = Encode(Command::kSubmit, m);
  const std::size_t full = f[2].size();
  for (std::size_t cut = 0; cut < full; ++cut) {
    Frames t;
    t.emplace_back(f[0].data(), f[0].size());
    t.emplace_back(f[1].data(), f[1].size());
    t.emplace_back(f[2].data(), cut);
    EXPECT_FALSE(DecodeStatements(t).has_value()) << "cut at " << cut;
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
  auto f1 = WithHeader(Command::kClose, [](auto& pk) { pk.pack_array(1); pk.pack(5); });
  EXPECT_EQ(DecodeSessionRef(f1).error().code(), StatusCode::kInvalidArgument);
  // Session id of 15 bytes.
  auto f2 = WithHeader(Command::kClose, [](auto& pk) {
    pk.pack_array(1);
    pk.pack_bin(15);
    pk.pack_bin_body("123456789012345", 15);
  });
  EXPECT_FALSE(DecodeSessionRef(f2).has_value());
  // Header is a map, not an array.
  auto f3 = WithHeader(Command::kReady, [](auto& pk) { pk.pack_map(0); });
  EXPECT_FALSE(DecodeReady(f3).has_value());
  // Negative slots.
  auto f4 = WithHeader(Command::kReady, [](auto& pk) {
    pk.pack_array(3);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(-1);
  });
  EXPECT_FALSE(DecodeReady(f4).has_value());
  // Zero slots is out of range.
  auto f5 = WithHeader(Command::kReady, [](auto& pk) {
    pk.pack_array(3);
    pk.pack(std::string("w"));
    pk.pack(std::string("h"));
    pk.pack(0);
  });
  EXPECT_FALSE(DecodeReady(f5).has_value());
  // Statement with a numeric url.
  const SessionId sid = NewSessionId();
  auto f6 = WithHeader(Command::kSubmit, [&](auto& pk) {
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
  // Settings with window 0.
  auto f7 = WithHeader(Command::kOpen, [&](auto& pk) {
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
  auto f = WithHeader(Command::kOpen, [&](auto& pk) {
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
  Results m{NewSessionId(), {}};
  m.results.resize(2);
  Frames f = Encode(std::move(m));
  f.pop_back();
  EXPECT_FALSE(DecodeResults(f).has_value());
  EXPECT_FALSE(DecodeResultsIndex(f).has_value());
  f.emplace_back("a", 1);
  f.emplace_back("b", 1);
  EXPECT_FALSE(DecodeResults(f).has_value());
}

TEST(ProtocolTest, RejectsExtraFramesOnSingleFrameCommands) {
  Frames f = Encode(Command::kClose, SessionRef{NewSessionId()});
  f.emplace_back("x", 1);
  EXPECT_FALSE(DecodeSessionRef(f).has_value());
}

TEST(ProtocolTest, RejectsDeepNestingAndHugeArrays) {
  auto deep = WithHeader(Command::kClose, [](auto& pk) {
    for (int i = 0; i < 64; ++i) pk.pack_array(1);
    pk.pack(1);
  });
  EXPECT_FALSE(DecodeSessionRef(deep).has_value());
  // An array header claiming 2^32-1 elements with no data must not allocate them.
  auto huge = WithHeader(Command::kSubmit, [](auto& pk) { pk.pack_array(0xffffffffu); });
  EXPECT_FALSE(DecodeStatements(huge).has_value());
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
  for (std::size_t n : {kMaxBatch, kMaxBatch + 1}) {
    Results m{sid, std::vector<WireResult>(n)};
    Frames f = Encode(std::move(m));
    EXPECT_EQ(DecodeResultsIndex(f).has_value(), n == kMaxBatch) << n << " results";
    EXPECT_EQ(DecodeResults(f).has_value(), n == kMaxBatch) << n << " results";
  }
}

// §5 "statement body | 16 MiB | client validation and decoders"
TEST(ProtocolTest, Clause_5_StatementBodyOver16MiBIsMalformed) {
  Statements m{NewSessionId(), {WireStatement{0, Get("http://a/")}}};
  m.statements[0].statement.method = "POST";
  m.statements[0].statement.body.assign(kMaxStatementBody, 'x');
  EXPECT_TRUE(DecodeStatements(Encode(Command::kSubmit, m)).has_value());
  m.statements[0].statement.body.push_back('x');
  EXPECT_FALSE(DecodeStatements(Encode(Command::kSubmit, m)).has_value());
}

// §5 "msgpack nesting depth | 8 | decoders". An unknown setting (ignored,
// §2.5) nested to depth 8 in all is taken; one more level is malformed.
TEST(ProtocolTest, Clause_5_NestingDeeperThan8IsMalformed) {
  const SessionId sid = NewSessionId();
  auto open_nested = [&](int depth) {
    return WithHeader(Command::kOpen, [&](auto& pk) {
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
    const std::uint8_t c = static_cast<std::uint8_t>(0x10 + rng() % 0x33);
    f.emplace_back(&c, 1);
    f.emplace_back(junk.data(), junk.size());
    (void)PeekCommand(f);
    (void)DecodeOpen(f);
    (void)DecodeStatements(f);
    (void)DecodeResults(f);
    (void)DecodeResultsIndex(f);
    (void)DecodeSession(f);
    (void)DecodeReady(f);
    (void)DecodeError(f);
    (void)DecodeSessionRef(f);
  }
  SUCCEED();
}

}  // namespace
}  // namespace gatherer::protocol
