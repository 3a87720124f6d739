#include "gatherer/protocol.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <memory>
#include <string_view>

#include <msgpack.hpp>

#include "msgpack_reader.h"

namespace gatherer::protocol {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

// Response bodies up to this size are copied into their RESULTS frame rather
// than handed over (Encode(Results&&)).
constexpr std::size_t kCopiedBodyMax = 256;

zmq::message_t Signature() { return zmq::message_t(kSignature.data(), kSignature.size()); }

zmq::message_t CommandFrame(Command c) {
  const auto byte = static_cast<std::uint8_t>(c);
  return zmq::message_t(&byte, 1);
}

Frames Start(Command c, const msgpack::sbuffer& header) {
  Frames frames;
  frames.reserve(3);
  frames.push_back(Signature());
  frames.push_back(CommandFrame(c));
  frames.emplace_back(header.data(), header.size());
  return frames;
}

void PackStr(Packer& pk, std::string_view s) {
  pk.pack_str(static_cast<std::uint32_t>(s.size()));
  pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

void PackBin(Packer& pk, std::string_view s) {
  pk.pack_bin(static_cast<std::uint32_t>(s.size()));
  pk.pack_bin_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

void PackHeaders(Packer& pk, const Headers& headers) {
  pk.pack_array(static_cast<std::uint32_t>(headers.size()));
  for (const auto& [name, value] : headers) {
    pk.pack_array(2);
    PackStr(pk, name);
    PackStr(pk, value);
  }
}

void PackWindows(Packer& pk, const RateWindows& windows) {
  pk.pack_array(static_cast<std::uint32_t>(windows.size()));
  for (const auto& w : windows) {
    pk.pack_array(2);
    pk.pack(w.count);
    pk.pack(w.window_ms);
  }
}

// [flags (1 = throttled, 2 = retry), type, retry_after_ms, app windows, method windows] (§3.8).
void PackRateReport(Packer& pk, const RateReport& r) {
  pk.pack_array(5);
  pk.pack(static_cast<std::uint8_t>(r.throttled ? 1 : r.retry ? 2 : 0));
  pk.pack(static_cast<std::uint8_t>(r.type));
  pk.pack(r.retry_after_ms);
  PackWindows(pk, r.app);
  PackWindows(pk, r.method);
}

void PackSettings(Packer& pk, const SessionSettings& s) {
  // The rate keys are written only when set, so a session without them
  // encodes as before (§3.8).
  // So are the TLS and proxy keys.
  const std::array<std::pair<const char*, const std::string*>, 5> optional_strings{{{"tls_ca_pem", &s.tls_ca_pem},
                                                                                    {"tls_cert_pem", &s.tls_cert_pem},
                                                                                    {"tls_key_pem", &s.tls_key_pem},
                                                                                    {"proxy", &s.proxy},
                                                                                    {"no_proxy", &s.no_proxy}}};
  const auto strings_set = std::count_if(optional_strings.begin(), optional_strings.end(),
                                         [](const auto& entry) { return !entry.second->empty(); });
  pk.pack_map(13 + (s.rate_limits.empty() ? 0 : 1) + (s.learn_rate_limits ? 1 : 0) + (s.tls_insecure ? 1 : 0) +
              static_cast<std::uint32_t>(strings_set));
  for (const auto& [key, value] : optional_strings) {
    if (value->empty()) continue;
    PackStr(pk, key);
    PackStr(pk, *value);
  }
  if (s.tls_insecure) {
    PackStr(pk, "tls_insecure");
    pk.pack(true);
  }
  if (!s.rate_limits.empty()) {
    PackStr(pk, "rate_limits");
    pk.pack_array(static_cast<std::uint32_t>(s.rate_limits.size()));
    for (const RateRule& r : s.rate_limits) {
      pk.pack_array(4);
      PackStr(pk, r.name);
      PackStr(pk, r.method);
      PackStr(pk, r.path);
      PackWindows(pk, r.windows);
    }
  }
  if (s.learn_rate_limits) {
    PackStr(pk, "learn_rate_limits");
    pk.pack(true);
  }
  PackStr(pk, "workers"); pk.pack(s.workers);
  PackStr(pk, "base_url"); PackStr(pk, s.base_url);
  PackStr(pk, "headers"); PackHeaders(pk, s.headers);
  PackStr(pk, "timeout_ms"); pk.pack(s.timeout_ms);
  PackStr(pk, "connect_timeout_ms"); pk.pack(s.connect_timeout_ms);
  PackStr(pk, "max_attempts"); pk.pack(s.max_attempts);
  PackStr(pk, "backoff_base_ms"); pk.pack(s.backoff_base_ms);
  PackStr(pk, "backoff_max_ms"); pk.pack(s.backoff_max_ms);
  PackStr(pk, "retry_after_max_ms"); pk.pack(s.retry_after_max_ms);
  PackStr(pk, "max_body_bytes"); pk.pack(s.max_body_bytes);
  PackStr(pk, "max_redirects"); pk.pack(s.max_redirects);
  PackStr(pk, "accept_min"); pk.pack(s.accept_min);
  PackStr(pk, "accept_max"); pk.pack(s.accept_max);
}

// ---- decoding -------------------------------------------------------------

// Thrown only inside this file and caught at each decoder's boundary.
struct Malformed {
  const char* what;
};

[[noreturn]] void Fail(const char* what) { throw Malformed{what}; }
}  // namespace

void detail::ReaderFail(const char* what) { Fail(what); }

namespace {

const msgpack::object_array& AsArray(const msgpack::object& o, std::uint32_t min_size, const char* what) {
  if (o.type != msgpack::type::ARRAY || o.via.array.size < min_size) Fail(what);
  return o.via.array;
}

template <typename T>
T AsUint(const msgpack::object& o, const char* what) {
  if (o.type != msgpack::type::POSITIVE_INTEGER || o.via.u64 > std::numeric_limits<T>::max()) Fail(what);
  return static_cast<T>(o.via.u64);
}

std::string_view AsStr(const msgpack::object& o, const char* what) {
  if (o.type != msgpack::type::STR) Fail(what);
  return {o.via.str.ptr, o.via.str.size};
}

std::string_view AsBin(const msgpack::object& o, const char* what) {
  if (o.type == msgpack::type::BIN) return {o.via.bin.ptr, o.via.bin.size};
  if (o.type == msgpack::type::STR) return {o.via.str.ptr, o.via.str.size};
  Fail(what);
}

SessionId AsSession(const msgpack::object& o) {
  auto id = SessionIdFromRaw(AsBin(o, "session id is not bin"));
  if (!id) Fail("session id is not 16 bytes");
  return *id;
}

Headers AsHeaders(const msgpack::object& o) {
  const auto& arr = AsArray(o, 0, "headers is not an array");
  Headers headers;
  headers.reserve(arr.size);
  for (std::uint32_t i = 0; i < arr.size; ++i) {
    const auto& pair = AsArray(arr.ptr[i], 2, "header is not a [name, value] pair");
    headers.emplace_back(AsStr(pair.ptr[0], "header name is not str"),
                         AsStr(pair.ptr[1], "header value is not str"));
  }
  return headers;
}

RateWindows AsWindows(const msgpack::object& o, bool allow_empty) {
  const auto& arr = AsArray(o, 0, "rate windows is not an array");
  if ((!allow_empty && arr.size == 0) || arr.size > kMaxRateWindows) Fail("rate windows: wrong number of windows");
  RateWindows windows(arr.size);
  for (std::uint32_t i = 0; i < arr.size; ++i) {
    const auto& pair = AsArray(arr.ptr[i], 2, "rate window is not [count, window_ms]");
    windows[i].count = AsUint<std::uint32_t>(pair.ptr[0], "rate window count");
    windows[i].window_ms = AsUint<std::uint32_t>(pair.ptr[1], "rate window window_ms");
    if (windows[i].count == 0 || windows[i].count > kMaxRateCount || windows[i].window_ms == 0 ||
        windows[i].window_ms > kMaxRateWindowMs) {
      Fail("rate window out of range");
    }
  }
  return windows;
}

std::vector<RateRule> AsRateRules(const msgpack::object& o) {
  const auto& arr = AsArray(o, 0, "rate_limits is not an array");
  if (arr.size > kMaxRateRules) Fail("rate_limits: too many rules");
  std::vector<RateRule> rules(arr.size);
  for (std::uint32_t i = 0; i < arr.size; ++i) {
    const auto& r = AsArray(arr.ptr[i], 4, "rate rule is not [name, method, path, windows]");
    rules[i].name = AsStr(r.ptr[0], "rate rule name");
    rules[i].method = AsStr(r.ptr[1], "rate rule method");
    rules[i].path = AsStr(r.ptr[2], "rate rule path");
    rules[i].windows = AsWindows(r.ptr[3], false);
    if (!rules[i].path.empty() && (rules[i].path.front() != '/' || rules[i].name.empty())) {
      Fail("rate rule path must start with '/' and be named");
    }
  }
  return rules;
}

RateReport AsRateReport(const msgpack::object& o) {
  const auto& a = AsArray(o, 5, "rate report is not [flags, type, retry_after_ms, app, method]");
  RateReport r;
  const auto flags = AsUint<std::uint8_t>(a.ptr[0], "rate report flags");
  if (flags > 2) Fail("rate report flags out of range");
  r.throttled = flags == 1;
  r.retry = flags == 2;
  const auto type = AsUint<std::uint8_t>(a.ptr[1], "rate report type");
  if (type > 3) Fail("rate report type out of range");
  r.type = static_cast<RateLimitType>(type);
  r.retry_after_ms = AsUint<std::uint32_t>(a.ptr[2], "rate report retry_after_ms");
  r.app = AsWindows(a.ptr[3], true);
  r.method = AsWindows(a.ptr[4], true);
  return r;
}

SessionSettings AsSettings(const msgpack::object& o) {
  if (o.type != msgpack::type::MAP) Fail("settings is not a map");
  SessionSettings s;
  const auto& map = o.via.map;
  for (std::uint32_t i = 0; i < map.size; ++i) {
    const std::string_view key = AsStr(map.ptr[i].key, "settings key is not str");
    const msgpack::object& v = map.ptr[i].val;
    // Unknown keys are ignored so that newer clients can add settings (§3.1).
    if (key == "workers") s.workers = AsUint<std::uint32_t>(v, "workers");
    else if (key == "base_url") s.base_url = AsStr(v, "base_url");
    else if (key == "headers") s.headers = AsHeaders(v);
    else if (key == "timeout_ms") s.timeout_ms = AsUint<std::uint32_t>(v, "timeout_ms");
    else if (key == "connect_timeout_ms") s.connect_timeout_ms = AsUint<std::uint32_t>(v, "connect_timeout_ms");
    else if (key == "max_attempts") s.max_attempts = AsUint<std::uint32_t>(v, "max_attempts");
    else if (key == "backoff_base_ms") s.backoff_base_ms = AsUint<std::uint32_t>(v, "backoff_base_ms");
    else if (key == "backoff_max_ms") s.backoff_max_ms = AsUint<std::uint32_t>(v, "backoff_max_ms");
    else if (key == "retry_after_max_ms") s.retry_after_max_ms = AsUint<std::uint32_t>(v, "retry_after_max_ms");
    else if (key == "max_body_bytes") s.max_body_bytes = AsUint<std::uint64_t>(v, "max_body_bytes");
    else if (key == "max_redirects") s.max_redirects = AsUint<std::uint32_t>(v, "max_redirects");
    else if (key == "accept_min") s.accept_min = AsUint<std::uint16_t>(v, "accept_min");
    else if (key == "accept_max") s.accept_max = AsUint<std::uint16_t>(v, "accept_max");
    else if (key == "rate_limits") s.rate_limits = AsRateRules(v);
    else if (key == "learn_rate_limits") {
      if (v.type != msgpack::type::BOOLEAN) Fail("learn_rate_limits is not a boolean");
      s.learn_rate_limits = v.via.boolean;
    } else if (key == "tls_ca_pem") s.tls_ca_pem = AsStr(v, "tls_ca_pem");
    else if (key == "tls_cert_pem") s.tls_cert_pem = AsStr(v, "tls_cert_pem");
    else if (key == "tls_key_pem") s.tls_key_pem = AsStr(v, "tls_key_pem");
    else if (key == "proxy") s.proxy = AsStr(v, "proxy");
    else if (key == "no_proxy") s.no_proxy = AsStr(v, "no_proxy");
    else if (key == "tls_insecure") {
      if (v.type != msgpack::type::BOOLEAN) Fail("tls_insecure is not a boolean");
      s.tls_insecure = v.via.boolean;
    }
  }
  if (s.tls_cert_pem.empty() != s.tls_key_pem.empty()) Fail("tls_cert_pem and tls_key_pem come together");
  if (s.workers == 0 || s.max_attempts == 0 || s.accept_min > s.accept_max || s.max_body_bytes > kMaxResponseBody) {
    Fail("settings out of range");
  }
  return s;
}

const msgpack::unpack_limit kLimits(
    /*array=*/kMaxBatch + 16, /*map=*/1024, /*str=*/kMaxHeaderBytes, /*bin=*/kMaxHeaderBytes,
    /*ext=*/0, /*depth=*/8);

// Strings and binaries of a header are read in place, not copied into the
// unpacked object's zone: every decoder copies what it keeps out of the
// object while the frame, which outlives the decoder's call, is still there.
bool ReferenceInPlace(msgpack::type::object_type, std::size_t, void*) { return true; }

// Unpacks one frame holding exactly one msgpack value.
msgpack::object_handle Unpack(const zmq::message_t& h) {
  if (h.size() > kMaxHeaderBytes) Fail("header frame too large");
  std::size_t offset = 0;
  auto handle = msgpack::unpack(static_cast<const char*>(h.data()), h.size(), offset, &ReferenceInPlace,
                                nullptr, kLimits);
  if (offset != h.size()) Fail("trailing bytes after header");
  return handle;
}

// Unpacks the header frame (index 2) after checking the frame count.
msgpack::object_handle Header(std::span<const zmq::message_t> frames, std::size_t max_frames) {
  if (frames.size() < 3) Fail("missing header frame");
  if (frames.size() > max_frames) Fail("unexpected extra frames");
  return Unpack(frames[2]);
}

std::vector<IndexRange> AsRanges(const msgpack::object& o) {
  const auto& list = AsArray(o, 0, "ranges is not an array");
  if (list.size > kMaxBatch) Fail("too many ranges in one message");
  std::vector<IndexRange> ranges(list.size);
  for (std::uint32_t i = 0; i < list.size; ++i) {
    const auto& r = AsArray(list.ptr[i], 2, "range is not [first, count]");
    ranges[i].first = AsUint<std::uint64_t>(r.ptr[0], "range first");
    ranges[i].count = AsUint<std::uint32_t>(r.ptr[1], "range count");
    if (ranges[i].count == 0 || ranges[i].count > kMaxBatch) Fail("range count out of range");
  }
  return ranges;
}

template <typename F>
auto Guard(F&& f) -> Result<decltype(f())> {
  try {
    return f();
  } catch (const Malformed& m) {
    return Unexpected(InvalidArgument(m.what));
  } catch (const msgpack::unpack_error& e) {
    return Unexpected(InvalidArgument(std::string("bad msgpack: ") + e.what()));
  } catch (const msgpack::type_error&) {
    return Unexpected(InvalidArgument("bad msgpack type"));
  } catch (const std::bad_alloc&) {
    return Unexpected(ResourceExhausted("message too large to decode"));
  } catch (const std::exception& e) {
    return Unexpected(InvalidArgument(std::string("bad message: ") + e.what()));
  }
}

}  // namespace

const char* CommandName(Command command) {
  switch (command) {
    case Command::kOpen: return "OPEN";
    case Command::kSubmit: return "SUBMIT";
    case Command::kCancel: return "CANCEL";
    case Command::kClose: return "CLOSE";
    case Command::kHeartbeat: return "HEARTBEAT";
    case Command::kAck: return "ACK";
    case Command::kSync: return "SYNC";
    case Command::kSynced: return "SYNCED";
    case Command::kHolding: return "HOLDING";
    case Command::kOpened: return "OPENED";
    case Command::kResults: return "RESULTS";
    case Command::kClosed: return "CLOSED";
    case Command::kError: return "ERROR";
    case Command::kReady: return "READY";
    case Command::kDraining: return "DRAINING";
    case Command::kDisconnect: return "DISCONNECT";
    case Command::kSession: return "SESSION";
    case Command::kDispatch: return "DISPATCH";
    case Command::kEndSession: return "END_SESSION";
    case Command::kDrain: return "DRAIN";
    case Command::kStatus: return "STATUS";
    case Command::kListWorkers: return "WORKERS";
    case Command::kListSessions: return "SESSIONS";
    case Command::kCancelSession: return "CANCEL_SESSION";
    case Command::kDrainWorker: return "DRAIN_WORKER";
    case Command::kShutdown: return "SHUTDOWN";
    case Command::kStatusReport: return "STATUS_REPORT";
    case Command::kWorkersReport: return "WORKERS_REPORT";
    case Command::kSessionsReport: return "SESSIONS_REPORT";
    case Command::kDone: return "DONE";
  }
  return "UNKNOWN";
}

Result<Command> PeekCommand(std::span<const zmq::message_t> frames) {
  if (frames.size() < 2) return Unexpected(InvalidArgument("fewer than 2 frames"));
  const auto& sig = frames[0];
  if (sig.size() != kSignature.size() || std::memcmp(sig.data(), kSignature.data(), 3) != 0) {
    return Unexpected(InvalidArgument("bad signature"));
  }
  const auto version = static_cast<const std::uint8_t*>(sig.data())[3];
  if (version != kVersion) {
    return Unexpected(FailedPrecondition("unsupported protocol version " + std::to_string(version) +
                                         ", this peer speaks " + std::to_string(kVersion)));
  }
  if (frames[1].size() != 1) return Unexpected(InvalidArgument("command frame is not 1 byte"));
  const auto c = static_cast<Command>(*static_cast<const std::uint8_t*>(frames[1].data()));
  switch (c) {
    case Command::kOpen: case Command::kSubmit: case Command::kCancel: case Command::kClose:
    case Command::kHeartbeat: case Command::kOpened: case Command::kResults: case Command::kClosed:
    case Command::kError: case Command::kReady: case Command::kSession: case Command::kDispatch:
    case Command::kEndSession: case Command::kDraining: case Command::kDisconnect: case Command::kAck:
    case Command::kSync: case Command::kSynced: case Command::kHolding: case Command::kDrain:
    case Command::kStatus: case Command::kListWorkers: case Command::kListSessions: case Command::kCancelSession:
    case Command::kDrainWorker: case Command::kShutdown: case Command::kStatusReport: case Command::kWorkersReport:
    case Command::kSessionsReport: case Command::kDone:
      return c;
  }
  return Unexpected(InvalidArgument("unknown command"));
}

Frames Encode(Command command, const SessionRef& m) {
  msgpack::sbuffer buf(32);
  Packer pk(buf);
  pk.pack_array(1);
  PackBin(pk, m.session.raw());
  return Start(command, buf);
}

Frames Encode(const Open& m) {
  msgpack::sbuffer buf(256);
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, m.session.raw());
  PackSettings(pk, m.settings);
  pk.pack(m.prefetch);
  return Start(Command::kOpen, buf);
}

namespace {
// A statement's six elements after its index (§2: method … idempotent).
void PackFields(Packer& pk, const Statement& s) {
  PackStr(pk, s.method);
  PackStr(pk, s.url);
  PackHeaders(pk, s.headers);
  PackBin(pk, s.body);
  pk.pack(s.timeout_ms);
  if (s.idempotent) pk.pack(*s.idempotent); else pk.pack_nil();
}

bool Waited(std::uint64_t rate_wait_us, std::uint32_t throttled, std::uint32_t attempts) {
  return rate_wait_us != 0 || throttled != 0 || attempts != 0;
}

// A DISPATCHed statement's 8th element (§3.8.8).
void PackWaited(Packer& pk, std::uint64_t rate_wait_us, std::uint32_t throttled, std::uint32_t attempts) {
  pk.pack_array(attempts != 0 ? 3 : 2);
  pk.pack(rate_wait_us);
  pk.pack(throttled);
  if (attempts != 0) pk.pack(attempts);
}

void PackStatement(Packer& pk, std::uint64_t index, const Statement& s, std::uint64_t rate_wait_us = 0,
                   std::uint32_t throttled = 0, std::uint32_t attempts = 0) {
  const bool waited = Waited(rate_wait_us, throttled, attempts);
  pk.pack_array(waited ? 8 : 7);
  pk.pack(index);
  PackFields(pk, s);
  if (waited) PackWaited(pk, rate_wait_us, throttled, attempts);
}

// [rate_wait_us, throttled] in a result, [rate_wait_us, throttled, attempts?]
// in a statement (§3.8.8).
void AsRateWait(const msgpack::object& o, std::uint64_t& wait_us, std::uint32_t& throttled,
                std::uint32_t* attempts = nullptr) {
  const auto& a = AsArray(o, 2, "rate wait is not [rate_wait_us, throttled]");
  wait_us = AsUint<std::uint64_t>(a.ptr[0], "rate_wait_us");
  throttled = AsUint<std::uint32_t>(a.ptr[1], "throttled");
  if (attempts != nullptr && a.size > 2) *attempts = AsUint<std::uint32_t>(a.ptr[2], "attempts");
}

std::size_t SizeHint(const Statement& s) { return 32 + s.url.size() + s.body.size() + 16 * s.headers.size(); }
}  // namespace

Frames Encode(Command command, const Statements& m) {
  std::size_t estimate = 64;
  for (const auto& ws : m.statements) estimate += SizeHint(ws.statement);
  msgpack::sbuffer buf(estimate);
  Packer pk(buf);
  const bool dispatch = command == Command::kDispatch;
  pk.pack_array(dispatch ? 3 : 2);
  PackBin(pk, m.session.raw());
  pk.pack_array(static_cast<std::uint32_t>(m.statements.size()));
  for (const auto& ws : m.statements) PackStatement(pk, ws.index, ws.statement, ws.rate_wait_us, ws.throttled, ws.attempts);
  if (dispatch) pk.pack(m.seq);
  return Start(command, buf);
}

Frames EncodeSubmit(const SessionId& session, std::uint64_t first_index, std::span<const Statement> statements) {
  std::size_t estimate = 64;
  for (const auto& s : statements) estimate += SizeHint(s);
  msgpack::sbuffer buf(estimate);
  Packer pk(buf);
  pk.pack_array(2);
  PackBin(pk, session.raw());
  pk.pack_array(static_cast<std::uint32_t>(statements.size()));
  for (std::size_t i = 0; i < statements.size(); ++i) PackStatement(pk, first_index + i, statements[i]);
  return Start(Command::kSubmit, buf);
}

Frames EncodeDispatch(const SessionId& session, std::span<const HeldStatement> statements, std::uint64_t seq) {
  std::size_t estimate = 64;
  for (const auto& h : statements) estimate += 40 + h.encoded.size();
  msgpack::sbuffer buf(estimate);
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, session.raw());
  pk.pack_array(static_cast<std::uint32_t>(statements.size()));
  for (const auto& h : statements) {
    const bool waited = Waited(h.rate_wait_us, h.throttled, h.attempts);
    pk.pack_array(waited ? 8 : 7);
    pk.pack(h.index);
    buf.write(h.encoded.data(), h.encoded.size());
    if (waited) PackWaited(pk, h.rate_wait_us, h.throttled, h.attempts);
  }
  pk.pack(seq);
  return Start(Command::kDispatch, buf);
}

