#include "gatherer/broker.h"

#include <algorithm>
#include <deque>
#include <iterator>
#include <mutex>
#include <set>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/wake_fd.h"
#include "rate_limiter.h"
#include "stats.h"

namespace gatherer {
namespace {

namespace proto = protocol;
using Clock = std::chrono::steady_clock;

struct Lease {
  // WorkerState::serial of the worker holding it: a number, not the routing
  // id, so that leasing a statement allocates nothing (a worker's routing id
  // is longer than a short string's inline buffer).
  std::uint64_t worker = 0;
  proto::WireStatement statement;
  std::uint64_t seq = 0;  // order seq of the DISPATCH that carried it (§3.7)
};

// A RESULTS message sent to a client and kept until the client acknowledges
// it (§3.6): the frames share their buffers with what was sent (ZeroMQ
// reference-counts message bodies), so keeping them costs no copy.
struct Retained {
  std::uint64_t seq = 0;
  std::vector<std::uint64_t> indices;
  proto::Frames frames;
};

// Owned by the loop thread.
struct SessionState {
  SessionId id;
  std::string client;  // routing id of the client that opened it
  std::string owner;   // CURVE: the public key that opened it (§1.7)
  SessionSettings settings;
  std::uint32_t prefetch = 0;
  std::deque<proto::WireStatement> pending;
  std::unordered_map<std::uint64_t, Lease> leases;
  // Statements that were leased to a worker that died, in groups waiting to
  // run in quarantine, oldest first (§4.5). While any wait, the session's
  // queued statements are not dispatched: the quarantined ones are its oldest.
  std::deque<std::vector<proto::WireStatement>> quarantine;
  // Deaths of workers that held the statement alone, by index (§4.5).
  std::unordered_map<std::uint64_t, std::uint32_t> solo_deaths;
  // Workers that were sent SESSION for it (they get END_SESSION on close).
  std::unordered_set<std::string> workers;
  // RESULTS sent to the client and not yet acknowledged, oldest first, and
  // the seq of the last one sent (§3.6). Bounded by window + prefetch: the
  // client submits more only as it receives results, and acknowledges them.
  std::deque<Retained> retained;
  std::uint64_t results_seq = 0;
  // The client has every RESULTS up to `ack` (§3.6.2).
  void forget_acknowledged(std::uint64_t ack) {
    while (!retained.empty() && retained.front().seq <= ack) retained.pop_front();
  }
  // One past the highest index submitted (§3.6: tells a client whether a
  // SUBMIT of its was lost).
  std::uint64_t next_index = 0;
  Clock::time_point last_seen;  // last message from its client
  bool in_ready = false;  // in Impl::ready_ (round-robin of dispatchable sessions)
  // Rate limits (§3.8); null for a session without any, which routes as
  // if they did not exist.
  std::unique_ptr<broker::SessionRate> rate;
  bool rate_waiting = false;  // in Impl::rate_waiting
  broker_ops::SessionFigures figures;  // for operators (§3.9)
};

// Owned by the loop thread.
struct WorkerState {
  std::string routing_id;
  std::uint64_t serial = 0;  // unique per registration, never reused (Lease::worker)
  std::string worker_id;
  std::string host;
  std::uint32_t slots = 0;
  std::uint32_t leased = 0;
  Clock::time_point last_seen;
  // Sessions sent to it, with the order seq of their SESSION message (§3.7).
  std::unordered_map<SessionId, std::uint64_t> sessions;
  // Order seq of the last SESSION, DISPATCH or END_SESSION sent (§3.7).
  std::uint64_t order_seq = 0;
  // Highest seq of its RESULTS up to which none is missing (§3.7).
  std::uint64_t results_seq = 0;
  std::set<std::uint64_t> ahead;  // RESULTS seqs taken past a gap, until it fills
  bool ack_due = false;     // results_seq advanced: ACK it this pass
  bool reachable = true;    // the last send reached its connection
  bool draining = false;  // sent DRAINING: leases nothing more (§3.4.7)
  bool reserved = false;  // set aside to run quarantine groups (§4.5)
  bool isolated = false;  // runs a quarantine group and nothing else
  broker_ops::WorkerFigures figures;  // for operators (§3.9)
  // Free slots for ordinary dispatch.
  std::uint32_t credit() const {
    return draining || reserved || !reachable || leased >= slots ? 0 : slots - leased;
  }
};

// Why a worker is removed, which decides what happens to its leases (§4.5).
enum class Departure {
  kDied,  // presumed dead: its leases go to quarantine
  kLeft,  // drained or registered again: its leases are queued again
};

// Moves the back half of `group` out (the front half stays, order kept):
// how quarantine groups are split (§4.5).
std::vector<proto::WireStatement> TakeBackHalf(std::vector<proto::WireStatement>& group) {
  const auto mid = group.begin() + static_cast<std::ptrdiff_t>(group.size() / 2);
  std::vector<proto::WireStatement> back(std::make_move_iterator(mid), std::make_move_iterator(group.end()));
  group.erase(mid, group.end());
  return back;
}

proto::WireResult Failure(std::uint64_t index, StatusCode code, std::string message, const std::string& worker) {
  proto::WireResult r;
  r.index = index;
  r.response.error = ResponseError{code, std::move(message)};
  r.response.worker = worker;
  return r;
}

}  // namespace

struct Broker::Impl {
  BrokerOptions options;
  std::unique_ptr<zmq::context_t> own_context;
  zmq::context_t* context = nullptr;
  std::unique_ptr<zmq::socket_t> router;
  std::unique_ptr<ZapHandler> zap;  // CURVE only; destroyed before the context
  std::vector<std::string> bound;
  std::unique_ptr<WakeFd> wake;
  std::atomic<bool> stopping{false};
  std::atomic<bool> drain_requested{false};
  std::thread thread;
  BrokerStats stats;
  RateLimitedLog bad_frame_log;

  // ---- loop-thread state ----
  // Rate keys shared by every session (§3.8); declared before the sessions,
  // whose rate state releases its keys when they go.
  broker::RateLimiter limiter;
  std::unordered_map<SessionId, SessionState> sessions;
  std::unordered_map<std::string, WorkerState> workers;
  std::deque<SessionId> ready;  // sessions with pending work and window room
  // Sessions with quarantine groups, served in turn (may hold stale ids).
  std::deque<SessionId> quarantined;
  std::size_t quarantine_groups = 0;
  std::string quarantine_worker;  // routing id of the reserved worker, if any
  // Sums of every session's pending.size() and leases.size().
  std::uint64_t total_pending = 0;
  std::uint64_t total_leased = 0;
  Clock::time_point next_heartbeat;
  std::vector<std::string> acks_due;  // workers owed an ACK this pass
  broker_ops::BrokerFigures figures;  // for operators (§3.9)
  // Per-worker, per-session and per-rate-key metrics, rendered by the loop
  // once per heartbeat when options.metrics is set, read by the metrics
  // thread.
  mutable std::mutex metrics_mutex;
  std::string metrics_snapshot;
  // CURVE: the public key of the message being handled (empty without).
  std::string_view peer_key;
  std::uint64_t worker_serials = 0;   // the last WorkerState::serial given
  // Sessions waiting for a rate key to allow their next statement (§3.8),
  // and the earliest of their wake times.
  std::vector<std::pair<Clock::time_point, SessionId>> rate_waiting;
  Clock::time_point rate_wake = broker::kNever;

  explicit Impl(BrokerOptions o) : options(std::move(o)) {}
  spdlog::logger& log() const { return options.logger ? *options.logger : Logger(); }

