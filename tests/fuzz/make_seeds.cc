// Writes the seed corpus of tests/fuzz/corpus from real encoded GTR/2
// messages, one of every command and layout (PROTOCOL.md §3), plus a few
// malformed ones each one edit away from a valid message:
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
#include "frames.h"
#include "gatherer/protocol.h"

namespace gatherer::fuzz {
namespace {

using namespace gatherer::protocol;
namespace fs = std::filesystem;
using testing::PackStr;
using testing::Raw;
using testing::SampleSettings;

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

void ProtocolSeeds(const fs::path& dir) {
  fs::create_directories(dir);
  auto put = [&](const char* name, const Frames& frames) { Write(dir / name, JoinFrames(frames)); };
  const SessionId a = FixedSession(1);
  const SessionId b = FixedSession(2);

  put("open", Encode(Open{a, SampleSettings(), 100}));
  put("open_defaults", Encode(Open{b, SessionSettings{}, 0}));
  put("session", Encode(Session{a, SampleSettings(), 1}));
  SessionSettings limited = SampleSettings();
  limited.rate_limits = {RateRule{"", "", "", {{20, 1000}, {100, 120'000}}},
                         RateRule{"match", "GET", "/matches/{id}", {{250, 10'000}}}};
  limited.learn_rate_limits = true;
  put("open_rate_limits", Encode(Open{a, limited, 10}));

  Statements statements{a, {}, 0};
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
  statements.seq = 2;
  put("dispatch", Encode(Command::kDispatch, statements));
  put("submit_empty", Encode(Command::kSubmit, Statements{b, {}, 0}));
  put("dispatch_empty", Encode(Command::kDispatch, Statements{b, {}, 0xfffffffffull}));

  Results results{a, 3, {}};
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
  // §3.8: a 429 handed back with its rate report, beside a plain result.
  Results throttled{a, 4, {}};
  throttled.results.push_back(WireResult{7, Response{.status = 200, .body = "ok"}});
  throttled.results.push_back(WireResult{8, Response{.status = 429, .error = ResponseError{StatusCode::kHttpStatus, "HTTP 429"}},
                                         RateReport{.throttled = true, .type = RateLimitType::kMethod,
                                                    .retry_after_ms = 2000, .app = {{20, 1000}, {100, 120'000}},
                                                    .method = {{250, 10'000}}}});
  put("results_rate_report", Encode(std::move(throttled)));
  put("results_empty", Encode(Results{b, 1, {}}));
  // As the broker forwards a worker's RESULTS: frame 2 written anew.
  Results forwarded{b, 9, {}};
  forwarded.results.push_back(WireResult{0, Response{.status = 201, .body = "x"}});
  Frames restamped = Encode(std::move(forwarded));
  RestampResults(restamped, a, 1ull << 40);
  put("results_restamped", restamped);

  put("cancel", Encode(Command::kCancel, SessionRef{a}));
  put("close", Encode(Command::kClose, SessionRef{a}));
  put("opened", Encode(Opened{b, 1000, 10000}));
  put("closed", Encode(Command::kClosed, SessionRef{b}));
  put("end_session", Encode(EndSession{a, 4}));
  put("ready", Encode(Ready{"host-42-1", "host", 64, 4242}));
  // §3.9 control.
  put("status", EncodeEmpty(Command::kStatus));
  put("workers", EncodeEmpty(Command::kListWorkers));
  put("sessions", EncodeEmpty(Command::kListSessions));
  put("shutdown", EncodeEmpty(Command::kShutdown));
  put("drain", EncodeEmpty(Command::kDrain));
  put("cancel_session", Encode(Command::kCancelSession, SessionRef{a}));
  put("drain_worker", Encode(WorkerName{"host-42-1"}));
  put("done", Encode(Done{"worker host-42-1 draining"}));
  put("status_report", Encode(StatusReport{"0.1.0", 60000, 2, 3, 100, 50, 1ull << 33, 7, 9, 11, 250500, 99000}));
  {
    StatusReport with_keys{"0.1.0", 60000, 2, 3, 100, 50, 1ull << 33, 7, 9, 11, 250500, 99000};
    with_keys.rate_keys = {{"host api.example:443", {{20, 1000}, {100, 120000}}, 1234, 2, 850},
                           {"endpoint GET /a/{} api.example:443", {}, 3, 0, 0}};
    put("status_report_rate_keys", Encode(with_keys));
  }
  put("workers_report", Encode(std::vector<WorkerRow>{{"w-1", "host-a", 4242, 64, 10, 1000, 3, 150, "busy"},
                                                      {"w-2", "host-b", 7, 8, 0, 0, 0, 2500, "unresponsive"}}));
  put("workers_report_empty", Encode(std::vector<WorkerRow>{}));
  put("sessions_report", Encode(std::vector<SessionRow>{{b, "127.0.0.1", 25, 5, 25, 100, 1, 60000, 12500}}));
  put("error", Encode(ErrorReply{StatusCode::kNotFound, "no such session", a}));
  put("error_no_session", Encode(ErrorReply{StatusCode::kFailedPrecondition,
                                             "unsupported protocol version 1, this peer speaks 2", std::nullopt}));
  put("heartbeat", EncodeHeartbeat());
  put("draining", EncodeEmpty(Command::kDraining));
  put("disconnect", EncodeEmpty(Command::kDisconnect));
  put("heartbeat_session", EncodeHeartbeat(b));
  // The broker's HEARTBEAT: to a worker (the answer to READY is [0]), and
  // to a client.
  put("heartbeat_broker_ready", Encode(BrokerBeat{std::nullopt, 0, 0}));
  put("heartbeat_broker_worker", Encode(BrokerBeat{std::nullopt, 77, 0}));
  put("heartbeat_broker_client", Encode(BrokerBeat{b, 12, 4096, 3}));
  put("heartbeat_broker_no_workers", Encode(BrokerBeat{a, 0, 0, 0}));
  put("ack_client", Encode(Ack{a, 5}));
  put("ack_worker", Encode(Ack{std::nullopt, 1ull << 33}));
  put("sync", Encode(Sync{a, 2, {{3, 4}, {10, 1}, {1ull << 40, 65536}}}));
  put("sync_empty", Encode(Sync{b, 0, {}}));
  put("synced", Encode(Synced{a, {{3, 2}}, 7}));
  put("synced_empty", Encode(Synced{b, {}, 0}));
  put("holding", Encode(Holding{6, {{a, {1, 5, 9}}, {b, {}}}}));
  put("holding_empty", Encode(Holding{0, {}}));

  // Malformed on purpose: each is one edit away from a valid message.
  // A GTR/1 peer's HEARTBEAT (§2.2), and the ERROR every version decodes.
  Frames f = EncodeHeartbeat();
  static_cast<std::uint8_t*>(f[0].data())[3] = 1;
  put("bad_version", f);
  f = Encode(ErrorReply{StatusCode::kFailedPrecondition, "unsupported protocol version 2, this peer speaks 1",
                        std::nullopt});
  static_cast<std::uint8_t*>(f[0].data())[3] = 1;
  put("error_v1", f);
  f = Encode(Command::kCancel, SessionRef{a});
  static_cast<std::uint8_t*>(f[1].data())[0] = 0x99;
  put("bad_command", f);
  f = Encode(Command::kClose, SessionRef{a});
  f[2] = zmq::message_t(std::string(static_cast<const char*>(f[2].data()), f[2].size()) + '\xc0');
  put("trailing_byte", f);
  Results one{a, 2, {}};
  one.results.push_back(WireResult{3, Response{.status = 204}});
  f = Encode(std::move(one));
  f.pop_back();
  put("results_missing_body", f);
  // GTR/1's RESULTS layout: header [session, [result, ...]], bodies from
  // frame 3.
  one = Results{a, 2, {}};
  one.results.push_back(WireResult{3, Response{.status = 204, .body = "b"}});
  f = Encode(std::move(one));
  {
    msgpack::sbuffer buf;
    msgpack::packer<msgpack::sbuffer> pk(buf);
    pk.pack_array(2);
    pk.pack_bin(16);
    pk.pack_bin_body(a.raw().data(), 16);
    buf.write(static_cast<const char*>(f[3].data()), f[3].size());
    Frames v1;
    v1.push_back(std::move(f[0]));
    v1.push_back(std::move(f[1]));
    v1.emplace_back(buf.data(), buf.size());
    v1.push_back(std::move(f[4]));
    put("results_v1_layout", v1);
  }
  // GTR/1's END_SESSION [session] and DISPATCH without a seq.
  put("end_session_without_seq", Encode(Command::kEndSession, SessionRef{a}));
  {
    Frames d = Encode(Command::kSubmit, statements);
    const std::uint8_t dispatch = static_cast<std::uint8_t>(Command::kDispatch);
    d[1] = zmq::message_t(&dispatch, 1);
    put("dispatch_without_seq", d);
  }
  put("sync_zero_count", Raw(Command::kSync, [&](auto& pk) {
        pk.pack_array(3);
        pk.pack_bin(16);
        pk.pack_bin_body(a.raw().data(), 16);
        pk.pack(0);
        pk.pack_array(1);
        pk.pack_array(2);
        pk.pack(5);
        pk.pack(0);
      }));
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