HeldStatement Hold(std::uint64_t index, const Statement& statement) {
  msgpack::sbuffer buf(SizeHint(statement));
  Packer pk(buf);
  PackFields(pk, statement);
  return HeldStatement{index, std::string(buf.data(), buf.size())};
}

namespace {
zmq::message_t ResultsHead(const SessionId& session, std::uint64_t seq) {
  msgpack::sbuffer buf(32);
  Packer pk(buf);
  pk.pack_array(2);
  PackBin(pk, session.raw());
  pk.pack(seq);
  return zmq::message_t(buf.data(), buf.size());
}
}  // namespace

void RestampResults(Frames& frames, const SessionId& session, std::uint64_t seq) {
  frames[2] = ResultsHead(session, seq);
}

Frames Encode(Results&& m) {
  msgpack::sbuffer buf(16 + 96 * m.results.size());
  Packer pk(buf);
  pk.pack_array(static_cast<std::uint32_t>(m.results.size()));
  for (const auto& wr : m.results) {
    const Response& r = wr.response;
    const bool waited = r.rate_wait_us != 0 || r.throttled != 0;
    pk.pack_array(waited ? 10 : wr.rate ? 9 : 8);
    pk.pack(wr.index);
    pk.pack(static_cast<std::uint32_t>(r.status < 0 ? 0 : r.status));
    PackHeaders(pk, r.headers);
    pk.pack(static_cast<std::uint8_t>(r.error ? r.error->code : StatusCode::kOk));
    PackStr(pk, r.error ? std::string_view(r.error->message) : std::string_view());
    pk.pack(r.attempts);
    pk.pack(r.elapsed_us);
    PackStr(pk, r.worker);
    if (wr.rate) PackRateReport(pk, *wr.rate);
    else if (waited) pk.pack_nil();
    if (waited) {
      pk.pack_array(2);
      pk.pack(r.rate_wait_us);
      pk.pack(r.throttled);
    }
  }
  Frames frames;
  frames.reserve(4 + m.results.size());
  frames.push_back(Signature());
  frames.push_back(CommandFrame(Command::kResults));
  frames.push_back(ResultsHead(m.session, m.seq));
  frames.emplace_back(buf.data(), buf.size());
  for (auto& wr : m.results) {
    std::string& body = wr.response.body;
    if (body.size() <= kCopiedBodyMax) {
      // A short body is copied into the frame: cheaper than the two
      // allocations of handing its buffer over (none at all when empty or
      // small enough for ZeroMQ's inline storage).
      frames.emplace_back(body.data(), body.size());
      continue;
    }
    // Zero-copy: the frame takes ownership of the body's heap buffer (§3.4).
    auto* owned = new std::string(std::move(body));
    frames.emplace_back(
        owned->data(), owned->size(),
        [](void*, void* hint) { delete static_cast<std::string*>(hint); }, owned);
  }
  return frames;
}