  void run();
  void handle(std::vector<zmq::message_t>& frames);
  void on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_results(const std::string& peer, std::span<zmq::message_t> body);
  void on_holding(const std::string& peer, std::span<zmq::message_t> body);
  void on_sync(const std::string& peer, std::span<zmq::message_t> body);
  void deliver(SessionState& s, proto::Frames&& frames, std::vector<std::uint64_t>&& indices);
  void deliver_failures(SessionState& s, proto::Results&& results);
  void requeue_front(SessionState& s, std::vector<proto::WireStatement>&& statements);
  void send_acks();
  bool curve() const { return !options.curve_key.secret_key.empty(); }
  bool may_touch(const std::string& peer, const SessionState& s);
  bool send_order(WorkerState& w, proto::Frames&& frames);
  void dispatch();
  void dispatch_quarantine();
  bool ensure_session(SessionState& s, WorkerState& w);
  bool send_dispatch(SessionState& s, WorkerState& w, proto::Statements& chunk);
  void release_quarantine_worker();
  void end_session(SessionState& s);
  void remove_worker(const std::string& routing_id, Departure how, const char* why);
  void heartbeat();
  void mark_ready(SessionState& s);
  void open_rate(SessionState& s);
  std::size_t take_limited(SessionState& s, std::size_t n, std::vector<proto::WireStatement>& out);
  void wake_at(SessionState& s, Clock::time_point wake);
  void wake_rate_waiting();
  void update_gauges();
  bool send(const std::string& peer, proto::Frames&& frames);
  void send_error(const std::string& peer, StatusCode code, std::string message,
                  std::optional<SessionId> session);
  void malformed(const std::string& peer, const Status& status, std::span<const zmq::message_t> body = {});
  // Operations (control.cc, PROTOCOL.md §3.9).
  void answered(SessionState& s, WorkerState* w, std::uint64_t n, std::uint64_t failed, std::uint64_t retries);
  void on_control(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void publish_metrics();
};

bool Broker::Impl::send(const std::string& peer, proto::Frames&& frames) {
  // Gauges are published before every message, so a peer that got a reply
  // (CLOSED, say) reads stats at least as fresh as that reply.
  update_gauges();
  const auto result = proto::SendMessage(*router, peer, frames);
  if (result == proto::SendResult::kSent) return true;
  // A gone peer (ROUTER_MANDATORY) or a full queue: the message is dropped;
  // leases and heartbeats recover what it carried.
  log().debug("broker: cannot send to a peer ({})",
                 result == proto::SendResult::kUnreachable ? "unreachable" : "queue full or error");
  return false;
}

void Broker::Impl::send_error(const std::string& peer, StatusCode code, std::string message,
                              std::optional<SessionId> session) {
  send(peer, proto::Encode(proto::ErrorReply{code, std::move(message), session}));
}

// §2.4: counted, logged at most once a second, dropped; and a peer the
// broker knows — a registered worker, or a client whose message names a
// session — is told what was wrong, so it never waits on silence.
void Broker::Impl::malformed(const std::string& peer, const Status& status, std::span<const zmq::message_t> body) {
  stats.malformed.fetch_add(1, std::memory_order_relaxed);
  std::uint64_t suppressed = 0;
  if (bad_frame_log.allow(suppressed)) {
    log().warn("broker: dropped malformed message from peer of {} bytes id: {} ({} more suppressed)",
                  peer.size(), status.ToString(), suppressed);
  }
  if (body.empty()) return;
  auto command = proto::PeekCommand(body);
  const std::string what =
      std::string("malformed ") + (command ? proto::CommandName(*command) : "message") + ": " + status.message();
  if (workers.contains(peer)) return send_error(peer, StatusCode::kInvalidArgument, what, std::nullopt);
  if (auto session = proto::PeekSession(body)) send_error(peer, StatusCode::kInvalidArgument, what, *session);
}

void Broker::Impl::mark_ready(SessionState& s) {
  if (!s.in_ready && s.quarantine.empty() && !s.pending.empty() && s.leases.size() < s.settings.workers) {
    s.in_ready = true;
    ready.push_back(s.id);
  }
}

// §3.8: a session gets rate state when it declares limits or learns them
// (the broker's default rules stand in for undeclared ones); workers see
// the rules in its settings and hand 429s back instead of retrying them.
void Broker::Impl::open_rate(SessionState& s) {
  if (s.settings.rate_limits.empty() && !options.rate_limits.empty()) s.settings.rate_limits = options.rate_limits;
  if (s.rate || !s.settings.rate_aware()) return;
  s.rate = std::make_unique<broker::SessionRate>(s.settings, options.rate_limits);
  broker::SessionRate::Bind(*s.rate, limiter);
}

// Takes what the session's keys allow now; when something is left waiting
// on a key, the session sleeps until that key allows it.
std::size_t Broker::Impl::take_limited(SessionState& s, std::size_t n, std::vector<proto::WireStatement>& out) {
  const std::size_t before = out.size();
  wake_at(s, s.rate->take(s.pending, n, Clock::now(), out));
  return out.size() - before;
}

// The session is looked at again at `wake` (kNever: not at all).
void Broker::Impl::wake_at(SessionState& s, Clock::time_point wake) {
  if (wake != broker::kNever) {
    if (!s.rate_waiting) {
      s.rate_waiting = true;
      rate_waiting.emplace_back(wake, s.id);
    } else {
      for (auto& entry : rate_waiting) {
        if (entry.second == s.id) entry.first = std::min(entry.first, wake);
      }
    }
    rate_wake = std::min(rate_wake, wake);
  }
}

void Broker::Impl::wake_rate_waiting() {
  if (rate_waiting.empty()) return;
  const auto now = Clock::now();
  if (now < rate_wake) return;
  rate_wake = broker::kNever;
  std::erase_if(rate_waiting, [&](const auto& entry) {
    auto it = sessions.find(entry.second);
    if (it == sessions.end()) return true;
    if (entry.first > now) {
      rate_wake = std::min(rate_wake, entry.first);
      return false;
    }
    it->second.rate_waiting = false;
    mark_ready(it->second);
    return true;
  });
}

// O(1): the totals are kept up to date where statements move, so the loop
// can publish them on every pass.
void Broker::Impl::update_gauges() {
  stats.queued.store(total_pending, std::memory_order_relaxed);
  stats.in_flight.store(total_leased, std::memory_order_relaxed);
  stats.sessions.store(sessions.size(), std::memory_order_relaxed);
  stats.workers.store(workers.size(), std::memory_order_relaxed);
}

// Credit-based, round-robin across sessions (PROTOCOL.md §4.2): each pass
// gives the next ready session one chunk, sized by its free window and the
// credit of the worker with the most free slots.
void Broker::Impl::dispatch() {
  while (!ready.empty()) {
    WorkerState* best = nullptr;
    for (auto& [id, w] : workers) {
      if (w.credit() > 0 && (!best || w.credit() > best->credit())) best = &w;
    }
    if (!best) return;
    const SessionId sid = ready.front();
    ready.pop_front();
    auto it = sessions.find(sid);
    if (it == sessions.end()) continue;
    SessionState& s = it->second;
    s.in_ready = false;
    if (!s.quarantine.empty()) continue;  // marked ready again once it is empty
    const std::size_t window_room = s.settings.workers > s.leases.size() ? s.settings.workers - s.leases.size() : 0;
    // Spread a big window across workers instead of filling the first one.
    std::size_t fair_share = std::max<std::size_t>(1, (window_room + workers.size() - 1) / workers.size());
    const std::size_t n = std::min({window_room, fair_share, static_cast<std::size_t>(best->credit()),
                                    static_cast<std::size_t>(options.max_chunk), s.pending.size()});
    if (n == 0) continue;
    if (!ensure_session(s, *best)) {
      mark_ready(s);
      continue;  // unreachable: it has no credit now, another worker is tried
    }
    proto::Statements chunk{sid, {}, 0};
    chunk.statements.reserve(n);
    std::size_t popped = 0;
    if (s.rate) {
      // §3.8: only what every key allows now, from anywhere in the queue.
      popped = take_limited(s, n, chunk.statements);
      std::erase_if(chunk.statements, [&](const proto::WireStatement& ws) {
        return !s.leases.try_emplace(ws.index, Lease{best->serial, {}}).second;
      });
    }
    while (!s.rate && chunk.statements.size() < n && !s.pending.empty()) {
      proto::WireStatement ws = std::move(s.pending.front());
      s.pending.pop_front();
      ++popped;
      // A client that re-opened its session resubmits what it has not been
      // answered (§3.2.8): an index already leased is not sent twice.
      if (!s.leases.try_emplace(ws.index, Lease{best->serial, {}}).second) continue;
      chunk.statements.push_back(std::move(ws));
    }
    total_pending -= popped;
    if (chunk.statements.empty()) {
      if (!s.rate || popped > 0) mark_ready(s);  // a rate-limited one waits for its wake time
      continue;
    }
    if (!send_dispatch(s, *best, chunk)) requeue_front(s, std::move(chunk.statements));
    mark_ready(s);
  }
}

// Sends SESSION, DISPATCH or END_SESSION, encoded with seq w.order_seq + 1
// (§3.7). ROUTER_MANDATORY makes a send to a connection that is gone fail
// at once, so a message not sent was never seen: the seq is not used up and
// the worker leases nothing more until it is heard from again.
bool Broker::Impl::send_order(WorkerState& w, proto::Frames&& frames) {
  if (!send(w.routing_id, std::move(frames))) {
    w.reachable = false;
    return false;
  }
  ++w.order_seq;
  return true;
}

// SESSION before the first DISPATCH of a session to a worker (§3.5.1).
bool Broker::Impl::ensure_session(SessionState& s, WorkerState& w) {
  if (w.sessions.contains(s.id)) return true;
  if (!send_order(w, proto::Encode(proto::Session{s.id, s.settings, w.order_seq + 1}))) return false;
  w.sessions.emplace(s.id, w.order_seq);
  s.workers.insert(w.routing_id);
  return true;
}

// DISPATCH of `chunk`, whose indices are already leased to `w` (with empty
// statements): each statement moves into its lease once sent. When the
// worker cannot be reached the leases are undone and `chunk` is left whole
// for the caller to queue again.
bool Broker::Impl::send_dispatch(SessionState& s, WorkerState& w, proto::Statements& chunk) {
  chunk.seq = w.order_seq + 1;
  if (!send_order(w, proto::Encode(proto::Command::kDispatch, chunk))) {
    for (const auto& ws : chunk.statements) s.leases.erase(ws.index);
    return false;
  }
  for (auto& ws : chunk.statements) {
    Lease& lease = s.leases[ws.index];
    lease.statement = std::move(ws);
    lease.seq = w.order_seq;
  }
  const std::size_t sent = chunk.statements.size();
  w.leased += static_cast<std::uint32_t>(sent);
  total_leased += sent;
  stats.dispatched.fetch_add(sent, std::memory_order_relaxed);
  return true;
}

// Statements that never reached a worker go back to the front of their
// session's queue, in index order.
void Broker::Impl::requeue_front(SessionState& s, std::vector<proto::WireStatement>&& statements) {
  if (statements.empty()) return;
  total_pending += statements.size();
  s.pending.insert(s.pending.begin(), std::make_move_iterator(statements.begin()),
                   std::make_move_iterator(statements.end()));
  mark_ready(s);
}

// Numbers, keeps and sends one RESULTS message to the session's client
// (§3.6). Kept until the client acknowledges it, so a connection that drops
// on the way loses nothing: SYNC sends it again.
void Broker::Impl::deliver(SessionState& s, proto::Frames&& frames, std::vector<std::uint64_t>&& indices) {
  proto::RestampResults(frames, s.id, ++s.results_seq);
  s.retained.push_back(Retained{s.results_seq, std::move(indices), proto::CopyFrames(frames)});
  send(s.client, std::move(frames));
}

// Results the broker itself answers (outcome unknown, poison).
void Broker::Impl::deliver_failures(SessionState& s, proto::Results&& results) {
  if (results.results.empty()) return;
  std::uint64_t failed = 0;
  for (const auto& r : results.results) failed += r.response.error ? 1 : 0;
  answered(s, nullptr, results.results.size(), failed, 0);
  std::vector<std::uint64_t> indices;
  indices.reserve(results.results.size());
  for (const auto& r : results.results) indices.push_back(r.index);
  deliver(s, proto::Encode(std::move(results)), std::move(indices));
}

// One cumulative ACK per worker per loop pass (§3.7), however many RESULTS
// it sent: the worker then forgets what it kept.
void Broker::Impl::send_acks() {
  for (const auto& rid : acks_due) {
    auto w = workers.find(rid);
    if (w == workers.end() || !w->second.ack_due) continue;
    w->second.ack_due = false;
    send(rid, proto::Encode(proto::Ack{std::nullopt, w->second.results_seq}));
  }
  acks_due.clear();
}

// Drops the session's queued statements and leases; workers holding it get
// END_SESSION so they abort its transfers (§4.4). The session itself stays
// unless it is being closed.
void Broker::Impl::end_session(SessionState& s) {
  if (!s.leases.empty()) {
    std::unordered_map<std::uint64_t, WorkerState*> by_serial;
    for (auto& [rid, w] : workers) by_serial.emplace(w.serial, &w);
    for (const auto& [index, lease] : s.leases) {
      auto w = by_serial.find(lease.worker);
      if (w != by_serial.end() && w->second->leased > 0) --w->second->leased;
    }
  }
  total_leased -= s.leases.size();
  total_pending -= s.pending.size();
  quarantine_groups -= s.quarantine.size();
  s.leases.clear();
  s.pending.clear();
  s.quarantine.clear();
  s.solo_deaths.clear();
  s.retained.clear();
  for (const auto& rid : s.workers) {
    auto w = workers.find(rid);
    if (w == workers.end()) continue;
    w->second.sessions.erase(s.id);
    send_order(w->second, proto::Encode(proto::EndSession{s.id, w->second.order_seq + 1}));
  }
  s.workers.clear();
}

// A worker's leases outlive it (PROTOCOL.md §4.5, §3.4.7): a non-idempotent
// statement fails as "outcome unknown" (it may have reached the server); the
// others are queued again when the worker left, or quarantined when it died,
// and a statement that keeps killing the workers that run it alone fails as
// poison after options.poison_after deaths.
void Broker::Impl::remove_worker(const std::string& routing_id, Departure how, const char* why) {
  auto it = workers.find(routing_id);
  if (it == workers.end()) return;
  WorkerState& w = it->second;
  if (how == Departure::kDied) {
    log().warn("broker: worker {} presumed dead ({}) holding {} statements", w.worker_id, why, w.leased);
  } else {
    log().info("broker: worker {} left ({}) holding {} statements", w.worker_id, why, w.leased);
  }
  // A death is charged to a statement only when it was the worker's only one:
  // of several, the broker cannot tell which one (if any) killed it.
  const bool solo = how == Departure::kDied && w.leased == 1;
  const bool isolated = w.isolated && w.leased > 0;
  for (const auto& [sid, session_seq] : w.sessions) {
    auto s = sessions.find(sid);
    if (s == sessions.end()) continue;
    SessionState& session = s->second;
    session.workers.erase(routing_id);
    std::vector<proto::WireStatement> held;
    for (auto l = session.leases.begin(); l != session.leases.end();) {
      if (l->second.worker == w.serial) {
        held.push_back(std::move(l->second.statement));
        l = session.leases.erase(l);
      } else {
        ++l;
      }
    }
    if (held.empty()) continue;
    total_leased -= held.size();
    std::sort(held.begin(), held.end(), [](const auto& a, const auto& b) { return a.index < b.index; });
    proto::Results failed{sid, 0, {}};
    std::vector<proto::WireStatement> again;
    again.reserve(held.size());
    for (auto& ws : held) {
      if (!IsIdempotent(ws.statement)) {
        failed.results.push_back(Failure(
            ws.index, StatusCode::kUnknown,
            fmt::format("outcome unknown: worker {} {} while this {} was in its hands; not sent again "
                        "(non-idempotent)",
                        w.worker_id, how == Departure::kDied ? "died" : "left", ws.statement.method),
            w.worker_id));
        stats.outcome_unknown.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (solo) {
        const std::uint32_t deaths = ++session.solo_deaths[ws.index];
        if (deaths >= options.poison_after) {
          failed.results.push_back(Failure(
              ws.index, StatusCode::kAborted,
              fmt::format("poison statement: {} workers died while running it alone (last: {}); not sent again",
                          deaths, w.worker_id),
              w.worker_id));
          session.solo_deaths.erase(ws.index);
          stats.poisoned.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
      }
      again.push_back(std::move(ws));
    }
    deliver_failures(session, std::move(failed));
    if (!again.empty() && how == Departure::kLeft) {
      // Back to the front of the queue, in index order: nothing is lost.
      stats.requeued.fetch_add(again.size(), std::memory_order_relaxed);
      total_pending += again.size();
      session.pending.insert(session.pending.begin(), std::make_move_iterator(again.begin()),
                             std::make_move_iterator(again.end()));
    } else if (!again.empty()) {
      stats.quarantined.fetch_add(again.size(), std::memory_order_relaxed);
      if (isolated && again.size() > 1) {
        // The group killed a worker it had to itself: halve it to find the
        // culprit (group testing); nobody is charged yet.
        session.quarantine.push_front(TakeBackHalf(again));
        ++quarantine_groups;
      }
      session.quarantine.push_front(std::move(again));
      ++quarantine_groups;
      quarantined.push_back(sid);
    }
    mark_ready(session);
  }
  if (routing_id == quarantine_worker) quarantine_worker.clear();
  workers.erase(it);
}

void Broker::Impl::release_quarantine_worker() {
  auto w = workers.find(quarantine_worker);
  if (w != workers.end()) {
    w->second.reserved = false;
    w->second.isolated = false;
  }
  quarantine_worker.clear();
}

// Quarantine (§4.5): one worker at a time is set aside; once it holds
// nothing it runs one group, alone, so a death while it runs is charged to
// that group and nothing else.
void Broker::Impl::dispatch_quarantine() {
  if (quarantine_groups == 0) {
    auto w = workers.find(quarantine_worker);
    if (!quarantine_worker.empty() && (w == workers.end() || w->second.leased == 0)) release_quarantine_worker();
    return;
  }
  auto q = workers.find(quarantine_worker);
  if (q != workers.end() && q->second.draining && q->second.leased == 0) {
    release_quarantine_worker();
    q = workers.end();
  }
  if (q == workers.end()) {
    for (auto w = workers.begin(); w != workers.end(); ++w) {
      if (!w->second.draining && w->second.reachable && (q == workers.end() || w->second.leased < q->second.leased)) {
        q = w;
      }
    }
    if (q == workers.end()) return;  // no worker to run it on yet
    quarantine_worker = q->first;
    q->second.reserved = true;
  }
  WorkerState& worker = q->second;
  if (worker.leased > 0) return;  // finishing earlier statements, or a group
  worker.isolated = false;
  // A session whose keys allow nothing now goes to the back, and wakes this
  // loop when they do; once every session waits so, the pass ends.
  std::size_t blocked = 0;
  while (!quarantined.empty()) {
    const SessionId sid = quarantined.front();
    auto it = sessions.find(sid);
    if (it == sessions.end() || it->second.quarantine.empty()) {
      quarantined.pop_front();
      continue;
    }
    SessionState& s = it->second;
    auto& group = s.quarantine.front();
    const std::size_t limit =
        std::max<std::size_t>(1, std::min<std::size_t>({s.settings.workers, worker.slots, options.max_chunk}));
    if (group.size() > limit) {
      // Too big for the window or the worker (settings changed, or a smaller
      // worker): split it and try again.
      s.quarantine.insert(s.quarantine.begin() + 1, TakeBackHalf(group));
      ++quarantine_groups;
      continue;
    }
    // Its ordinary dispatch is paused, so its window empties for the group.
    if (s.leases.size() + group.size() > s.settings.workers) return;
    if (s.rate) {
      // A re-run is a request like any other (§3.8.3): the group runs what
      // its keys allow now, and the rest stays first in line.
      std::deque<proto::WireStatement> rest(std::make_move_iterator(group.begin()),
                                            std::make_move_iterator(group.end()));
      group.clear();
      wake_at(s, s.rate->take(rest, rest.size(), Clock::now(), group));
      if (!rest.empty()) {
        s.quarantine.insert(s.quarantine.begin() + 1,
                            std::vector<proto::WireStatement>(std::make_move_iterator(rest.begin()),
                                                              std::make_move_iterator(rest.end())));
        ++quarantine_groups;
      }
      if (group.empty()) {
        s.quarantine.pop_front();
        --quarantine_groups;
        quarantined.pop_front();
        quarantined.push_back(sid);
        if (++blocked >= quarantined.size()) return;
        continue;
      }
    }
    proto::Statements chunk{sid, std::move(group), 0};
    s.quarantine.pop_front();
    --quarantine_groups;
    quarantined.pop_front();
    if (!s.quarantine.empty()) quarantined.push_back(sid);
    std::erase_if(chunk.statements, [&](const proto::WireStatement& ws) {
      return !s.leases.try_emplace(ws.index, Lease{worker.serial, {}}).second;
    });
    if (!chunk.statements.empty()) {
      if (ensure_session(s, worker) && send_dispatch(s, worker, chunk)) {
        worker.isolated = true;
      } else {
        // The worker cannot be reached: the group waits for the next turn.
        for (const auto& ws : chunk.statements) s.leases.erase(ws.index);
        s.quarantine.push_front(std::move(chunk.statements));
        ++quarantine_groups;
        quarantined.push_front(sid);
        release_quarantine_worker();
        return;
      }
    }
    mark_ready(s);
    if (worker.isolated) return;  // one group at a time
  }
}

void Broker::Impl::on_results(const std::string& peer, std::span<zmq::message_t> body) {
  auto w = workers.find(peer);
  if (w == workers.end()) {
    // A malformed one is counted like any other (§2.4); a well-formed one
    // comes from a worker the broker does not know (it restarted, or presumed
    // the worker dead): ask it to register.
    if (auto index = proto::DecodeResultsIndex(body); !index) return malformed(peer, index.error(), body);
    send_error(peer, StatusCode::kNotFound, "unknown worker; send READY", std::nullopt);
    return;
  }
  WorkerState& worker = w->second;
  worker.last_seen = Clock::now();
  worker.reachable = true;
  auto index = proto::DecodeResultsIndex(body);
  if (!index) {
    // Its results cannot be told apart, so none is forwarded; what the
    // worker held goes back to the queue (a POST fails as outcome unknown)
    // and the worker is asked to register again (§4.3).
    malformed(peer, index.error());
    remove_worker(peer, Departure::kLeft, "sent a malformed RESULTS");
    return send_error(peer, StatusCode::kNotFound,
                      "malformed RESULTS: " + index.error().message() + "; what you held went back; send READY",
                      std::nullopt);
  }
  // §3.7: a worker numbers its RESULTS and keeps each until acknowledged.
  // One already taken (sent again after a reconnect) is acknowledged again
  // and dropped; after a gap, the missing ones will come again and the
  // leases drop what was already forwarded.
  if (!worker.ack_due) {
    worker.ack_due = true;
    acks_due.push_back(peer);
  }
  if (index->seq <= worker.results_seq || worker.ahead.contains(index->seq)) {
    stats.duplicates_dropped.fetch_add(index->indices.size(), std::memory_order_relaxed);
    return;
  }
  if (index->seq == worker.results_seq + 1) {
    worker.results_seq = index->seq;
    // RESULTS taken past a gap that this one fills count as received now.
    while (!worker.ahead.empty() && *worker.ahead.begin() == worker.results_seq + 1) {
      worker.results_seq = *worker.ahead.begin();
      worker.ahead.erase(worker.ahead.begin());
    }
  } else if (worker.ahead.size() < proto::kMaxBatch) {
    worker.ahead.insert(index->seq);  // past a gap (beyond the cap: taken again when re-sent)
  }
  auto s = sessions.find(index->session);
  if (s == sessions.end()) return;  // closed meanwhile: results are dropped
  SessionState& session = s->second;
  // Settle leases. A result for an index not leased to this worker is a
  // duplicate or belongs to a cancelled batch; it is dropped here (§4.3).
  std::vector<bool> keep(index->indices.size(), true);
  std::size_t kept = 0;
  std::vector<proto::WireStatement> throttled;  // 429s to run again (§3.8)
  auto report = index->rates.begin();
  for (std::size_t i = 0; i < index->indices.size(); ++i) {
    auto l = session.leases.find(index->indices[i]);
    if (l == session.leases.end() || l->second.worker != worker.serial) {
      keep[i] = false;
      continue;
    }
    while (report != index->rates.end() && report->first < i) ++report;
    if (session.rate && report != index->rates.end() && report->first == i) {
      if (report->second.throttled) stats.throttled.fetch_add(1, std::memory_order_relaxed);
      if (session.rate->learn(l->second.statement, report->second, Clock::now())) {
        keep[i] = false;  // not forwarded: it runs again once its key allows
        throttled.push_back(std::move(l->second.statement));
        session.leases.erase(l);
        --total_leased;
        if (worker.leased > 0) --worker.leased;
        continue;
      }
    }
    if (session.rate) session.rate->settled(index->indices[i]);
    session.leases.erase(l);
    --total_leased;
    if (worker.leased > 0) --worker.leased;
    if (!session.solo_deaths.empty()) session.solo_deaths.erase(index->indices[i]);
    ++kept;
  }
  stats.results.fetch_add(kept, std::memory_order_relaxed);
  stats.duplicates_dropped.fetch_add(index->indices.size() - kept - throttled.size(), std::memory_order_relaxed);
  requeue_front(session, std::move(throttled));
  if (kept == index->indices.size()) {
    // Fast path: the worker's results and bodies go on untouched; only the
    // [session, seq] frame is the broker's own (§3.6).
    proto::Frames frames;
    frames.reserve(body.size());
    for (auto& f : body) frames.push_back(std::move(f));
    answered(session, &worker, kept, index->failed, index->retries);
    deliver(session, std::move(frames), std::move(index->indices));
  } else if (kept > 0) {
    auto full = proto::DecodeResults(body);
    if (!full) return malformed(peer, full.error());
    proto::Results filtered{full->session, 0, {}};
    std::uint64_t failed = 0, retries = 0;
    for (std::size_t i = 0; i < full->results.size(); ++i) {
      if (!keep[i]) continue;
      failed += full->results[i].response.error ? 1 : 0;
      retries += full->results[i].response.attempts > 1 ? full->results[i].response.attempts - 1 : 0;
      filtered.results.push_back(std::move(full->results[i]));
    }
    // Counted here for the worker; deliver_failures counts the session.
    worker.figures.done += filtered.results.size();
    worker.figures.failed += failed;
    stats.retried.fetch_add(retries, std::memory_order_relaxed);
    deliver_failures(session, std::move(filtered));
  }
  mark_ready(session);
}

// §3.7: after a reconnect, or on seeing a gap in the order seqs, a worker
// says what it holds. A lease from a DISPATCH it has received (seq <= its
// seq) that is not in its hands never reached it — its RESULTS, kept until
// acknowledged, were sent again before this message — so it is queued again,
// a POST included: it was never sent. Sessions are reconciled both ways.
void Broker::Impl::on_holding(const std::string& peer, std::span<zmq::message_t> body) {
  auto holding = proto::DecodeHolding(body);
  if (!holding) return malformed(peer, holding.error(), body);
  auto w = workers.find(peer);
  if (w == workers.end()) {
    send_error(peer, StatusCode::kNotFound, "unknown worker; send READY", std::nullopt);
    return;
  }
  WorkerState& worker = w->second;
  worker.last_seen = Clock::now();
  worker.reachable = true;
  std::unordered_map<SessionId, std::unordered_set<std::uint64_t>> held;
  for (auto& [sid, indices] : holding->sessions) held[sid].insert(indices.begin(), indices.end());
  std::vector<SessionId> touched;
  touched.reserve(worker.sessions.size());
  for (auto it = worker.sessions.begin(); it != worker.sessions.end();) {
    touched.push_back(it->first);
    if (it->second <= holding->seq && !held.contains(it->first)) {
      // Its SESSION never arrived: the next DISPATCH sends it again.
      if (auto s = sessions.find(it->first); s != sessions.end()) s->second.workers.erase(peer);
      it = worker.sessions.erase(it);
    } else {
      ++it;
    }
  }
  for (const auto& [sid, indices] : held) {
    // Ended here, but its END_SESSION never arrived.
    if (!worker.sessions.contains(sid)) send_order(worker, proto::Encode(proto::EndSession{sid, worker.order_seq + 1}));
  }
  std::size_t lost_total = 0;
  for (const SessionId& sid : touched) {
    auto s = sessions.find(sid);
    if (s == sessions.end()) continue;
    SessionState& session = s->second;
    auto in_hand = held.find(sid);
    std::vector<proto::WireStatement> lost;
    for (auto l = session.leases.begin(); l != session.leases.end();) {
      const Lease& lease = l->second;
      if (lease.worker == worker.serial && lease.seq <= holding->seq &&
          (in_hand == held.end() || !in_hand->second.contains(l->first))) {
        lost.push_back(std::move(l->second.statement));
        l = session.leases.erase(l);
      } else {
        ++l;
      }
    }
    if (lost.empty()) continue;
    lost_total += lost.size();
    total_leased -= lost.size();
    worker.leased -= std::min<std::uint32_t>(worker.leased, static_cast<std::uint32_t>(lost.size()));
    std::sort(lost.begin(), lost.end(), [](const auto& a, const auto& b) { return a.index < b.index; });
    stats.requeued.fetch_add(lost.size(), std::memory_order_relaxed);
    requeue_front(session, std::move(lost));
  }
  log().info("broker: worker {} resynchronised: holds {} sessions; {} statements that never reached it queued again",
                worker.worker_id, holding->sessions.size(), lost_total);
}

// §3.6: a client that reconnected, or saw a gap, says what it has received
// and what it has not been answered. The broker sends again every RESULTS
// it keeps past that, then SYNCED with the statements it never received.
void Broker::Impl::on_sync(const std::string& peer, std::span<zmq::message_t> body) {
  auto sync = proto::DecodeSync(body);
  if (!sync) return malformed(peer, sync.error(), body);
  auto it = sessions.find(sync->session);
  if (it == sessions.end()) return send_error(peer, StatusCode::kNotFound, "session not open", sync->session);
  SessionState& s = it->second;
  if (!may_touch(peer, s)) return;
  s.last_seen = Clock::now();
  s.client = peer;
  std::uint64_t listed = 0;
  for (const auto& r : sync->unanswered) listed += r.count;
  const std::uint64_t cap = std::uint64_t{s.settings.workers} + s.prefetch + options.queue_slack;
  if (listed > cap) {
    return send_error(peer, StatusCode::kInvalidArgument,
                      fmt::format("SYNC lists {} unanswered statements; a session has at most {}", listed, cap), s.id);
  }
  s.forget_acknowledged(sync->ack);
  std::unordered_set<std::uint64_t> known;
  known.reserve(s.pending.size() + 64);
  for (Retained& r : s.retained) {
    send(peer, proto::CopyFrames(r.frames));
    known.insert(r.indices.begin(), r.indices.end());
  }
  for (const auto& ws : s.pending) known.insert(ws.index);
  for (const auto& group : s.quarantine) {
    for (const auto& ws : group) known.insert(ws.index);
  }
  proto::Synced synced{s.id, {}, s.results_seq};
  for (const auto& r : sync->unanswered) {
    for (std::uint64_t i = r.first; i < r.first + r.count; ++i) {
      if (!known.contains(i) && !s.leases.contains(i)) proto::AppendIndex(synced.missing, i);
    }
  }
  std::uint64_t missing = 0;
  for (const auto& r : synced.missing) missing += r.count;
  log().info("broker: session {} resynchronised: {} RESULTS sent again, {} statements to submit again",
                s.id.ToString(), s.retained.size(), missing);
  send(peer, proto::Encode(synced));
}

void Broker::Impl::on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  if (command == proto::Command::kReady) {
    auto ready_msg = proto::DecodeReady(body);
    if (!ready_msg) return malformed(peer, ready_msg.error(), body);
    // A worker that registers again has dropped what it held (§3.4.5).
    const bool again = workers.contains(peer);
    if (again) remove_worker(peer, Departure::kLeft, "registered again");
    auto [it, inserted] = workers.try_emplace(peer);
    WorkerState& w = it->second;
    w.routing_id = peer;
    w.serial = ++worker_serials;
    w.worker_id = ready_msg->worker_id;
    w.host = ready_msg->host;
    w.slots = ready_msg->slots;
    w.figures.pid = ready_msg->pid;
    w.last_seen = Clock::now();
    log().info("broker: worker {} joined: ready with {} slots, host {} pid {}{}", w.worker_id, w.slots, w.host,
               w.figures.pid, again ? " (registered again)" : "");
    // §3.4.1: READY is answered, so the worker can tell errors about what it
    // sent before READY from errors about itself.
    send(peer, proto::Encode(proto::BrokerBeat{std::nullopt, 0, 0, 0}));
    return;
  }
  if (command == proto::Command::kHolding) return on_holding(peer, body);
  if (command == proto::Command::kDraining || command == proto::Command::kDisconnect) {
    if (Status st = proto::DecodeEmpty(body); !st.ok()) return malformed(peer, st, body);
    auto w = workers.find(peer);
    if (w == workers.end()) return;
    if (command == proto::Command::kDisconnect) return remove_worker(peer, Departure::kLeft, "disconnected");
    w->second.draining = true;
    w->second.last_seen = Clock::now();
    log().info("broker: worker {} draining with {} statements in hand", w->second.worker_id, w->second.leased);
    return;
  }
  on_results(peer, body);
}

void Broker::Impl::on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  using proto::Command;
  if (command == Command::kOpen) {
    auto open = proto::DecodeOpen(body);
    if (!open) return malformed(peer, open.error(), body);
    auto it = sessions.find(open->session);
    if (it == sessions.end()) {
      if (drain_requested.load(std::memory_order_acquire)) {
        return send_error(peer, StatusCode::kUnavailable, "broker is shutting down; open the session elsewhere",
                          open->session);
      }
      if (sessions.size() >= options.max_sessions) {
        return send_error(peer, StatusCode::kResourceExhausted, "broker session limit reached", open->session);
      }
      it = sessions.try_emplace(open->session).first;
      it->second.figures.opened = Clock::now();
      it->second.figures.client_host = broker_ops::PeerHost(body[0]);
      log().info("broker: session {} opened: client {} window {}", open->session.ToString(),
                 it->second.figures.client_host, open->settings.workers);
    }
    SessionState& s = it->second;
    if (!s.owner.empty() && !may_touch(peer, s)) return;
    s.id = open->session;
    s.owner = std::string(peer_key);
    s.client = peer;
    s.last_seen = Clock::now();
    s.settings = open->settings;
    s.prefetch = open->prefetch;
    open_rate(s);
    send(peer, proto::Encode(proto::Opened{s.id, static_cast<std::uint32_t>(options.heartbeat_interval.count()),
                                           static_cast<std::uint32_t>(options.session_ttl.count())}));
    return;
  }
  if (command == Command::kSubmit) {
    auto submit = proto::DecodeStatements(body);
    if (!submit) return malformed(peer, submit.error(), body);
    auto it = sessions.find(submit->session);
    if (it == sessions.end()) {
      return send_error(peer, StatusCode::kNotFound, "session not open", submit->session);
    }
    SessionState& s = it->second;
    if (!may_touch(peer, s)) return;
    s.last_seen = Clock::now();
    s.client = peer;  // a reconnected client has a new routing id
    const std::size_t cap = std::size_t{s.settings.workers} + s.prefetch + options.queue_slack;
    // The refusal names the SUBMIT, so the client can tell which one (§3.2.3).
    const auto refused = [&] {
      return submit->statements.empty()
                 ? std::string("an empty SUBMIT")
                 : fmt::format("the SUBMIT of {} statements from index {}", submit->statements.size(),
                               submit->statements.front().index);
    };
    if (s.pending.size() + s.leases.size() + submit->statements.size() > cap) {
      return send_error(peer, StatusCode::kResourceExhausted,
                        fmt::format("session queue cap exceeded: {} would make {} queued and in flight, over window "
                                    "+ prefetch + slack = {}; none of it kept",
                                    refused(), s.pending.size() + s.leases.size() + submit->statements.size(), cap),
                        s.id);
    }
    if (total_pending + total_leased + submit->statements.size() > options.max_queued) {
      return send_error(peer, StatusCode::kResourceExhausted,
                        fmt::format("broker queue cap exceeded: {} would pass {} statements over all sessions; none "
                                    "of it kept",
                                    refused(), options.max_queued),
                        s.id);
    }
    for (auto& ws : submit->statements) {
      s.next_index = std::max(s.next_index, ws.index + 1);
      s.pending.push_back(std::move(ws));
    }
    total_pending += submit->statements.size();
    mark_ready(s);
    return;
  }
  if (command == Command::kAck) {
    auto ack = proto::DecodeAck(body);
    if (!ack) return malformed(peer, ack.error(), body);
    if (!ack->session) return malformed(peer, InvalidArgument("a client's ACK names its session"), body);
    auto it = sessions.find(*ack->session);
    if (it == sessions.end()) return send_error(peer, StatusCode::kNotFound, "session not open", *ack->session);
    SessionState& s = it->second;
    if (!may_touch(peer, s)) return;
    s.last_seen = Clock::now();
    s.forget_acknowledged(ack->seq);
    return;
  }
  if (command == Command::kSync) return on_sync(peer, body);
  if (command == Command::kCancel || command == Command::kClose) {
    auto ref = proto::DecodeSessionRef(body);
    if (!ref) return malformed(peer, ref.error(), body);
    auto it = sessions.find(ref->session);
    if (it != sessions.end()) {
      if (!may_touch(peer, it->second)) return;
      end_session(it->second);
      if (command == Command::kClose) {
        log().info("broker: session {} closed: {} answered, {} failed", ref->session.ToString(),
                   it->second.figures.done, it->second.figures.failed);
        sessions.erase(it);
      }
    }
    if (command == Command::kClose) send(peer, proto::Encode(Command::kClosed, *ref));
    return;
  }
}

// §1.7: with CURVE a session answers only to the key that opened it.
bool Broker::Impl::may_touch(const std::string& peer, const SessionState& s) {
  if (!curve() || s.owner == peer_key) return true;
  stats.denied.fetch_add(1, std::memory_order_relaxed);
  send_error(peer, StatusCode::kPermissionDenied, "session belongs to another key", s.id);
  return false;
}

void Broker::Impl::handle(std::vector<zmq::message_t>& frames) {
  if (frames.size() < 2) return malformed("", InvalidArgument("no frames after routing id"));
  const std::string peer = frames[0].to_string();
  std::span<zmq::message_t> body(frames.data() + 1, frames.size() - 1);
  auto command = proto::PeekCommand(body);
  if (!command) {
    malformed(peer, command.error());
    // §2.2: a peer speaking another version is told so, once per message.
    if (command.error().code() == StatusCode::kFailedPrecondition) {
      send_error(peer, StatusCode::kFailedPrecondition, command.error().message(), std::nullopt);
    }
    return;
  }
  using proto::Command;
  // The routing id frame is the ROUTER's own; the peer's frames carry the
  // connection's metadata.
  if (curve()) peer_key = PeerCurveKey(frames[1]);
  // §1.7: with CURVE, only a listed client key speaks as a client and only a
  // listed worker key as a worker.
  const auto allowed = [&](const std::unordered_set<std::string>& keys, const char* role) {
    if (!curve() || keys.contains(std::string(peer_key))) return true;
    stats.denied.fetch_add(1, std::memory_order_relaxed);
    send_error(peer, StatusCode::kPermissionDenied,
               fmt::format("this key is not allowed to act as a {} here", role), std::nullopt);
    return false;
  };
  switch (*command) {
    case Command::kOpen: case Command::kSubmit: case Command::kCancel: case Command::kClose:
    case Command::kAck: case Command::kSync:
      if (allowed(options.curve_clients, "client")) on_client(peer, *command, body);
      break;
    case Command::kReady: case Command::kResults: case Command::kDraining: case Command::kDisconnect:
    case Command::kHolding:
      if (allowed(options.curve_workers, "worker")) on_worker(peer, *command, body);
      break;
    case Command::kStatus: case Command::kListWorkers: case Command::kListSessions: case Command::kCancelSession:
    case Command::kDrainWorker: case Command::kShutdown:
      if (allowed(options.curve_operators, "operator")) on_control(peer, *command, body);
      break;
    case Command::kHeartbeat: {
      // Decoded first: a malformed heartbeat proves nothing (§2.4).
      auto named = proto::DecodeHeartbeat(body);
      if (!named) return malformed(peer, named.error(), body);
      auto w = workers.find(peer);
      if (w != workers.end()) {
        w->second.last_seen = Clock::now();
        w->second.reachable = true;
        break;
      }
      if (!*named) {
        // §3.4.4: a plain HEARTBEAT is a worker's. One this broker does not
        // know (it restarted, or presumed the worker dead) must register
        // again, or an idle worker would never learn it holds no place here.
        return send_error(peer, StatusCode::kNotFound, "unknown worker; send READY", std::nullopt);
      }
      // §3.2.7: a client's heartbeat keeps its session alive; a session
      // this broker does not have (it restarted, or the TTL ran out) is
      // reported so the client re-opens it (§3.2.8).
      auto s = sessions.find((*named)->session);
      if (s == sessions.end()) {
        return send_error(peer, StatusCode::kNotFound, "session not open", (*named)->session);
      }
      SessionState& session = s->second;
      if (!may_touch(peer, session)) return;
      session.last_seen = Clock::now();
      session.client = peer;
      // §3.6: the answer tells the client the last RESULTS sent and how far
      // its SUBMITs arrived, so it can tell whether anything was lost.
      send(peer, proto::Encode(proto::BrokerBeat{session.id, session.results_seq, session.next_index,
                                                 static_cast<std::uint32_t>(workers.size())}));
      break;
    }
    default:
      malformed(peer, InvalidArgument(std::string("command not accepted by a broker: ") +
                                      proto::CommandName(*command)));
  }
}

void Broker::Impl::heartbeat() {
  const auto now = Clock::now();
  if (now < next_heartbeat) return;
  next_heartbeat = now + options.heartbeat_interval;
  limiter.collect(now);  // rate keys no session uses and long idle (§3.8)
  const auto dead_after = options.heartbeat_interval * options.heartbeat_liveness;
  std::vector<std::string> dead;
  for (auto& [rid, w] : workers) {
    if (now - w.last_seen > dead_after) {
      dead.push_back(rid);
    } else if (!send(rid, proto::Encode(proto::BrokerBeat{std::nullopt, w.order_seq, 0, 0}))) {
      w.reachable = false;  // its connection is gone; it will come back or die
    }
  }
  for (const auto& rid : dead) remove_worker(rid, Departure::kDied, "missed heartbeats");
  if (options.metrics) publish_metrics();
  // A silent client's session is cancelled everywhere.
  for (auto it = sessions.begin(); it != sessions.end();) {
    if (now - it->second.last_seen > options.session_ttl) {
      log().warn("broker: session {} expired: its client was silent for {} ms", it->first.ToString(),
                    options.session_ttl.count());
      end_session(it->second);
      stats.sessions_expired.fetch_add(1, std::memory_order_relaxed);
      it = sessions.erase(it);
    } else {
      ++it;
    }
  }
}

void Broker::Impl::run() {
  next_heartbeat = Clock::now() + options.heartbeat_interval;
  zmq::pollitem_t items[] = {{router->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake->fd(), ZMQ_POLLIN, 0}};
  std::vector<zmq::message_t> frames;
  while (!stopping.load(std::memory_order_acquire)) {
    // Up to the next heartbeat, or the next time a rate key allows a waiting
    // statement (rounded up: the key allows it then, not a moment before).
    const auto until = std::min(next_heartbeat, rate_wake);
    const auto wait = std::chrono::ceil<std::chrono::milliseconds>(until - Clock::now());
    try {
      zmq::poll(items, 2, std::max(wait, std::chrono::milliseconds(0)));
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) break;
      if (e.num() != EINTR) log().error("broker: poll failed: {}", e.what());
      continue;
    }
    // drain() and stop() signal the wake descriptor: consume it, or every
    // later poll returns at once and the loop spins.
    if (items[1].revents & ZMQ_POLLIN) wake->drain();
    if (items[0].revents & ZMQ_POLLIN) {
      // Drain a bounded number per wake so heartbeats are never starved.
      try {
        for (int i = 0; i < 4096 && proto::ReceiveMessage(*router, frames); ++i) handle(frames);
      } catch (const zmq::error_t&) {
        return;  // context terminated
      }
    }
    heartbeat();
    wake_rate_waiting();
    // Once per pass, after messages and expiries changed credit and queues.
    dispatch_quarantine();
    dispatch();
    send_acks();
    update_gauges();
  }
}

// ---- Operations (PROTOCOL.md §3.9): figures and control requests ----

// `n` statements of `s` answered to its client, `failed` of them with an
// error; `w` is the worker that answered them (nullptr: the broker did).
// Plain loop-thread counters plus relaxed atomics: no lock, no allocation.
void Broker::Impl::answered(SessionState& s, WorkerState* w, std::uint64_t n, std::uint64_t failed,
                            std::uint64_t retries) {
  if (n == 0) return;
  const auto now = Clock::now();
  s.figures.done += n;
  s.figures.failed += failed;
  s.figures.rate.add(now, n);
  if (w) {
    w->figures.done += n;
    w->figures.failed += failed;
  }
  figures.rate.add(now, n);
  stats.done.fetch_add(n, std::memory_order_relaxed);
  if (failed) stats.failed.fetch_add(failed, std::memory_order_relaxed);
  if (retries) stats.retried.fetch_add(retries, std::memory_order_relaxed);
}

void Broker::Impl::on_control(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  using proto::Command;
  const auto now = Clock::now();
  // §3.9.1: an operator is always answered, a malformed request included.
  const auto bad = [&](const Status& st) {
    malformed(peer, st);
    send_error(peer, StatusCode::kInvalidArgument,
               std::string("malformed ") + proto::CommandName(command) + ": " + st.message(), std::nullopt);
  };
  const auto ms = [](Clock::duration d) {
    return static_cast<std::uint64_t>(std::max<std::int64_t>(
        0, std::chrono::duration_cast<std::chrono::milliseconds>(d).count()));
  };
  if (command == Command::kCancelSession) {
    auto ref = proto::DecodeSessionRef(body);
    if (!ref) return bad(ref.error());
    auto it = sessions.find(ref->session);
    if (it == sessions.end()) return send_error(peer, StatusCode::kNotFound, "no such session", std::nullopt);
    SessionState& s = it->second;
    const std::uint64_t dropped = s.pending.size() + s.leases.size();
    end_session(s);
    // §3.9.4: the client ends its run with this error instead of re-opening.
    send_error(s.client, StatusCode::kCancelled, "session cancelled by an operator", s.id);
    log().info("broker: session {} cancelled by an operator: {} statements dropped", s.id.ToString(), dropped);
    sessions.erase(it);
    stats.sessions_cancelled.fetch_add(1, std::memory_order_relaxed);
    return (void)send(peer, proto::Encode(proto::Done{fmt::format("session {} cancelled ({} statements dropped)",
                                                                    ref->session.ToString(), dropped)}));
  }
  if (command == Command::kDrainWorker) {
    auto name = proto::DecodeWorkerName(body);
    if (!name) return bad(name.error());
    std::size_t asked = 0;
    for (auto& [rid, w] : workers) {
      if (w.worker_id != name->worker_id) continue;
      w.draining = true;  // §3.9.5: nothing more is leased to it
      send(rid, proto::EncodeEmpty(Command::kDrain));
      ++asked;
      log().info("broker: worker {} asked to drain by an operator, holding {} statements", w.worker_id, w.leased);
    }
    if (asked == 0) return send_error(peer, StatusCode::kNotFound, "no such worker: " + name->worker_id, std::nullopt);
    return (void)send(peer, proto::Encode(proto::Done{fmt::format("worker {} draining", name->worker_id)}));
  }
  if (Status st = proto::DecodeEmpty(body); !st.ok()) return bad(st);
  if (command == Command::kShutdown) {
    send(peer, proto::Encode(proto::Done{fmt::format("broker shutting down: {} sessions open", sessions.size())}));
    log().info("broker: shutdown asked by an operator");
    if (options.on_shutdown) {
      options.on_shutdown();
    } else {
      drain_requested.store(true, std::memory_order_release);
    }
    return;
  }
  if (command == Command::kStatus) {
    proto::StatusReport r;
    r.version = broker_ops::Version();
    r.uptime_ms = ms(now - figures.started);
    r.sessions = sessions.size();
    r.workers = workers.size();
    r.queued = total_pending;
    r.in_flight = total_leased;
    r.done = stats.done.load(std::memory_order_relaxed);
    r.failed = stats.failed.load(std::memory_order_relaxed);
    r.retried = stats.retried.load(std::memory_order_relaxed);
    r.redispatched =
        stats.requeued.load(std::memory_order_relaxed) + stats.quarantined.load(std::memory_order_relaxed);
    r.rate_10s_milli = figures.rate.rate_milli(now, 10, figures.started);
    r.rate_1m_milli = figures.rate.rate_milli(now, 60, figures.started);
    r.rate_keys = broker_ops::RateKeyRows(limiter, now);  // §3.9.7: the busiest, bounded
    return (void)send(peer, proto::Encode(r));
  }
  if (command == Command::kListWorkers) {
    std::vector<proto::WorkerRow> rows;
    rows.reserve(workers.size());
    for (const auto& [rid, w] : workers) {
      const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - w.last_seen);
      rows.push_back({w.worker_id, w.host, w.figures.pid, w.slots, w.leased, w.figures.done, w.figures.failed,
                      ms(now - w.last_seen),
                      broker_ops::WorkerStateName(w.draining, silent, options.heartbeat_interval, w.leased)});
    }
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.worker_id < b.worker_id; });
    return (void)send(peer, proto::Encode(rows));
  }
  std::vector<proto::SessionRow> rows;
  rows.reserve(sessions.size());
  for (auto& [sid, s] : sessions) {
    std::uint64_t quarantined = 0;
    for (const auto& g : s.quarantine) quarantined += g.size();
    rows.push_back({sid, s.figures.client_host, s.settings.workers, s.pending.size() + quarantined, s.leases.size(),
                    s.figures.done, s.figures.failed, ms(now - s.figures.opened), s.figures.rate.rate_milli(now, 10, s.figures.opened)});
  }
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.age_ms > b.age_ms; });
  send(peer, proto::Encode(rows));
}

