// Writes the seed corpus of tests/fuzz/corpus from real encoded messages:
//
//   gatherer_fuzz_seeds <corpus dir>
//
// creates <corpus dir>/protocol_fuzzer/<name> (framed as in framing.h) and
// <corpus dir>/jsonl_fuzzer/<name>. Deterministic (fixed session ids), so
// running it again rewrites the same files and git shows no change.

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <msgpack.hpp>

#include "framing.h"
#include "gatherer/protocol.h"

namespace gatherer::fuzz {
namespace {

using namespace gatherer::protocol;
namespace fs = std::filesystem;

void Write(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

SessionId FixedSession(std::uint8_t seed) {
  SessionId id;
  for (std::size_t i = 0; i < id.bytes.size(); ++i) id.bytes[i] = static_cast<std::uint8_t>(seed + 17 * i);
  id.bytes[6] = 0x40 | (id.bytes[6] & 0x0f);  // uuid4 version and variant
  id.bytes[8] = 0x80 | (id.bytes[8] & 0x3f);
  return id;
}

SessionSettings SampleSettings() {
  SessionSettings s;
  s.workers = 50;
  s.base_url = "http://127.0.0.1:8080";
  s.headers = {{"Authorization", "Bearer token"}, {"X-A", "1"}};
  s.timeout_ms = 1500;
  s.max_attempts = 2;
  s.max_body_bytes = 1 << 20;
  s.accept_min = 200;
  s.accept_max = 299;
  return s;
}

Frames Raw(Command c, const std::function<void(msgpack::packer<msgpack::sbuffer>&)>& pack) {
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

void PackStr(msgpack::packer<msgpack::sbuffer>& pk, const std::string& s) {
  pk.pack_str(static_cast<std::uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

void ProtocolSeeds(const fs::path& dir) {
  fs::create_directories(dir);
  auto put = [&](const char* name, const Frames& frames) { Write(dir / name, JoinFrames(frames)); };
  const SessionId a = FixedSession(1);
  const SessionId b = FixedSession(2);

  put("open", Encode(Open{a, SampleSettings(), 100}));
  put("open_defaults", Encode(Open{b, SessionSettings{}, 0}));
  put("session", Encode(Session{a, SampleSettings()}));

  Statements statements{a, {}};
  for (std::uint64_t i = 0; i < 3; ++i) {
    WireStatement ws;
    ws.index = 7 + i;
    ws.statement.method = i == 1 ? "POST" : "GET";
    ws.statement.url = "/items/" + std::to_string(i);
    ws.statement.headers = {{"Accept", "application/json"}};
    if (i == 1) ws.statement.body = std::string("{\"k\":\0\xff}", 8);
    ws.statement.timeout_ms = static_cast<std::uint32_t>(250 * i);
    if (i == 1) ws.statement.idempotent = false;
    if (i == 2) ws.statement.idempotent = true;
    statements.statements.push_back(ws);
  }
  put("submit", Encode(Command::kSubmit, statements));
  statements.statements.resize(1);
  put("dispatch", Encode(Command::kDispatch, statements));
  put("submit_empty", Encode(Command::kSubmit, Statements{b, {}}));

  Results results{a, {}};
  for (std::uint64_t i = 0; i < 2; ++i) {
    WireResult wr;
    wr.index = 7 + i;
    wr.response.status = i == 0 ? 200 : 0;
    wr.response.headers = {{"Content-Type", "text/plain"}, {"Set-Cookie", "x=1"}};
    wr.response.body = i == 0 ? "hello" : "";
    if (i == 1) wr.response.error = ResponseError{StatusCode::kUnavailable, "connection refused"};
    wr.response.attempts = static_cast<std::uint32_t>(1 + 3 * i);
    wr.response.elapsed_us = 12345;
    wr.response.worker = "host-42-1";
    results.results.push_back(wr);
  }
  put("results", Encode(std::move(results)));
  put("results_empty", Encode(Results{b, {}}));

  put("cancel", Encode(Command::kCancel, SessionRef{a}));
  put("close", Encode(Command::kClose, SessionRef{a}));
  put("opened", Encode(Command::kOpened, SessionRef{b}));
  put("closed", Encode(Command::kClosed, SessionRef{b}));
  put("end_session", Encode(Command::kEndSession, SessionRef{a}));
  put("ready", Encode(Ready{"host-42-1", "host", 64}));
  put("error", Encode(ErrorReply{StatusCode::kNotFound, "no such session", a}));
  put("error_no_session", Encode(ErrorReply{StatusCode::kFailedPrecondition, "version 2", std::nullopt}));
  put("heartbeat", EncodeHeartbeat());
  put("draining", EncodeEmpty(Command::kDraining));
  put("disconnect", EncodeEmpty(Command::kDisconnect));
  put("heartbeat_session", EncodeHeartbeat(b));

  // Malformed on purpose: each is one edit away from a valid message.
  Frames f = EncodeHeartbeat();
  static_cast<std::uint8_t*>(f[0].data())[3] = 2;
  put("bad_version", f);
  f = Encode(Command::kCancel, SessionRef{a});
  static_cast<std::uint8_t*>(f[1].data())[0] = 0x99;
  put("bad_command", f);
  f = Encode(Command::kClose, SessionRef{a});
  f[2] = zmq::message_t(std::string(static_cast<const char*>(f[2].data()), f[2].size()) + '\xc0');
  put("trailing_byte", f);
  Results one{a, {}};
  one.results.push_back(WireResult{3, Response{.status = 204}});
  f = Encode(std::move(one));
  f.pop_back();
  put("results_missing_body", f);
  put("settings_unknown_key", Raw(Command::kOpen, [&](auto& pk) {
        pk.pack_array(3);
        pk.pack_bin(16);
        pk.pack_bin_body(a.raw().data(), 16);
        pk.pack_map(2);
        PackStr(pk, "workers");
        pk.pack(3);
        PackStr(pk, "from_the_future");
        pk.pack_array(0);
        pk.pack(0);
      }));
  put("session_as_str", Raw(Command::kHeartbeat, [&](auto& pk) {
        pk.pack_array(1);
        PackStr(pk, std::string(a.raw()));
      }));
}

void JsonlSeeds(const fs::path& dir) {
  fs::create_directories(dir);
  auto put = [&](const char* name, const std::string& text) { Write(dir / name, text); };
  put("bare_url", "https://example.com/a?b=c\n");
  put("object_full",
      R"({"url":"http://127.0.0.1/x","method":"POST","headers":{"Content-Type":"application/json"},)"
      R"("body":"{\"a\":1}","timeout_ms":1500,"idempotent":true})");
  put("headers_pairs", R"({"url":"/p","headers":[["X-A","1"],["X-A","2"]],"method":"PUT"})");
  put("nulls", R"({"url":"/n","method":null,"headers":null,"body":null,"timeout_ms":null,"idempotent":null})");
  put("escapes", "{\"url\":\"/\\u00e9\\n\",\"body\":\"\\ud83d\\ude00\\t\\\"\"}\r\n");
  put("many_lines", "\xEF\xBB\xBFhttp://a/1\r\n\n   \n{\"url\":\"http://a/2\"}\nhttp://a/3\n");
  put("unknown_key", R"({"url":"/u","heders":{}})");
  put("repeated_key", R"({"url":"/u","url":"/v"})");
  put("trailing", R"({"url":"/u"} {"url":"/v"})");
  put("bad_timeout", R"({"url":"/u","timeout_ms":-1.5e300})");
  put("binary", std::string("GET \x00\xff\xfe\x80 http://h/\x7f", 20));
}

}  // namespace
}  // namespace gatherer::fuzz

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path root = argv[1];
  gatherer::fuzz::ProtocolSeeds(root / "protocol_fuzzer");
  gatherer::fuzz::JsonlSeeds(root / "jsonl_fuzzer");
  return 0;
}