Frames Encode(const Session& m) {
  msgpack::sbuffer buf(256);
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, m.session.raw());
  PackSettings(pk, m.settings);
  pk.pack(m.seq);
  return Start(Command::kSession, buf);
}

Frames Encode(const Opened& m) {
  msgpack::sbuffer buf(40);
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, m.session.raw());
  pk.pack(m.heartbeat_ms);
  pk.pack(m.session_ttl_ms);
  return Start(Command::kOpened, buf);
}

Frames Encode(const EndSession& m) {
  msgpack::sbuffer buf(40);
  Packer pk(buf);
  pk.pack_array(2);
  PackBin(pk, m.session.raw());
  pk.pack(m.seq);
  return Start(Command::kEndSession, buf);
}

Frames Encode(const Ack& m) {
  msgpack::sbuffer buf(40);
  Packer pk(buf);
  if (m.session) {
    pk.pack_array(2);
    PackBin(pk, m.session->raw());
  } else {
    pk.pack_array(1);
  }
  pk.pack(m.seq);
  return Start(Command::kAck, buf);
}

namespace {
void PackRanges(Packer& pk, const std::vector<IndexRange>& ranges) {
  pk.pack_array(static_cast<std::uint32_t>(ranges.size()));
  for (const auto& r : ranges) {
    pk.pack_array(2);
    pk.pack(r.first);
    pk.pack(r.count);
  }
}
}  // namespace

