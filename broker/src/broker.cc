#include "broker_impl.h"
#include "gatherer/event_loop.h"

namespace gatherer {

bool BrokerCore::send(const std::string& peer, proto::Frames&& frames) {
  // Gauges are published before every message, so a peer that got a reply
  // (CLOSED, say) reads stats at least as fresh as that reply.
  update_gauges();
  const auto result = out.send(peer, frames);
  if (result == proto::SendResult::kSent) return true;
  // A gone peer (ROUTER_MANDATORY) or a full queue: the message is dropped;
  // leases and heartbeats recover what it carried.
  log().debug("broker: cannot send to a peer ({})",
                 result == proto::SendResult::kUnreachable ? "unreachable" : "queue full or error");
  return false;
}

void BrokerCore::send_error(const std::string& peer, StatusCode code, std::string message,
                              std::optional<SessionId> session) {
  send(peer, proto::Encode(proto::ErrorReply{code, std::move(message), session}));
}

// §2.4: counted, logged at most once a second, dropped; and a peer the
// broker knows — a registered worker, or a client whose message names a
// session — is told what was wrong, so it never waits on silence.
void BrokerCore::malformed(const std::string& peer, const Status& status, std::span<const zmq::message_t> body) {
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

// O(1): the totals are kept up to date where statements move, so the loop
// can publish them on every pass.
void BrokerCore::update_gauges() {
  stats.queued.store(total_pending, std::memory_order_relaxed);
  stats.in_flight.store(total_leased, std::memory_order_relaxed);
  stats.sessions.store(sessions.size(), std::memory_order_relaxed);
  stats.workers.store(workers.size(), std::memory_order_relaxed);
}

void BrokerCore::handle(std::vector<zmq::message_t>& frames) {
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
        w->second.last_seen = now();
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
      session.last_seen = now();
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

void BrokerCore::heartbeat() {
  const auto now = this->now();
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

void BrokerCore::pass() {
  heartbeat();
  wake_rate_waiting();
  // Once per pass, after messages and expiries changed credit and queues.
  dispatch_quarantine();
  dispatch();
  send_acks();
  update_gauges();
}

// ---- gatherer::Broker: the shell around a BrokerCore ----

struct Broker::Impl final : Outbound, LoopPart {
  explicit Impl(BrokerOptions o) : core(std::move(o), *this) {}

  proto::SendResult send(const std::string& peer, proto::Frames& frames) override {
    return proto::SendMessage(*router, peer, frames);
  }
  std::size_t add_to(PollSet& poll) override {
    const std::size_t first = poll.add(*router);
    poll.add(*wake);  // drain() and stop(): drained by the poll step
    return first;
  }
  std::uint64_t generation() const override { return 0; }
  // Up to the next heartbeat, or the next time a rate key allows a waiting
  // statement (the shell gives the core the steady clock).
  Clock::time_point next_due() const override { return core.next_due(); }
  Step step(const PollSet* poll, std::size_t first) override {
    if (stopping.load(std::memory_order_acquire)) return Step::kDone;
    // A bounded number per pass, so heartbeats are never starved. On its
    // own thread the poll is the whole truth; driven beside a worker, the
    // worker may have sent since the poll.
    std::size_t taken = 0;
    const bool look = !core.options.own_thread || poll == nullptr || poll->ready(first);
    if (look && !ReceiveBatch(*router, frames, 4096, [&](auto& f) {
          core.handle(f);
          ++taken;
        })) {
      return Step::kDone;
    }
    core.pass();
    return taken > 0 ? Step::kBusy : Step::kIdle;
  }
  void run();

  // Declared first, destroyed last: what it keeps outlives the socket.
  BrokerCore core;
  std::unique_ptr<zmq::context_t> own_context;
  zmq::context_t* context = nullptr;
  std::unique_ptr<zmq::socket_t> router;
  std::unique_ptr<ZapHandler> zap;  // CURVE only; destroyed before the context
  std::vector<std::string> bound;
  std::unique_ptr<WakeFd> wake;
  std::atomic<bool> stopping{false};
  bool started = false;
  std::vector<zmq::message_t> frames;
  std::thread thread;
};

void Broker::Impl::run() {
  PollSet poll;
  add_to(poll);
  while (poll.wait_until(next_due()) && step(&poll, 0) != Step::kDone) {
  }
}

std::string Broker::metrics_text() const {
  std::string detail;
  {
    std::lock_guard lock(impl_->core.metrics_mutex);
    detail = impl_->core.metrics_snapshot;
  }
  return broker_ops::RenderBrokerMetrics(impl_->core.stats, impl_->core.figures.started, detail);
}

Broker::Broker(BrokerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {}

Broker::~Broker() { stop(); }

Status Broker::start() {
  Impl& m = *impl_;
  BrokerCore& core = m.core;
  if (m.started) return FailedPrecondition("broker already started");
  if (core.options.context) {
    m.context = core.options.context;
  } else {
    m.own_context = std::make_unique<zmq::context_t>(1);
    m.context = m.own_context.get();
  }
  if (core.curve()) {
    if (core.options.curve_clients.empty() || core.options.curve_workers.empty()) {
      return InvalidArgument("CURVE needs the public keys of the clients and of the workers to admit");
    }
    std::unordered_set<std::string> admitted = core.options.curve_clients;
    admitted.insert(core.options.curve_workers.begin(), core.options.curve_workers.end());
    admitted.insert(core.options.curve_operators.begin(), core.options.curve_operators.end());
    m.zap = std::make_unique<ZapHandler>(*m.context, std::move(admitted), core.log());
    if (Status s = m.zap->start(); !s.ok()) {
      m.zap.reset();
      return s;
    }
  }
  m.router = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::router);
  if (core.curve()) MakeCurveServer(*m.router, core.options.curve_key);
  m.router->set(zmq::sockopt::router_mandatory, 1);
  // §1.5: a peer that reconnects under its routing id takes its route over
  // from the connection it left behind (which may not have noticed yet).
  m.router->set(zmq::sockopt::router_handover, 1);
  protocol::ConfigureSocket(*m.router, core.options.heartbeat_interval);
  m.bound.clear();
  for (const auto& ep : core.options.endpoints) {
    try {
      m.router->bind(ep);
    } catch (const zmq::error_t& e) {
      m.router.reset();
      return Unavailable("cannot bind " + ep + ": " + e.what());
    }
    m.bound.push_back(m.router->get(zmq::sockopt::last_endpoint));
    if (!core.curve() && !protocol::IsLoopbackEndpoint(m.bound.back())) {
      core.log().warn("broker: {} is reachable from other machines and CURVE is off: anyone who can connect can "
                      "submit work, register as a worker (and read the requests it is given) or take results; "
                      "use --curve-key with --curve-clients and --curve-workers",
                      m.bound.back());
    }
  }
  m.wake = std::make_unique<WakeFd>();
  m.stopping.store(false);
  core.next_heartbeat = core.now() + core.options.heartbeat_interval;
  m.started = true;
  if (core.options.own_thread) m.thread = std::thread([&m] { m.run(); });
  core.log().info("broker: listening on {}", fmt::join(m.bound, ", "));
  return Status::Ok();
}

void Broker::stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.started = false;
  m.stopping.store(true, std::memory_order_release);
  m.wake->signal();
  if (m.thread.joinable()) m.thread.join();
  m.router.reset();
  m.zap.reset();
  m.wake.reset();
}

void Broker::drain() {
  Impl& m = *impl_;
  m.core.drain_requested.store(true, std::memory_order_release);
  if (m.wake) m.wake->signal();
}

LoopPart& Broker::loop() { return *impl_; }

const std::vector<std::string>& Broker::endpoints() const { return impl_->bound; }

const BrokerStats& Broker::stats() const { return impl_->core.stats; }

}  // namespace gatherer
