#include "gatherer/broker.h"

#include <algorithm>
#include <deque>
#include <iterator>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/wake_fd.h"

namespace gatherer {
namespace {

namespace proto = protocol;
using Clock = std::chrono::steady_clock;

struct Lease {
  std::string worker;  // routing id
  proto::WireStatement statement;
};

// Owned by the loop thread.
struct SessionState {
  SessionId id;
  std::string client;  // routing id of the client that opened it
  SessionSettings settings;
  std::uint32_t prefetch = 0;
  std::deque<proto::WireStatement> pending;
  std::unordered_map<std::uint64_t, Lease> leases;
  // Workers that were sent SESSION for it (they get END_SESSION on close).
  std::unordered_set<std::string> workers;
  Clock::time_point last_seen;  // last message from its client
  bool in_ready = false;  // in Impl::ready_ (round-robin of dispatchable sessions)
};

// Owned by the loop thread.
struct WorkerState {
  std::string routing_id;
  std::string worker_id;
  std::string host;
  std::uint32_t slots = 0;
  std::uint32_t leased = 0;
  Clock::time_point last_seen;
  std::unordered_set<SessionId> sessions;
  std::uint32_t credit() const { return leased >= slots ? 0 : slots - leased; }
};

}  // namespace

struct Broker::Impl {
  BrokerOptions options;
  std::unique_ptr<zmq::context_t> own_context;
  zmq::context_t* context = nullptr;
  std::unique_ptr<zmq::socket_t> router;
  std::vector<std::string> bound;
  std::unique_ptr<WakeFd> wake;
  std::atomic<bool> stopping{false};
  std::thread thread;
  BrokerStats stats;
  RateLimitedLog bad_frame_log;

  // ---- loop-thread state ----
  std::unordered_map<SessionId, SessionState> sessions;
  std::unordered_map<std::string, WorkerState> workers;
  std::deque<SessionId> ready;  // sessions with pending work and window room
  // Sums of every session's pending.size() and leases.size().
  std::uint64_t total_pending = 0;
  std::uint64_t total_leased = 0;
  Clock::time_point next_heartbeat;

  explicit Impl(BrokerOptions o) : options(std::move(o)) {}

  void run();
  void handle(std::vector<zmq::message_t>& frames);
  void on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body);
  void on_results(const std::string& peer, std::span<zmq::message_t> body);
  void dispatch();
  void end_session(SessionState& s);
  void remove_worker(const std::string& routing_id, const char* why);
  void heartbeat();
  void mark_ready(SessionState& s);
  void update_gauges();
  bool send(const std::string& peer, proto::Frames&& frames);
  void send_error(const std::string& peer, StatusCode code, std::string message,
                  std::optional<SessionId> session);
  void malformed(const std::string& peer, const Status& status);
};

bool Broker::Impl::send(const std::string& peer, proto::Frames&& frames) {
  // Gauges are published before every message, so a peer that got a reply
  // (CLOSED, say) reads stats at least as fresh as that reply.
  update_gauges();
  const auto result = proto::SendMessage(*router, peer, frames);
  if (result == proto::SendResult::kSent) return true;
  // A gone peer (ROUTER_MANDATORY) or a full queue: the message is dropped;
  // leases and heartbeats recover what it carried.
  Logger().debug("broker: cannot send to a peer ({})",
                 result == proto::SendResult::kUnreachable ? "unreachable" : "queue full or error");
  return false;
}

void Broker::Impl::send_error(const std::string& peer, StatusCode code, std::string message,
                              std::optional<SessionId> session) {
  send(peer, proto::Encode(proto::ErrorReply{code, std::move(message), session}));
}

void Broker::Impl::malformed(const std::string& peer, const Status& status) {
  stats.malformed.fetch_add(1, std::memory_order_relaxed);
  std::uint64_t suppressed = 0;
  if (bad_frame_log.allow(suppressed)) {
    Logger().warn("broker: dropped malformed message from peer of {} bytes id: {} ({} more suppressed)",
                  peer.size(), status.ToString(), suppressed);
  }
}