void AppendIndex(std::vector<IndexRange>& ranges, std::uint64_t index) {
  if (!ranges.empty() && ranges.back().first + ranges.back().count == index && ranges.back().count < kMaxBatch) {
    ++ranges.back().count;
  } else {
    ranges.push_back(IndexRange{index, 1});
  }
}

Frames Encode(const Sync& m) {
  msgpack::sbuffer buf(48 + 20 * m.unanswered.size());
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, m.session.raw());
  pk.pack(m.ack);
  PackRanges(pk, m.unanswered);
  return Start(Command::kSync, buf);
}

Frames Encode(const Synced& m) {
  msgpack::sbuffer buf(48 + 20 * m.missing.size());
  Packer pk(buf);
  pk.pack_array(3);
  PackBin(pk, m.session.raw());
  PackRanges(pk, m.missing);
  pk.pack(m.seq);
  return Start(Command::kSynced, buf);
}

Frames Encode(const Holding& m) {
  std::size_t estimate = 32;
  for (const auto& [session, indices] : m.sessions) estimate += 24 + 9 * indices.size();
  msgpack::sbuffer buf(estimate);
  Packer pk(buf);
  pk.pack_array(2);
  pk.pack(m.seq);
  pk.pack_array(static_cast<std::uint32_t>(m.sessions.size()));
  for (const auto& [session, indices] : m.sessions) {
    pk.pack_array(2);
    PackBin(pk, session.raw());
    pk.pack_array(static_cast<std::uint32_t>(indices.size()));
    for (std::uint64_t i : indices) pk.pack(i);
  }
  return Start(Command::kHolding, buf);
}