// Once per heartbeat (options.metrics): O(workers + sessions + rate keys),
// off the per-statement path.
void Broker::Impl::publish_metrics() {
  const auto now = Clock::now();
  std::vector<broker_ops::WorkerMetric> ws;
  ws.reserve(workers.size());
  for (const auto& [rid, w] : workers) {
    const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - w.last_seen);
    ws.push_back({w.worker_id, w.host, w.slots, w.leased, w.figures.done, w.figures.failed,
                  static_cast<double>(silent.count()) / 1000.0,
                  broker_ops::WorkerStateName(w.draining, silent, options.heartbeat_interval, w.leased)});
  }
  std::vector<broker_ops::SessionMetric> ss;
  ss.reserve(sessions.size());
  for (const auto& [sid, s] : sessions) {
    ss.push_back({sid.ToString(), s.settings.workers, s.pending.size(), s.leases.size(), s.figures.done,
                  s.figures.failed});
  }
  std::string text = broker_ops::RenderDetail(ws, ss, broker_ops::RateKeyRows(limiter, now));
  std::lock_guard lock(metrics_mutex);
  metrics_snapshot.swap(text);
}

std::string Broker::metrics_text() const {
  std::string detail;
  {
    std::lock_guard lock(impl_->metrics_mutex);
    detail = impl_->metrics_snapshot;
  }
  return broker_ops::RenderBrokerMetrics(impl_->stats, impl_->figures.started, detail);
}