void Broker::Impl::mark_ready(SessionState& s) {
  if (!s.in_ready && !s.pending.empty() && s.leases.size() < s.settings.workers) {
    s.in_ready = true;
    ready.push_back(s.id);
  }
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
    const std::size_t window_room = s.settings.workers > s.leases.size() ? s.settings.workers - s.leases.size() : 0;
    // Spread a big window across workers instead of filling the first one.
    std::size_t fair_share = std::max<std::size_t>(1, (window_room + workers.size() - 1) / workers.size());
    const std::size_t n = std::min({window_room, fair_share, static_cast<std::size_t>(best->credit()),
                                    static_cast<std::size_t>(options.max_chunk), s.pending.size()});
    if (n == 0) continue;
    if (best->sessions.insert(sid).second) {
      s.workers.insert(best->routing_id);
      send(best->routing_id, proto::Encode(proto::Session{sid, s.settings}));
    }
    proto::Statements chunk{sid, {}};
    chunk.statements.reserve(n);
    std::size_t popped = 0;
    while (chunk.statements.size() < n && !s.pending.empty()) {
      proto::WireStatement ws = std::move(s.pending.front());
      s.pending.pop_front();
      ++popped;
      // A client that re-opened its session resubmits what it has not been
      // answered (§3.2.8): an index already leased is not sent twice.
      if (!s.leases.try_emplace(ws.index, Lease{best->routing_id, {}}).second) continue;
      chunk.statements.push_back(std::move(ws));
    }
    total_pending -= popped;
    if (chunk.statements.empty()) {
      mark_ready(s);
      continue;
    }
    proto::Frames frames = proto::Encode(proto::Command::kDispatch, chunk);
    for (auto& ws : chunk.statements) s.leases[ws.index].statement = std::move(ws);
    const std::size_t sent = chunk.statements.size();
    best->leased += static_cast<std::uint32_t>(sent);
    total_leased += sent;
    stats.dispatched.fetch_add(sent, std::memory_order_relaxed);
    send(best->routing_id, std::move(frames));
    mark_ready(s);
  }
}

// Drops the session's queued statements and leases; workers holding it get
// END_SESSION so they abort its transfers (§4.4). The session itself stays
// unless it is being closed.
void Broker::Impl::end_session(SessionState& s) {
  for (const auto& [index, lease] : s.leases) {
    auto w = workers.find(lease.worker);
    if (w != workers.end() && w->second.leased > 0) --w->second.leased;
  }
  total_leased -= s.leases.size();
  total_pending -= s.pending.size();
  s.leases.clear();
  s.pending.clear();
  for (const auto& rid : s.workers) {
    auto w = workers.find(rid);
    if (w == workers.end()) continue;
    w->second.sessions.erase(s.id);
    send(rid, proto::Encode(proto::Command::kEndSession, proto::SessionRef{s.id}));
  }
  s.workers.clear();
}

void Broker::Impl::remove_worker(const std::string& routing_id, const char* why) {
  auto it = workers.find(routing_id);
  if (it == workers.end()) return;
  Logger().warn("broker: worker {} removed: {}", it->second.worker_id, why);
  for (const SessionId& sid : it->second.sessions) {
    auto s = sessions.find(sid);
    if (s == sessions.end()) continue;
    s->second.workers.erase(routing_id);
    // Its statements go back to the front of the queue, in index order, so
    // nothing is lost (DESIGN §5.1).
    std::vector<proto::WireStatement> back;
    for (auto l = s->second.leases.begin(); l != s->second.leases.end();) {
      if (l->second.worker == routing_id) {
        back.push_back(std::move(l->second.statement));
        l = s->second.leases.erase(l);
      } else {
        ++l;
      }
    }
    std::sort(back.begin(), back.end(), [](const auto& a, const auto& b) { return a.index < b.index; });
    stats.requeued.fetch_add(back.size(), std::memory_order_relaxed);
    total_leased -= back.size();
    total_pending += back.size();
    s->second.pending.insert(s->second.pending.begin(), std::make_move_iterator(back.begin()),
                             std::make_move_iterator(back.end()));
    mark_ready(s->second);
  }
  workers.erase(it);
}