Frames Encode(const Ready& m) {
  msgpack::sbuffer buf(64);
  Packer pk(buf);
  pk.pack_array(4);
  PackStr(pk, m.worker_id);
  PackStr(pk, m.host);
  pk.pack(m.slots);
  pk.pack(m.pid);
  return Start(Command::kReady, buf);
}

Frames Encode(const StatusReport& m) {
  msgpack::sbuffer buf(128 + 64 * m.rate_keys.size());
  Packer pk(buf);
  // The rate keys are written only when there are any, so a broker without
  // them encodes as before (§3.9.7).
  pk.pack_array(m.rate_keys.empty() ? 12 : 13);
  PackStr(pk, m.version);
  for (std::uint64_t v : {m.uptime_ms, m.sessions, m.workers, m.queued, m.in_flight, m.done, m.failed, m.retried,
                          m.redispatched, m.rate_10s_milli, m.rate_1m_milli}) {
    pk.pack(v);
  }
  if (!m.rate_keys.empty()) {
    pk.pack_array(static_cast<std::uint32_t>(m.rate_keys.size()));
    for (const RateKeyRow& k : m.rate_keys) {
      pk.pack_array(5);
      PackStr(pk, k.key);
      PackWindows(pk, k.windows);
      pk.pack(k.used);
      pk.pack(k.throttled);
      pk.pack(k.paused_ms);
    }
  }
  return Start(Command::kStatusReport, buf);
}

Frames Encode(const std::vector<WorkerRow>& m) {
  msgpack::sbuffer buf(64 + 96 * m.size());
  Packer pk(buf);
  pk.pack_array(static_cast<std::uint32_t>(m.size()));
  for (const WorkerRow& w : m) {
    pk.pack_array(9);
    PackStr(pk, w.worker_id);
    PackStr(pk, w.host);
    pk.pack(w.pid);
    pk.pack(w.slots);
    pk.pack(w.in_flight);
    pk.pack(w.done);
    pk.pack(w.failed);
    pk.pack(w.heartbeat_age_ms);
    PackStr(pk, w.state);
  }
  return Start(Command::kWorkersReport, buf);
}

Frames Encode(const std::vector<SessionRow>& m) {
  msgpack::sbuffer buf(64 + 96 * m.size());
  Packer pk(buf);
  pk.pack_array(static_cast<std::uint32_t>(m.size()));
  for (const SessionRow& s : m) {
    pk.pack_array(9);
    PackBin(pk, s.session.raw());
    PackStr(pk, s.client_host);
    pk.pack(s.window);
    pk.pack(s.queued);
    pk.pack(s.in_flight);
    pk.pack(s.done);
    pk.pack(s.failed);
    pk.pack(s.age_ms);
    pk.pack(s.rate_milli);
  }
  return Start(Command::kSessionsReport, buf);
}

Frames Encode(const WorkerName& m) {
  msgpack::sbuffer buf(32 + m.worker_id.size());
  Packer pk(buf);
  pk.pack_array(1);
  PackStr(pk, m.worker_id);
  return Start(Command::kDrainWorker, buf);
}

Frames Encode(const Done& m) {
  msgpack::sbuffer buf(32 + m.message.size());
  Packer pk(buf);
  pk.pack_array(1);
  PackStr(pk, m.message);
  return Start(Command::kDone, buf);
}

Frames Encode(const ErrorReply& m) {
  msgpack::sbuffer buf(64 + m.message.size());
  Packer pk(buf);
  pk.pack_array(3);
  pk.pack(static_cast<std::uint8_t>(m.code));
  PackStr(pk, m.message);
  if (m.session) PackBin(pk, m.session->raw()); else pk.pack_nil();
  return Start(Command::kError, buf);
}

Frames EncodeEmpty(Command command) {
  msgpack::sbuffer buf(1);
  Packer pk(buf);
  pk.pack_array(0);
  return Start(command, buf);
}

Frames EncodeHeartbeat() { return EncodeEmpty(Command::kHeartbeat); }

Status DecodeEmpty(std::span<const zmq::message_t> frames) {
  auto checked = Guard([&] {
    auto h = Header(frames, 3);
    AsArray(h.get(), 0, "header is not an array");
    return true;
  });
  return checked ? Status::Ok() : checked.error();
}

Frames Encode(const ClientBeat& m) {
  msgpack::sbuffer buf(24);
  Packer pk(buf);
  pk.pack_array(1);
  PackBin(pk, m.session.raw());
  return Start(Command::kHeartbeat, buf);
}

Frames EncodeHeartbeat(const SessionId& session) { return Encode(ClientBeat{session}); }

Frames Encode(const BrokerBeat& m) {
  msgpack::sbuffer buf(40);
  Packer pk(buf);
  if (m.session) {
    pk.pack_array(4);
    PackBin(pk, m.session->raw());
    pk.pack(m.seq);
    pk.pack(m.next_index);
    pk.pack(m.workers);
  } else {
    pk.pack_array(1);
    pk.pack(m.seq);
  }
  return Start(Command::kHeartbeat, buf);
}