Broker::Broker(BrokerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Broker::~Broker() { stop(); }

Status Broker::start() {
  Impl& m = *impl_;
  if (m.thread.joinable()) return FailedPrecondition("broker already started");
  if (m.options.context) {
    m.context = m.options.context;
  } else {
    m.own_context = std::make_unique<zmq::context_t>(1);
    m.context = m.own_context.get();
  }
  if (m.curve()) {
    if (m.options.curve_clients.empty() || m.options.curve_workers.empty()) {
      return InvalidArgument("CURVE needs the public keys of the clients and of the workers to admit");
    }
    std::unordered_set<std::string> admitted = m.options.curve_clients;
    admitted.insert(m.options.curve_workers.begin(), m.options.curve_workers.end());
    admitted.insert(m.options.curve_operators.begin(), m.options.curve_operators.end());
    m.zap = std::make_unique<ZapHandler>(*m.context, std::move(admitted), m.log());
    if (Status s = m.zap->start(); !s.ok()) {
      m.zap.reset();
      return s;
    }
  }
  m.router = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::router);
  if (m.curve()) MakeCurveServer(*m.router, m.options.curve_key);
  m.router->set(zmq::sockopt::router_mandatory, 1);
  // §1.5: a peer that reconnects under its routing id takes its route over
  // from the connection it left behind (which may not have noticed yet).
  m.router->set(zmq::sockopt::router_handover, 1);
  protocol::ConfigureSocket(*m.router, m.options.heartbeat_interval);
  m.bound.clear();
  for (const auto& ep : m.options.endpoints) {
    try {
      m.router->bind(ep);
    } catch (const zmq::error_t& e) {
      m.router.reset();
      return Unavailable("cannot bind " + ep + ": " + e.what());
    }
    m.bound.push_back(m.router->get(zmq::sockopt::last_endpoint));
    if (!m.curve() && !protocol::IsLoopbackEndpoint(m.bound.back())) {
      m.log().warn("broker: {} is reachable from other machines and CURVE is off: anyone who can connect can "
                   "submit work, register as a worker (and read the requests it is given) or take results; "
                   "use --curve-key with --curve-clients and --curve-workers",
                   m.bound.back());
    }
  }
  m.wake = std::make_unique<WakeFd>();
  m.stopping.store(false);
  m.thread = std::thread([&m] { m.run(); });
  m.log().info("broker: listening on {}", fmt::join(m.bound, ", "));
  return Status::Ok();
}

void Broker::stop() {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return;
  m.stopping.store(true, std::memory_order_release);
  m.wake->signal();
  m.thread.join();
  m.router.reset();
  m.zap.reset();
  m.wake.reset();
}

void Broker::drain() {
  Impl& m = *impl_;
  m.drain_requested.store(true, std::memory_order_release);
  if (m.wake) m.wake->signal();
}

const std::vector<std::string>& Broker::endpoints() const { return impl_->bound; }

const BrokerStats& Broker::stats() const { return impl_->stats; }

}  // namespace gatherer