void Broker::Impl::on_results(const std::string& peer, std::span<zmq::message_t> body) {
  auto w = workers.find(peer);
  if (w == workers.end()) {
    // A worker the broker does not know (it restarted): ask it to register.
    send_error(peer, StatusCode::kNotFound, "unknown worker; send READY", std::nullopt);
    return;
  }
  w->second.last_seen = Clock::now();
  auto index = proto::DecodeResultsIndex(body);
  if (!index) return malformed(peer, index.error());
  auto s = sessions.find(index->session);
  if (s == sessions.end()) return;  // closed meanwhile: results are dropped
  SessionState& session = s->second;
  // Settle leases. A result for an index not leased to this worker is a
  // duplicate or belongs to a cancelled batch; it is dropped here (§4.3).
  std::vector<bool> keep(index->indices.size(), true);
  std::size_t kept = 0;
  for (std::size_t i = 0; i < index->indices.size(); ++i) {
    auto l = session.leases.find(index->indices[i]);
    if (l == session.leases.end() || l->second.worker != peer) {
      keep[i] = false;
      continue;
    }
    session.leases.erase(l);
    --total_leased;
    if (w->second.leased > 0) --w->second.leased;
    ++kept;
  }
  stats.results.fetch_add(kept, std::memory_order_relaxed);
  stats.duplicates_dropped.fetch_add(index->indices.size() - kept, std::memory_order_relaxed);
  if (kept == index->indices.size()) {
    // Fast path: forward the worker's frames to the client untouched.
    proto::Frames frames;
    frames.reserve(body.size());
    for (auto& f : body) frames.push_back(std::move(f));
    send(session.client, std::move(frames));
  } else if (kept > 0) {
    auto full = proto::DecodeResults(body);
    if (!full) return malformed(peer, full.error());
    proto::Results filtered{full->session, {}};
    for (std::size_t i = 0; i < full->results.size(); ++i) {
      if (keep[i]) filtered.results.push_back(std::move(full->results[i]));
    }
    send(session.client, proto::Encode(std::move(filtered)));
  }
  mark_ready(session);
}

void Broker::Impl::on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  if (command == proto::Command::kReady) {
    auto ready_msg = proto::DecodeReady(body);
    if (!ready_msg) return malformed(peer, ready_msg.error());
    auto [it, inserted] = workers.try_emplace(peer);
    WorkerState& w = it->second;
    w.routing_id = peer;
    w.worker_id = ready_msg->worker_id;
    w.host = ready_msg->host;
    w.slots = ready_msg->slots;
    w.last_seen = Clock::now();
    Logger().info("broker: worker {} on {} ready with {} slots{}", w.worker_id, w.host, w.slots,
                  inserted ? "" : " (re-registered)");
    return;
  }
  on_results(peer, body);
}