Result<std::optional<ClientBeat>> DecodeHeartbeat(std::span<const zmq::message_t> frames) {
  return Guard([&]() -> std::optional<ClientBeat> {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 0, "header is not an array");
    if (a.size == 0) return std::nullopt;
    return ClientBeat{AsSession(a.ptr[0])};
  });
}

Result<BrokerBeat> DecodeBrokerHeartbeat(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 1, "broker heartbeat is not [seq] or [session, seq, next_index, workers]");
    BrokerBeat b;
    if (a.ptr[0].type == msgpack::type::POSITIVE_INTEGER) {
      b.seq = AsUint<std::uint64_t>(a.ptr[0], "seq");
      return b;
    }
    if (a.size < 4) Fail("broker heartbeat is not [session, seq, next_index, workers]");
    b.session = AsSession(a.ptr[0]);
    b.seq = AsUint<std::uint64_t>(a.ptr[1], "seq");
    b.next_index = AsUint<std::uint64_t>(a.ptr[2], "next_index");
    b.workers = AsUint<std::uint32_t>(a.ptr[3], "workers");
    return b;
  });
}

Result<Ack> DecodeAck(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 1, "header is not [seq] or [session, seq]");
    Ack ack;
    if (a.ptr[0].type == msgpack::type::POSITIVE_INTEGER) {
      ack.seq = AsUint<std::uint64_t>(a.ptr[0], "seq");
      return ack;
    }
    if (a.size < 2) Fail("header is not [session, seq]");
    ack.session = AsSession(a.ptr[0]);
    ack.seq = AsUint<std::uint64_t>(a.ptr[1], "seq");
    return ack;
  });
}

Result<Sync> DecodeSync(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [session, ack, unanswered]");
    return Sync{AsSession(a.ptr[0]), AsUint<std::uint64_t>(a.ptr[1], "ack"), AsRanges(a.ptr[2])};
  });
}

Result<Synced> DecodeSynced(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [session, missing, seq]");
    return Synced{AsSession(a.ptr[0]), AsRanges(a.ptr[1]), AsUint<std::uint64_t>(a.ptr[2], "seq")};
  });
}

Result<Holding> DecodeHolding(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 2, "header is not [seq, sessions]");
    Holding m;
    m.seq = AsUint<std::uint64_t>(a.ptr[0], "seq");
    const auto& list = AsArray(a.ptr[1], 0, "sessions is not an array");
    if (list.size > kMaxBatch) Fail("too many sessions in one message");
    std::size_t total = 0;
    m.sessions.resize(list.size);
    for (std::uint32_t i = 0; i < list.size; ++i) {
      const auto& entry = AsArray(list.ptr[i], 2, "holding is not [session, indices]");
      m.sessions[i].first = AsSession(entry.ptr[0]);
      const auto& indices = AsArray(entry.ptr[1], 0, "indices is not an array");
      total += indices.size;
      if (total > 16 * kMaxBatch) Fail("too many indices in one message");
      auto& out = m.sessions[i].second;
      out.resize(indices.size);
      for (std::uint32_t k = 0; k < indices.size; ++k) out[k] = AsUint<std::uint64_t>(indices.ptr[k], "index");
    }
    return m;
  });
}

Result<SessionRef> DecodeSessionRef(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 1, "header is not [session]");
    return SessionRef{AsSession(a.ptr[0])};
  });
}

Result<Open> DecodeOpen(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [session, settings, prefetch]");
    return Open{AsSession(a.ptr[0]), AsSettings(a.ptr[1]), AsUint<std::uint32_t>(a.ptr[2], "prefetch")};
  });
}

namespace {
using detail::MsgpackReader;

// A reader over a frame holding one msgpack value, with kLimits' limits.
MsgpackReader FrameReader(const zmq::message_t& frame) {
  if (frame.size() > kMaxHeaderBytes) Fail("header frame too large");
  return MsgpackReader(frame.data(), frame.size(), static_cast<std::uint32_t>(kLimits.array()),
                       static_cast<std::uint32_t>(kLimits.map()));
}

// The header frame (index 2) after checking the frame count, for a reader.
MsgpackReader HeaderReader(std::span<const zmq::message_t> frames, std::size_t max_frames) {
  if (frames.size() < 3) Fail("missing header frame");
  if (frames.size() > max_frames) Fail("unexpected extra frames");
  return FrameReader(frames[2]);
}

void ExpectEnd(const MsgpackReader& r) {
  if (!r.done()) Fail("trailing bytes after header");
}

// Fields past the ones known to this build, which a newer peer may add,
// in an array nested `depth` deep (the outermost is 1): within kLimits' depth.
void SkipRest(MsgpackReader& r, std::uint32_t fields, std::uint32_t known, int depth) {
  for (std::uint32_t k = known; k < fields; ++k) r.skip(static_cast<int>(kLimits.depth()) - depth);
}

SessionId ReadSession(MsgpackReader& r) {
  auto id = SessionIdFromRaw(r.bin("session id is not bin"));
  if (!id) Fail("session id is not 16 bytes");
  return *id;
}

// Headers into `headers`, or only checked when it is null; the list is
// nested `depth` deep.
void ReadHeaders(MsgpackReader& r, Headers* headers, int depth) {
  const std::uint32_t n = r.array(0, "headers is not an array");
  if (headers != nullptr) headers->reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) {
    const std::uint32_t fields = r.array(2, "header is not a [name, value] pair");
    const std::string_view name = r.str("header name is not str");
    const std::string_view value = r.str("header value is not str");
    SkipRest(r, fields, 2, depth + 1);
    if (headers != nullptr) headers->emplace_back(name, value);
  }
}

// A statement's six elements after its index (§2: method … idempotent),
// checked and seen where they lie; the headers go into `headers` unless it
// is null.
struct Fields {
  std::string_view method;
  std::string_view url;
  std::string_view body;
  std::uint32_t timeout_ms = 0;
  std::optional<bool> idempotent;
};
Fields ReadFields(MsgpackReader& r, Headers* headers) {
  Fields f;
  f.method = r.str("method");
  f.url = r.str("url");
  ReadHeaders(r, headers, 4);
  f.body = r.bin("body");
  if (f.body.size() > kMaxStatementBody) Fail("statement body over the limit");
  f.timeout_ms = r.uint<std::uint32_t>("timeout_ms");
  f.idempotent = r.boolean_or_nil("idempotent is not bool or nil");
  return f;
}

// The length of a SUBMIT's or DISPATCH's list of statements (§5).
std::uint32_t StatementCount(MsgpackReader& r) {
  const std::uint32_t n = r.array(0, "statements is not an array");
  if (n > kMaxBatch) Fail("too many statements in one message");
  return n;
}

