#pragma once
// The Gatherer wire protocol (common/PROTOCOL.md is normative; clause numbers
// below refer to it): ZeroMQ multipart messages
//
//   [signature "GTR" + version] [command byte] [msgpack header] [body]...
//
// Encoders build the frames after the ROUTER identity; decoders take the
// frames after it. Decoders never throw and never trust the peer: any
// malformation yields a Status (clause 2.4), which the caller counts, logs
// and drops.
//
// Thread-safety: free functions over values; safe from any thread.

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <zmq.hpp>

#include "gatherer/config.h"
#include "gatherer/ids.h"
#include "gatherer/rate_limit.h"
#include "gatherer/statement.h"
#include "gatherer/status.h"

namespace gatherer::protocol {

inline constexpr std::uint8_t kVersion = 2;
inline constexpr std::array<std::uint8_t, 4> kSignature = {'G', 'T', 'R', kVersion};

// Limits (PROTOCOL.md §5). A header frame bigger than this is malformed.
inline constexpr std::size_t kMaxHeaderBytes = 64ull << 20;
// Whole message cap, set as ZMQ_MAXMSGSIZE on every socket.
inline constexpr std::int64_t kMaxMessageBytes = 256ll << 20;
// Statements or results in one SUBMIT / DISPATCH / RESULTS message.
inline constexpr std::size_t kMaxBatch = 65536;

enum class Command : std::uint8_t {
  // client -> broker
  kOpen = 0x10,
  kSubmit = 0x11,
  kCancel = 0x12,
  kClose = 0x13,
  kHeartbeat = 0x14,  // any peer -> broker, and broker -> any peer
  kAck = 0x15,        // client -> broker: RESULTS received (§3.6); broker -> worker (0x15 too)
  kSync = 0x16,       // client -> broker: resynchronise after a reconnect or a gap (§3.6)
  // broker -> client
  kOpened = 0x20,
  kResults = 0x21,  // also worker -> broker (forwarded unchanged)
  kClosed = 0x22,
  kError = 0x23,
  kSynced = 0x24,  // answers SYNC: what the broker never received (§3.6)
  // worker -> broker
  kReady = 0x30,
  kDraining = 0x31,    // takes no more statements (graceful drain, §3.4.7)
  kDisconnect = 0x32,  // leaves; held statements go back to the broker
  kHolding = 0x33,     // what the worker holds, to resynchronise (§3.7)

  // broker -> worker
  kSession = 0x40,
  kDispatch = 0x41,
  kEndSession = 0x42,
  kDrain = 0x5C,  // broker -> worker: drain as on SIGTERM (asked by gatherer-ctl, §3.9)

  // control (gatherer-ctl <-> broker, §3.9)
  kStatus = 0x50,
  kListWorkers = 0x51,
  kListSessions = 0x52,
  kCancelSession = 0x53,
  kDrainWorker = 0x54,
  kShutdown = 0x55,
  kStatusReport = 0x58,
  kWorkersReport = 0x59,
  kSessionsReport = 0x5A,
  kDone = 0x5B,
};

const char* CommandName(Command command);

// One statement on the wire: `index` is its position in the session's
// sequence of submitted statements (PROTOCOL.md §3.2).
struct WireStatement {
  std::uint64_t index = 0;
  Statement statement;
  // DISPATCH of a rate-limited statement (§3.8.8): how long it waited for
  // its keys and its 429s so far, echoed in its result.
  std::uint64_t rate_wait_us = 0;
  std::uint32_t throttled = 0;
  // Attempts made under earlier DISPATCHes, of a statement whose retryable
  // failures went back to the broker (§3.8.6).
  std::uint32_t attempts = 0;
};

// A statement as the broker holds it from SUBMIT to its result (§3.2, §3.5):
// its index, its other six elements (method … idempotent) exactly as the
// client encoded them, which DISPATCH forwards without decoding or encoding
// them again, and what the broker adds on the way (§3.8.8). Elements past
// the seventh are not kept (§2.5). `method`, `url` and `idempotent` read
// `encoded` in place, for rate keys, re-runs and log lines.
struct HeldStatement {
  std::uint64_t index = 0;
  std::string encoded;
  std::uint64_t rate_wait_us = 0;  // as in WireStatement
  std::uint32_t throttled = 0;
  std::uint32_t attempts = 0;