void Broker::Impl::on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  using proto::Command;
  if (command == Command::kOpen) {
    auto open = proto::DecodeOpen(body);
    if (!open) return malformed(peer, open.error());
    auto it = sessions.find(open->session);
    if (it == sessions.end()) {
      if (sessions.size() >= options.max_sessions) {
        return send_error(peer, StatusCode::kResourceExhausted, "broker session limit reached", open->session);
      }
      it = sessions.try_emplace(open->session).first;
      Logger().debug("broker: session {} opened (window {})", open->session.ToString(), open->settings.workers);
    }
    SessionState& s = it->second;
    s.id = open->session;
    s.client = peer;
    s.last_seen = Clock::now();
    s.settings = open->settings;
    s.prefetch = open->prefetch;
    send(peer, proto::Encode(Command::kOpened, proto::SessionRef{s.id}));
    return;
  }
  if (command == Command::kSubmit) {
    auto submit = proto::DecodeStatements(body);
    if (!submit) return malformed(peer, submit.error());
    auto it = sessions.find(submit->session);
    if (it == sessions.end()) {
      return send_error(peer, StatusCode::kNotFound, "session not open", submit->session);
    }
    SessionState& s = it->second;
    s.last_seen = Clock::now();
    s.client = peer;  // a reconnected client has a new routing id
    const std::size_t cap = std::size_t{s.settings.workers} + s.prefetch + options.queue_slack;
    if (s.pending.size() + s.leases.size() + submit->statements.size() > cap) {
      return send_error(peer, StatusCode::kResourceExhausted,
                        "session queue cap exceeded (window + prefetch + slack)", s.id);
    }
    for (auto& ws : submit->statements) s.pending.push_back(std::move(ws));
    total_pending += submit->statements.size();
    mark_ready(s);
    return;
  }
  if (command == Command::kCancel || command == Command::kClose) {
    auto ref = proto::DecodeSessionRef(body);
    if (!ref) return malformed(peer, ref.error());
    auto it = sessions.find(ref->session);
    if (it != sessions.end()) {
      end_session(it->second);
      if (command == Command::kClose) {
        sessions.erase(it);
        Logger().debug("broker: session {} closed", ref->session.ToString());
      }
    }
    if (command == Command::kClose) send(peer, proto::Encode(Command::kClosed, *ref));
    return;
  }
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
  switch (*command) {
    case Command::kOpen: case Command::kSubmit: case Command::kCancel: case Command::kClose:
      on_client(peer, *command, body);
      break;
    case Command::kReady: case Command::kResults:
      on_worker(peer, *command, body);
      break;
    case Command::kHeartbeat: {
      auto w = workers.find(peer);
      if (w != workers.end()) {
        w->second.last_seen = Clock::now();
        break;
      }
      auto named = proto::DecodeHeartbeat(body);
      if (!named) return malformed(peer, named.error());
      if (*named) {
        // §3.2.7: a client's heartbeat keeps its session alive; a session
        // this broker does not have (it restarted, or the TTL ran out) is
        // reported so the client re-opens it (§3.2.8).
        auto s = sessions.find(**named);
        if (s == sessions.end()) {
          return send_error(peer, StatusCode::kNotFound, "session not open", **named);
        }
        s->second.last_seen = Clock::now();
        s->second.client = peer;
      }
      send(peer, proto::EncodeHeartbeat());
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
  const auto dead_after = options.heartbeat_interval * options.heartbeat_liveness;
  std::vector<std::string> dead;
  for (auto& [rid, w] : workers) {
    if (now - w.last_seen > dead_after) dead.push_back(rid);
    else send(rid, proto::EncodeHeartbeat());
  }
  for (const auto& rid : dead) remove_worker(rid, "missed heartbeats");
  // DESIGN §5.5: a silent client's session is cancelled everywhere.
  for (auto it = sessions.begin(); it != sessions.end();) {
    if (now - it->second.last_seen > options.session_ttl) {
      Logger().warn("broker: session {} expired: its client was silent for {} ms", it->first.ToString(),
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
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_heartbeat - Clock::now());
    try {
      zmq::poll(items, 2, std::max(wait, std::chrono::milliseconds(0)));
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) break;
      if (e.num() != EINTR) Logger().error("broker: poll failed: {}", e.what());
      continue;
    }
    if (items[0].revents & ZMQ_POLLIN) {
      // Drain a bounded number per wake so heartbeats are never starved.
      try {
        for (int i = 0; i < 4096 && proto::ReceiveMessage(*router, frames); ++i) handle(frames);
      } catch (const zmq::error_t&) {
        return;  // context terminated
      }
    }
    heartbeat();
    // Once per pass, after messages and expiries changed credit and queues.
    dispatch();
    update_gauges();
  }
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
  m.router = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::router);
  m.router->set(zmq::sockopt::router_mandatory, 1);
  protocol::ConfigureSocket(*m.router);
  m.bound.clear();
  for (const auto& ep : m.options.endpoints) {
    try {
      m.router->bind(ep);
    } catch (const zmq::error_t& e) {
      m.router.reset();
      return Unavailable("cannot bind " + ep + ": " + e.what());
    }
    m.bound.push_back(m.router->get(zmq::sockopt::last_endpoint));
  }
  m.wake = std::make_unique<WakeFd>();
  m.stopping.store(false);
  m.thread = std::thread([&m] { m.run(); });
  Logger().info("broker: listening on {}", fmt::join(m.bound, ", "));
  return Status::Ok();
}

void Broker::stop() {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return;
  m.stopping.store(true, std::memory_order_release);
  m.wake->signal();
  m.thread.join();
  m.router.reset();
  m.wake.reset();
}

const std::vector<std::string>& Broker::endpoints() const { return impl_->bound; }

const BrokerStats& Broker::stats() const { return impl_->stats; }

}  // namespace gatherer