// A reader over a HeldStatement's elements, which were checked when it was
// decoded or made.
MsgpackReader HeldReader(const HeldStatement& h) {
  return MsgpackReader(h.encoded.data(), h.encoded.size(), static_cast<std::uint32_t>(kLimits.array()),
                       static_cast<std::uint32_t>(kLimits.map()));
}
}  // namespace

std::string_view HeldStatement::method() const {
  MsgpackReader r = HeldReader(*this);
  return r.str("method");
}

std::string_view HeldStatement::url() const {
  MsgpackReader r = HeldReader(*this);
  r.str("method");
  return r.str("url");
}

bool HeldStatement::idempotent() const {
  MsgpackReader r = HeldReader(*this);
  const Fields f = ReadFields(r, nullptr);
  return f.idempotent.value_or(DefaultIdempotent(f.method));
}

Result<HeldStatements> DecodeSubmit(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    MsgpackReader r = HeaderReader(frames, 3);
    const std::uint32_t fields = r.array(2, "header is not [session, statements]");
    HeldStatements m{ReadSession(r), {}};
    m.statements.resize(StatementCount(r));
    for (HeldStatement& h : m.statements) {
      const std::uint32_t f = r.array(7, "statement is not a 7-array");
      h.index = r.uint<std::uint64_t>("index");
      const char* from = r.position();
      ReadFields(r, nullptr);
      h.encoded.assign(from, r.position());
      SkipRest(r, f, 7, 3);  // an 8th element is DISPATCH's (§3.8.8), not kept from a SUBMIT
    }
    SkipRest(r, fields, 2, 1);
    ExpectEnd(r);
    return m;
  });
}

Result<Statements> DecodeStatements(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    MsgpackReader r = HeaderReader(frames, 3);
    const std::uint32_t fields = r.array(2, "header is not [session, statements]");
    Statements m{ReadSession(r), {}, 0};
    // DISPATCH carries the broker's order seq (§3.7); SUBMIT does not.
    const bool dispatch = frames[1].size() == 1 && *static_cast<const std::uint8_t*>(frames[1].data()) ==
                                                       static_cast<std::uint8_t>(Command::kDispatch);
    if (dispatch && fields < 3) Fail("DISPATCH header is not [session, statements, seq]");
    m.statements.resize(StatementCount(r));
    for (WireStatement& ws : m.statements) {
      const std::uint32_t f = r.array(7, "statement is not a 7-array");
      ws.index = r.uint<std::uint64_t>("index");
      const Fields fields_read = ReadFields(r, &ws.statement.headers);
      ws.statement.method = fields_read.method;
      ws.statement.url = fields_read.url;
      ws.statement.body = fields_read.body;
      ws.statement.timeout_ms = fields_read.timeout_ms;
      ws.statement.idempotent = fields_read.idempotent;
      if (f > 7 && !r.nil()) AsRateWait(r.object(kLimits).get(), ws.rate_wait_us, ws.throttled, &ws.attempts);
      SkipRest(r, f, 8, 3);
    }
    if (dispatch) m.seq = r.uint<std::uint64_t>("seq");
    SkipRest(r, fields, dispatch ? 3 : 2, 1);
    ExpectEnd(r);
    return m;
  });
}

namespace {
// Shared by the full and the index-only RESULTS decoders: frame 2 is
// [session, seq], frame 3 the list of results (§3.4.2). Returns a reader at
// the first result and the count of results.
std::pair<MsgpackReader, std::uint32_t> ResultsList(std::span<const zmq::message_t> frames, SessionId& session,
                                                    std::uint64_t& seq) {
  MsgpackReader head = HeaderReader(frames, 4 + kMaxBatch);
  const std::uint32_t fields = head.array(2, "header is not [session, seq]");
  session = ReadSession(head);
  seq = head.uint<std::uint64_t>("seq");
  SkipRest(head, fields, 2, 1);
  ExpectEnd(head);
  if (frames.size() < 4) Fail("missing results frame");
  MsgpackReader list = FrameReader(frames[3]);
  const std::uint32_t n = list.array(0, "results is not an array");
  if (n > kMaxBatch) Fail("too many results in one message");
  // §3.4.2: exactly one body frame per result, in order.
  if (frames.size() != 4 + static_cast<std::size_t>(n)) Fail("body frame count does not match results");
  return {list, n};
}

// One result's fields but its body, read in place; headers into `headers`, or
// only checked when it is null.
struct ResultFields {
  std::uint64_t index = 0;
  std::uint16_t status = 0;
  std::uint8_t code = 0;
  std::string_view message;
  std::uint32_t attempts = 0;
  std::uint64_t elapsed_us = 0;
  std::string_view worker;
  std::optional<RateReport> rate;
  std::uint64_t rate_wait_us = 0;
  std::uint32_t throttled = 0;
};

ResultFields ReadResult(MsgpackReader& r, Headers* headers) {
  ResultFields f;
  const std::uint32_t fields = r.array(8, "result is not an 8-array");
  f.index = r.uint<std::uint64_t>("index");
  f.status = r.uint<std::uint16_t>("status");
  ReadHeaders(r, headers, 3);
  f.code = r.uint<std::uint8_t>("error code");
  f.message = r.str("error message");
  f.attempts = r.uint<std::uint32_t>("attempts");
  f.elapsed_us = r.uint<std::uint64_t>("elapsed_us");
  f.worker = r.str("worker");
  if (fields > 8 && !r.nil()) f.rate = AsRateReport(r.object(kLimits).get());
  if (fields > 9 && !r.nil()) AsRateWait(r.object(kLimits).get(), f.rate_wait_us, f.throttled);
  SkipRest(r, fields, 10, 2);
  return f;
}
}  // namespace

Result<Results> DecodeResults(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    Results m;
    auto [r, n] = ResultsList(frames, m.session, m.seq);
    m.results.resize(n);
    for (std::uint32_t i = 0; i < n; ++i) {
      WireResult& wr = m.results[i];
      Response& response = wr.response;
      ResultFields f = ReadResult(r, &response.headers);
      wr.index = f.index;
      response.status = f.status;
      const auto code = StatusCodeFromWire(f.code);
      if (code != StatusCode::kOk) response.error = ResponseError{code, std::string(f.message)};
      response.attempts = f.attempts;
      response.elapsed_us = f.elapsed_us;
      response.worker = f.worker;
      wr.rate = std::move(f.rate);
      response.rate_wait_us = f.rate_wait_us;
      response.throttled = f.throttled;
      const auto& data = frames[4 + i];
      response.body.assign(static_cast<const char*>(data.data()), data.size());
    }
    ExpectEnd(r);
    return m;
  });
}

Result<ResultsIndex> DecodeResultsIndex(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    ResultsIndex m;
    auto [r, n] = ResultsList(frames, m.session, m.seq);
    m.indices.resize(n);
    for (std::uint32_t i = 0; i < n; ++i) {
      // Every field is checked, nothing copied: a RESULTS the broker forwards
      // must be one its client can decode (§4.3).
      ResultFields f = ReadResult(r, nullptr);
      m.indices[i] = f.index;
      if (f.code != 0) ++m.failed;
      if (f.attempts > 1) m.retries += f.attempts - 1;
      if (f.rate) m.rates.emplace_back(i, std::move(*f.rate));
    }
    ExpectEnd(r);
    return m;
  });
}

