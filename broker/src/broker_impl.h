#pragma once
// BrokerCore: the broker's state and logic without sockets, threads or a
// clock of its own (sans-I/O). Messages come in through handle(), time
// passes through pass(), and everything it sends goes out through the
// Outbound it is given; so unit tests drive it on a simulated clock
// (broker_core_test.cc), and gatherer::Broker is a thin shell around it: a
// ROUTER socket, a loop thread, a wake descriptor (broker.cc).
//
// Its functions live in the files of their concern (docs/architecture.md §4):
//   broker.cc      routing by command, heartbeats and expiries, the shell;
//   scheduling.cc  sessions, their queues, rate limits and credit-based
//                  dispatch (PROTOCOL.md §3.8, §4.2), delivery to clients;
//   messages.cc    what clients and workers send: OPEN, SUBMIT, RESULTS,
//                  HOLDING, SYNC and the rest (§3.2-§3.7);
//   quarantine.cc  workers that leave or die, and the re-runs of what they
//                  held (§4.5);
//   control.cc     figures and control requests for operators (§3.9).
// Private to gatherer_broker: nothing outside broker/src includes it.
// Owned by one thread (the broker's loop); only `stats`, `drain_requested`
// and the metrics snapshot are read from others.

#include "gatherer/broker.h"

#include <algorithm>
#include <deque>
#include <functional>
#include <iterator>
#include <mutex>
#include <set>
#include <span>
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

namespace proto = protocol;

// Where a BrokerCore's messages go: the ROUTER socket, or a test's record.
class Outbound {
 public:
  virtual ~Outbound() = default;
  virtual proto::SendResult send(const std::string& peer, proto::Frames& frames) = 0;
};

// `window` shared out over workers holding `slots` statements each, into
// `shares` (PROTOCOL.md §4.2); the division's remainder goes one each to the
// workers from `first` on.
void ShareOut(std::uint32_t window, std::span<const std::uint32_t> slots, std::size_t first,
              std::vector<std::uint32_t>& shares);

struct BrokerCore {
  using Clock = std::chrono::steady_clock;

  struct Lease {
    // WorkerState::serial of the worker holding it: a number, not the routing
    // id, so that leasing a statement allocates nothing (a worker's routing id
    // is longer than a short string's inline buffer).
    std::uint64_t worker = 0;
    proto::HeldStatement statement;
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
    std::deque<proto::HeldStatement> pending;
    std::unordered_map<std::uint64_t, Lease> leases;
    // Statements that were leased to a worker that died, in groups waiting to
    // run in quarantine, oldest first (§4.5). While any wait, the session's
    // queued statements are not dispatched: the quarantined ones are its oldest.
    std::deque<std::vector<proto::HeldStatement>> quarantine;
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
    bool rate_waiting = false;  // in rate_waiting
    Clock::time_point last_grant{};  // of a rate key (§3.8): turns between sessions
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
    // A session sent to it (§3.5.1): the order seq of its first SESSION
    // (§3.7), the statements of it leased to this worker, and the share of
    // the session's window this worker was last told (§4.2).
    struct Held {
      std::uint64_t seq = 0;
      std::uint32_t leased = 0;
      std::uint32_t share = 0;
    };
    std::unordered_map<SessionId, Held> sessions;
    // Leases of session `sid` held by this worker ended (a result, a loss).
    void release(const SessionId& sid, std::uint32_t n) {
      leased -= std::min(leased, n);
      if (auto held = sessions.find(sid); held != sessions.end()) held->second.leased -= std::min(held->second.leased, n);
    }
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

  BrokerOptions options;
  Outbound& out;
  // The time; Clock::now but in tests.
  std::function<Clock::time_point()> clock;
  std::atomic<bool> drain_requested{false};
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
  std::vector<SessionState*> woken_scratch;  // wake_rate_waiting's, kept for its capacity
  // The workers that take ordinary dispatch, by serial: each session's window
  // is shared out between them (§4.2). Rebuilt by dispatch() each pass.
  std::vector<WorkerState*> roster;
  std::vector<std::uint32_t> roster_slots;
  std::vector<std::uint64_t> roster_serials;
  std::vector<std::uint32_t> shares_scratch;  // dispatch()'s, per session turn
  std::vector<SessionId> deferred_scratch;  // dispatch()'s, kept for its capacity

  BrokerCore(BrokerOptions o, Outbound& outbound, std::function<Clock::time_point()> time = &Clock::now)
      : options(std::move(o)), out(outbound), clock(std::move(time)) {
    next_heartbeat = now() + options.heartbeat_interval;
  }
  spdlog::logger& log() const { return options.logger ? *options.logger : Logger(); }
  Clock::time_point now() const { return clock(); }

  // One message from the ROUTER: routing id first.
  void handle(std::vector<zmq::message_t>& frames);
  // What time passing does, once per loop pass after the messages: due
  // heartbeats and expiries, rate keys that allow again, dispatch, ACKs.
  void pass();
  // When pass() next has something to do without a message coming in.
  Clock::time_point next_due() const { return std::min(next_heartbeat, rate_wake); }
  void on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_results(const std::string& peer, std::span<zmq::message_t> body);
  void on_holding(const std::string& peer, std::span<zmq::message_t> body);
  void on_sync(const std::string& peer, std::span<zmq::message_t> body);
  void deliver(SessionState& s, proto::Frames&& frames, std::vector<std::uint64_t>&& indices);
  void deliver_failures(SessionState& s, proto::Results&& results);
  void requeue_front(SessionState& s, std::vector<proto::HeldStatement>&& statements);
  void send_acks();
  bool curve() const { return !options.curve_key.secret_key.empty(); }
  bool may_touch(const std::string& peer, const SessionState& s);
  bool send_order(WorkerState& w, proto::Frames&& frames);
  void dispatch();
  void dispatch_quarantine();
  void update_roster();
  bool ensure_session(SessionState& s, WorkerState& w, std::uint32_t share);
  bool send_dispatch(SessionState& s, WorkerState& w, std::vector<proto::HeldStatement>& chunk);
  void release_quarantine_worker();
  void end_session(SessionState& s);
  void remove_worker(const std::string& routing_id, Departure how, const char* why);
  void heartbeat();
  void mark_ready(SessionState& s);
  void open_rate(SessionState& s);
  std::size_t take_limited(SessionState& s, std::size_t n, std::vector<proto::HeldStatement>& out);
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

}  // namespace gatherer