  std::string_view method() const;
  std::string_view url() const;
  // The statement's own flag, or its method's default (IsIdempotent).
  bool idempotent() const;
};
// The held form of a statement (what the broker keeps of one SUBMITted).
HeldStatement Hold(std::uint64_t index, const Statement& statement);

// One outcome on the wire; the body travels in its own frame (§3.4).
struct WireResult {
  std::uint64_t index = 0;
  Response response;
  // What the response said about rate limits, for a rate-aware session
  // (§3.8); travels as the result's optional 9th element.
  std::optional<RateReport> rate;
};

struct Open {
  SessionId session;
  SessionSettings settings;
  // Statements the client may keep queued at the broker beyond the window.
  std::uint32_t prefetch = 0;
};
// SUBMIT (client -> broker) and DISPATCH (broker -> worker) share a layout.
struct Statements {
  SessionId session;
  std::vector<WireStatement> statements;
  // DISPATCH only: the broker's order sequence number for this worker (§3.7).
  std::uint64_t seq = 0;
};
// SUBMIT as the broker reads it: every field checked, the statements held
// (HeldStatement), none decoded into strings.
struct HeldStatements {
  SessionId session;
  std::vector<HeldStatement> statements;
};
// RESULTS: frame 2 is [session, seq], frame 3 the results, then one body
// frame per result (§3.4.2). `seq` numbers the sender's RESULTS messages on
// this hop: a worker's to the broker, or the broker's to a session's client.
struct Results {
  SessionId session;
  std::uint64_t seq = 0;
  std::vector<WireResult> results;
};
// CANCEL, CLOSE, OPENED, CLOSED, END_SESSION, CANCEL_SESSION carry only a session id.
struct SessionRef {
  SessionId session;
};
// OPENED: the broker's heartbeat period and session TTL, so a client
// heartbeats often enough for its session to live (§3.3.1).
struct Opened {
  SessionId session;
  std::uint32_t heartbeat_ms = 0;
  std::uint32_t session_ttl_ms = 0;
};
struct Session {
  SessionId session;
  SessionSettings settings;
  std::uint64_t seq = 0;  // order sequence number (§3.7)
};
// END_SESSION (broker -> worker).
struct EndSession {
  SessionId session;
  std::uint64_t seq = 0;  // order sequence number (§3.7)
};
// A client's HEARTBEAT names its session; the broker's answer names the
// session, the last RESULTS seq it sent for it, one past the highest index
// it received (§3.2.7, §3.6) and how many workers it has. The broker's HEARTBEAT to a worker
// carries the last order seq sent to it (§3.7).
struct ClientBeat {
  SessionId session;
};
struct BrokerBeat {
  std::optional<SessionId> session;  // set when answering a client
  std::uint64_t seq = 0;
  std::uint64_t next_index = 0;
  // Registered workers, in the answer to a client: 0 tells it why nothing
  // is being answered (§3.2.7).
  std::uint32_t workers = 0;
};
// ACK: the receiver has every RESULTS message up to `seq` (cumulative).
// Client -> broker names the session; broker -> worker does not.
struct Ack {
  std::optional<SessionId> session;
  std::uint64_t seq = 0;
};
// Consecutive statement indices [first, first + count).
struct IndexRange {
  std::uint64_t first = 0;
  std::uint32_t count = 0;
  bool operator==(const IndexRange&) const = default;
};
// Adds `index` to `ranges`, extending the last range when it follows it
// (and the range is below the per-range limit of kMaxBatch).
void AppendIndex(std::vector<IndexRange>& ranges, std::uint64_t index);
// SYNC (client -> broker): what the client has received (`ack`, as in ACK)
// and the statements it submitted and has not been answered (§3.6).
struct Sync {
  SessionId session;
  std::uint64_t ack = 0;
  std::vector<IndexRange> unanswered;
};
// SYNCED (broker -> client): the unanswered statements the broker never
// received, which the client submits again, and the seq of the last RESULTS
// the broker sent: every one it still keeps came again before SYNCED, so
// the client has all it will ever get up to there (§3.6.4).
struct Synced {
  SessionId session;
  std::vector<IndexRange> missing;
  std::uint64_t seq = 0;
};
// HOLDING (worker -> broker): the last order seq the worker received and,
// per session it holds, the statements in its hands (§3.7).
struct Holding {
  std::uint64_t seq = 0;
  std::vector<std::pair<SessionId, std::vector<std::uint64_t>>> sessions;
};
struct Ready {
  std::string worker_id;
  std::string host;
  // Statements this worker will take at once (its credit when idle).
  std::uint32_t slots = 0;
  // Process id on `host`, for operators (§3.4); 0 = not told (a 3-element READY).
  std::uint32_t pid = 0;
};

// ---- Control (§3.9): gatherer-ctl asks, the broker answers ----
// Rates are in statements per second times 1,000 (msgpack carries unsigned
// integers only, §2.6).
// One rate key (§3.8.2) as STATUS_REPORT lists it (§3.9.7).
struct RateKeyRow {
  std::string key;
  RateWindows windows;  // may be empty: a learned key before it learned any
  std::uint64_t used = 0;       // requests granted
  std::uint64_t throttled = 0;  // 429s seen
  std::uint64_t paused_ms = 0;  // pause left; 0 when not paused
  bool operator==(const RateKeyRow&) const = default;
};
// At most this many rate keys in a STATUS_REPORT: the busiest (§3.9.7).
inline constexpr std::size_t kMaxStatusRateKeys = 100;
struct StatusReport {
  std::string version;
  std::uint64_t uptime_ms = 0;
  std::uint64_t sessions = 0;
  std::uint64_t workers = 0;
  std::uint64_t queued = 0;
  std::uint64_t in_flight = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  std::uint64_t retried = 0;
  std::uint64_t redispatched = 0;
  std::uint64_t rate_10s_milli = 0;
  std::uint64_t rate_1m_milli = 0;
  // The 13th element (§3.9.7); empty from an older broker or one with no
  // rate keys.
  std::vector<RateKeyRow> rate_keys;
  bool operator==(const StatusReport&) const = default;
};
struct WorkerRow {
  std::string worker_id;
  std::string host;
  std::uint32_t pid = 0;
  std::uint32_t slots = 0;
  std::uint64_t in_flight = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  std::uint64_t heartbeat_age_ms = 0;
  std::string state;  // busy, idle, draining, unresponsive
  bool operator==(const WorkerRow&) const = default;
};
struct SessionRow {
  SessionId session;
  std::string client_host;
  std::uint32_t window = 0;
  std::uint64_t queued = 0;
  std::uint64_t in_flight = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  std::uint64_t age_ms = 0;
  std::uint64_t rate_milli = 0;  // over the last 10 s
  bool operator==(const SessionRow&) const = default;
};
// DRAIN_WORKER names a worker by its worker_id (READY); DONE confirms an
// action in words.
struct WorkerName {
  std::string worker_id;
};
struct Done {
  std::string message;
};
struct ErrorReply {
  StatusCode code = StatusCode::kInternal;
  std::string message;
  std::optional<SessionId> session;
};

using Frames = std::vector<zmq::message_t>;

// Checks signature and version (§2.1, §2.2) and returns the command.
// InvalidArgument for a bad signature/unknown command, FailedPrecondition for
// a wrong version (the sender should be told).
Result<Command> PeekCommand(std::span<const zmq::message_t> frames);

Frames Encode(Command command, const SessionRef& m);
Frames Encode(const Open& m);
// kSubmit or kDispatch (with seq), from decoded statements: what a peer playing
// client or broker in tests sends; the broker itself forwards HeldStatements.
Frames Encode(Command command, const Statements& m);
// SUBMIT of consecutive statements numbered from first_index, encoded
// straight from the caller's statements (no copy into WireStatement).
Frames EncodeSubmit(const SessionId& session, std::uint64_t first_index, std::span<const Statement> statements);
// DISPATCH of held statements: each one's elements copied as they came.
Frames EncodeDispatch(const SessionId& session, std::span<const HeldStatement> statements, std::uint64_t seq);
// Moves the bodies into their own frames without copying them.
Frames Encode(Results&& m);
// Replaces frame 2 of an encoded or received RESULTS with [session, seq]:
// how the broker numbers what it forwards without touching the results.
void RestampResults(Frames& frames, const SessionId& session, std::uint64_t seq);
Frames Encode(const Opened& m);
Frames Encode(const Session& m);
Frames Encode(const EndSession& m);
Frames Encode(const Ready& m);
Frames Encode(const ErrorReply& m);
Frames Encode(const Ack& m);
Frames Encode(const Sync& m);
Frames Encode(const Synced& m);
Frames Encode(const Holding& m);
// A worker's plain HEARTBEAT [].
Frames EncodeHeartbeat();
Frames Encode(const StatusReport& m);
Frames Encode(const std::vector<WorkerRow>& m);
Frames Encode(const std::vector<SessionRow>& m);
Frames Encode(const WorkerName& m);  // DRAIN_WORKER
Frames Encode(const Done& m);
Frames Encode(const ClientBeat& m);
// Same as Encode(ClientBeat{session}).
Frames EncodeHeartbeat(const SessionId& session);
Frames Encode(const BrokerBeat& m);

// Each decoder expects frames whose command is the one named.
Result<SessionRef> DecodeSessionRef(std::span<const zmq::message_t> frames);
Result<Open> DecodeOpen(std::span<const zmq::message_t> frames);
Result<Statements> DecodeStatements(std::span<const zmq::message_t> frames);
Result<HeldStatements> DecodeSubmit(std::span<const zmq::message_t> frames);
Result<Results> DecodeResults(std::span<const zmq::message_t> frames);
Result<Session> DecodeSession(std::span<const zmq::message_t> frames);
Result<Opened> DecodeOpened(std::span<const zmq::message_t> frames);
Result<EndSession> DecodeEndSession(std::span<const zmq::message_t> frames);
Result<Ack> DecodeAck(std::span<const zmq::message_t> frames);
Result<Sync> DecodeSync(std::span<const zmq::message_t> frames);
Result<Synced> DecodeSynced(std::span<const zmq::message_t> frames);
Result<Holding> DecodeHolding(std::span<const zmq::message_t> frames);
Result<Ready> DecodeReady(std::span<const zmq::message_t> frames);
Result<ErrorReply> DecodeError(std::span<const zmq::message_t> frames);
Result<StatusReport> DecodeStatusReport(std::span<const zmq::message_t> frames);
Result<std::vector<WorkerRow>> DecodeWorkersReport(std::span<const zmq::message_t> frames);
Result<std::vector<SessionRow>> DecodeSessionsReport(std::span<const zmq::message_t> frames);
Result<WorkerName> DecodeWorkerName(std::span<const zmq::message_t> frames);
Result<Done> DecodeDone(std::span<const zmq::message_t> frames);
// A message whose header is an empty array: DRAINING, DISCONNECT, DRAIN,
// STATUS, WORKERS, SESSIONS, SHUTDOWN.
Frames EncodeEmpty(Command command);
Status DecodeEmpty(std::span<const zmq::message_t> frames);

// At the broker: a client's HEARTBEAT, or nullopt for a worker's plain one.
Result<std::optional<ClientBeat>> DecodeHeartbeat(std::span<const zmq::message_t> frames);
// At a client or worker: the broker's HEARTBEAT.
Result<BrokerBeat> DecodeBrokerHeartbeat(std::span<const zmq::message_t> frames);

// RESULTS without bodies or headers: what the broker needs to route and
// settle leases while forwarding the frames untouched (§4.3).
struct ResultsIndex {
  SessionId session;
  std::uint64_t seq = 0;
  std::vector<std::uint64_t> indices;
  // Rate reports (§3.8) by position in `indices`; empty (no allocation) when
  // no result carries one.
  std::vector<std::pair<std::uint32_t, RateReport>> rates;
  // Over all of them: results with an error, and attempts beyond the first
  // (for the broker's counters, §3.9).
  std::uint64_t failed = 0;
  std::uint64_t retries = 0;
};
// Checks every field of every result, copying none of them.
Result<ResultsIndex> DecodeResultsIndex(std::span<const zmq::message_t> frames);

// The session a message's header starts with, if it does: tells the broker
// which client to answer about a message it could not decode (§2.4).
std::optional<SessionId> PeekSession(std::span<const zmq::message_t> frames);

}  // namespace gatherer::protocol