std::optional<SessionId> PeekSession(std::span<const zmq::message_t> frames) {
  if (frames.size() < 3) return std::nullopt;
  auto session = Guard([&] {
    auto h = Unpack(frames[2]);
    const auto& a = AsArray(h.get(), 1, "no session");
    return AsSession(a.ptr[0]);
  });
  if (!session) return std::nullopt;
  return *session;
}

Result<Session> DecodeSession(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [session, settings, seq]");
    return Session{AsSession(a.ptr[0]), AsSettings(a.ptr[1]), AsUint<std::uint64_t>(a.ptr[2], "seq")};
  });
}

Result<Opened> DecodeOpened(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [session, heartbeat_ms, session_ttl_ms]");
    Opened m{AsSession(a.ptr[0]), AsUint<std::uint32_t>(a.ptr[1], "heartbeat_ms"),
             AsUint<std::uint32_t>(a.ptr[2], "session_ttl_ms")};
    if (m.heartbeat_ms == 0 || m.session_ttl_ms == 0) Fail("heartbeat_ms and session_ttl_ms must be positive");
    return m;
  });
}

Result<EndSession> DecodeEndSession(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 2, "header is not [session, seq]");
    return EndSession{AsSession(a.ptr[0]), AsUint<std::uint64_t>(a.ptr[1], "seq")};
  });
}

Result<Ready> DecodeReady(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [worker_id, host, slots, pid]");
    Ready r{std::string(AsStr(a.ptr[0], "worker_id")), std::string(AsStr(a.ptr[1], "host")),
            AsUint<std::uint32_t>(a.ptr[2], "slots"), 0};
    if (r.slots == 0) Fail("slots must be positive");
    // §3.4: pid was appended; a 3-element READY (an older worker) is valid.
    if (a.size >= 4) r.pid = AsUint<std::uint32_t>(a.ptr[3], "pid");
    return r;
  });
}

Result<StatusReport> DecodeStatusReport(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 12, "header is not a 12-element status");
    StatusReport r;
    r.version = AsStr(a.ptr[0], "version");
    std::uint64_t* fields[] = {&r.uptime_ms, &r.sessions, &r.workers, &r.queued, &r.in_flight, &r.done,
                               &r.failed, &r.retried, &r.redispatched, &r.rate_10s_milli, &r.rate_1m_milli};
    for (std::size_t i = 0; i < std::size(fields); ++i) *fields[i] = AsUint<std::uint64_t>(a.ptr[1 + i], "status field");
    // §3.9.7: the rate keys were appended; a 12-element STATUS_REPORT (an
    // older broker) or a nil 13th lists none.
    if (a.size >= 13 && a.ptr[12].type != msgpack::type::NIL) {
      const auto& list = AsArray(a.ptr[12], 0, "rate keys is not an array");
      r.rate_keys.resize(list.size);
      for (std::uint32_t i = 0; i < list.size; ++i) {
        const auto& k = AsArray(list.ptr[i], 5, "rate key row is not a 5-array");
        RateKeyRow& row = r.rate_keys[i];
        row.key = AsStr(k.ptr[0], "rate key");
        row.windows = AsWindows(k.ptr[1], true);
        row.used = AsUint<std::uint64_t>(k.ptr[2], "rate key used");
        row.throttled = AsUint<std::uint64_t>(k.ptr[3], "rate key throttled");
        row.paused_ms = AsUint<std::uint64_t>(k.ptr[4], "rate key paused_ms");
      }
    }
    return r;
  });
}

Result<std::vector<WorkerRow>> DecodeWorkersReport(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& list = AsArray(h.get(), 0, "header is not a list of workers");
    std::vector<WorkerRow> rows(list.size);
    for (std::uint32_t i = 0; i < list.size; ++i) {
      const auto& a = AsArray(list.ptr[i], 9, "worker row is not a 9-array");
      WorkerRow& w = rows[i];
      w.worker_id = AsStr(a.ptr[0], "worker_id");
      w.host = AsStr(a.ptr[1], "host");
      w.pid = AsUint<std::uint32_t>(a.ptr[2], "pid");
      w.slots = AsUint<std::uint32_t>(a.ptr[3], "slots");
      w.in_flight = AsUint<std::uint64_t>(a.ptr[4], "in_flight");
      w.done = AsUint<std::uint64_t>(a.ptr[5], "done");
      w.failed = AsUint<std::uint64_t>(a.ptr[6], "failed");
      w.heartbeat_age_ms = AsUint<std::uint64_t>(a.ptr[7], "heartbeat_age_ms");
      w.state = AsStr(a.ptr[8], "state");
    }
    return rows;
  });
}

Result<std::vector<SessionRow>> DecodeSessionsReport(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& list = AsArray(h.get(), 0, "header is not a list of sessions");
    std::vector<SessionRow> rows(list.size);
    for (std::uint32_t i = 0; i < list.size; ++i) {
      const auto& a = AsArray(list.ptr[i], 9, "session row is not a 9-array");
      SessionRow& s = rows[i];
      s.session = AsSession(a.ptr[0]);
      s.client_host = AsStr(a.ptr[1], "client_host");
      s.window = AsUint<std::uint32_t>(a.ptr[2], "window");
      s.queued = AsUint<std::uint64_t>(a.ptr[3], "queued");
      s.in_flight = AsUint<std::uint64_t>(a.ptr[4], "in_flight");
      s.done = AsUint<std::uint64_t>(a.ptr[5], "done");
      s.failed = AsUint<std::uint64_t>(a.ptr[6], "failed");
      s.age_ms = AsUint<std::uint64_t>(a.ptr[7], "age_ms");
      s.rate_milli = AsUint<std::uint64_t>(a.ptr[8], "rate_milli");
    }
    return rows;
  });
}

Result<WorkerName> DecodeWorkerName(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 1, "header is not [worker_id]");
    WorkerName m{std::string(AsStr(a.ptr[0], "worker_id"))};
    if (m.worker_id.empty()) Fail("worker_id is empty");
    return m;
  });
}

Result<Done> DecodeDone(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 1, "header is not [message]");
    return Done{std::string(AsStr(a.ptr[0], "message"))};
  });
}

Result<ErrorReply> DecodeError(std::span<const zmq::message_t> frames) {
  return Guard([&] {
    auto h = Header(frames, 3);
    const auto& a = AsArray(h.get(), 3, "header is not [code, message, session]");
    ErrorReply e;
    e.code = StatusCodeFromWire(AsUint<std::uint8_t>(a.ptr[0], "code"));
    e.message = AsStr(a.ptr[1], "message");
    if (a.ptr[2].type != msgpack::type::NIL) e.session = AsSession(a.ptr[2]);
    return e;
  });
}

}  // namespace gatherer::protocol
