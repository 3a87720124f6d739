#include "broker_impl.h"

namespace gatherer {

void BrokerCore::on_results(const std::string& peer, std::span<zmq::message_t> body) {
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
  worker.last_seen = now();
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
  std::vector<proto::HeldStatement> throttled;  // 429s to run again (§3.8)
  auto report = index->rates.begin();
  for (std::size_t i = 0; i < index->indices.size(); ++i) {
    auto l = session.leases.find(index->indices[i]);
    if (l == session.leases.end() || l->second.worker != worker.serial) {
      keep[i] = false;
      continue;
    }
    while (report != index->rates.end() && report->first < i) ++report;
    if (session.rate) session.rate->answered(index->indices[i], now());  // §3.8.3: its windows count from now
    if (session.rate && report != index->rates.end() && report->first == i) {
      if (report->second.throttled) stats.throttled.fetch_add(1, std::memory_order_relaxed);
      if (session.rate->learn(l->second.statement, report->second, now())) {
        keep[i] = false;  // not forwarded: it runs again once its key allows
        throttled.push_back(std::move(l->second.statement));
        session.leases.erase(l);
        --total_leased;
        worker.release(session.id, 1);
        continue;
      }
    }
    if (session.rate) session.rate->settled(index->indices[i]);
    session.leases.erase(l);
    --total_leased;
    worker.release(session.id, 1);
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
void BrokerCore::on_holding(const std::string& peer, std::span<zmq::message_t> body) {
  auto holding = proto::DecodeHolding(body);
  if (!holding) return malformed(peer, holding.error(), body);
  auto w = workers.find(peer);
  if (w == workers.end()) {
    send_error(peer, StatusCode::kNotFound, "unknown worker; send READY", std::nullopt);
    return;
  }
  WorkerState& worker = w->second;
  worker.last_seen = now();
  worker.reachable = true;
  std::unordered_map<SessionId, std::unordered_set<std::uint64_t>> held;
  for (auto& [sid, indices] : holding->sessions) held[sid].insert(indices.begin(), indices.end());
  std::vector<SessionId> touched;
  touched.reserve(worker.sessions.size());
  for (auto it = worker.sessions.begin(); it != worker.sessions.end();) {
    touched.push_back(it->first);
    if (it->second.seq <= holding->seq && !held.contains(it->first)) {
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
    std::vector<proto::HeldStatement> lost;
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
    worker.release(sid, static_cast<std::uint32_t>(lost.size()));
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
void BrokerCore::on_sync(const std::string& peer, std::span<zmq::message_t> body) {
  auto sync = proto::DecodeSync(body);
  if (!sync) return malformed(peer, sync.error(), body);
  auto it = sessions.find(sync->session);
  if (it == sessions.end()) return send_error(peer, StatusCode::kNotFound, "session not open", sync->session);
  SessionState& s = it->second;
  if (!may_touch(peer, s)) return;
  s.last_seen = now();
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

void BrokerCore::on_worker(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
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
    w.last_seen = now();
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
    w->second.last_seen = now();
    log().info("broker: worker {} draining with {} statements in hand", w->second.worker_id, w->second.leased);
    return;
  }
  on_results(peer, body);
}

void BrokerCore::on_client(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
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
      it->second.figures.opened = now();
      it->second.figures.client_host = broker_ops::PeerHost(body[0]);
      log().info("broker: session {} opened: client {} window {}", open->session.ToString(),
                 it->second.figures.client_host, open->settings.workers);
    }
    SessionState& s = it->second;
    if (!s.owner.empty() && !may_touch(peer, s)) return;
    s.id = open->session;
    s.owner = std::string(peer_key);
    s.client = peer;
    s.last_seen = now();
    s.settings = open->settings;
    s.prefetch = open->prefetch;
    open_rate(s);
    send(peer, proto::Encode(proto::Opened{s.id, static_cast<std::uint32_t>(options.heartbeat_interval.count()),
                                           static_cast<std::uint32_t>(options.session_ttl.count())}));
    return;
  }
  if (command == Command::kSubmit) {
    auto submit = proto::DecodeSubmit(body);
    if (!submit) return malformed(peer, submit.error(), body);
    auto it = sessions.find(submit->session);
    if (it == sessions.end()) {
      return send_error(peer, StatusCode::kNotFound, "session not open", submit->session);
    }
    SessionState& s = it->second;
    if (!may_touch(peer, s)) return;
    s.last_seen = now();
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
    s.last_seen = now();
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
bool BrokerCore::may_touch(const std::string& peer, const SessionState& s) {
  if (!curve() || s.owner == peer_key) return true;
  stats.denied.fetch_add(1, std::memory_order_relaxed);
  send_error(peer, StatusCode::kPermissionDenied, "session belongs to another key", s.id);
  return false;
}

}  // namespace gatherer
