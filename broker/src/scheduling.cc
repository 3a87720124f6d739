#include "broker_impl.h"

namespace gatherer {

void BrokerCore::mark_ready(SessionState& s) {
  if (!s.in_ready && s.quarantine.empty() && !s.pending.empty() && s.leases.size() < s.settings.workers) {
    s.in_ready = true;
    ready.push_back(s.id);
  }
}

// §3.8: a session gets rate state when it declares limits or learns them
// (the broker's default rules stand in for undeclared ones); workers see
// the rules in its settings and hand 429s back instead of retrying them.
void BrokerCore::open_rate(SessionState& s) {
  if (s.settings.rate_limits.empty() && !options.rate_limits.empty()) s.settings.rate_limits = options.rate_limits;
  if (s.rate || !s.settings.rate_aware()) return;
  s.rate = std::make_unique<broker::SessionRate>(s.settings, options.rate_limits);
  broker::SessionRate::Bind(*s.rate, limiter);
}

// Takes what the session's keys allow now; when something is left waiting
// on a key, the session sleeps until that key allows it.
std::size_t BrokerCore::take_limited(SessionState& s, std::size_t n, std::vector<proto::WireStatement>& out) {
  const std::size_t before = out.size();
  const auto at = now();
  wake_at(s, s.rate->take(s.pending, n, at, out));
  if (out.size() > before) s.last_grant = at;
  return out.size() - before;
}

// The session is looked at again at `wake` (kNever: not at all).
void BrokerCore::wake_at(SessionState& s, Clock::time_point wake) {
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

void BrokerCore::wake_rate_waiting() {
  if (rate_waiting.empty()) return;
  const auto now = this->now();
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
    woken_scratch.push_back(&it->second);
    return true;
  });
  // Sessions sharing a key take turns: the one granted longest ago goes
  // first, or the first woken would win the key every time.
  std::sort(woken_scratch.begin(), woken_scratch.end(),
            [](const SessionState* a, const SessionState* b) { return a->last_grant < b->last_grant; });
  for (SessionState* s : woken_scratch) mark_ready(*s);
  woken_scratch.clear();
}

// Credit-based, round-robin across sessions (PROTOCOL.md §4.2): each pass
// gives the next ready session one chunk, sized by its free window and the
// credit of the worker with the most free slots.
void BrokerCore::dispatch() {
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
bool BrokerCore::send_order(WorkerState& w, proto::Frames&& frames) {
  if (!send(w.routing_id, std::move(frames))) {
    w.reachable = false;
    return false;
  }
  ++w.order_seq;
  return true;
}

// SESSION before the first DISPATCH of a session to a worker (§3.5.1).
bool BrokerCore::ensure_session(SessionState& s, WorkerState& w) {
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
bool BrokerCore::send_dispatch(SessionState& s, WorkerState& w, proto::Statements& chunk) {
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
void BrokerCore::requeue_front(SessionState& s, std::vector<proto::WireStatement>&& statements) {
  if (statements.empty()) return;
  total_pending += statements.size();
  s.pending.insert(s.pending.begin(), std::make_move_iterator(statements.begin()),
                   std::make_move_iterator(statements.end()));
  mark_ready(s);
}

// Numbers, keeps and sends one RESULTS message to the session's client
// (§3.6). Kept until the client acknowledges it, so a connection that drops
// on the way loses nothing: SYNC sends it again.
void BrokerCore::deliver(SessionState& s, proto::Frames&& frames, std::vector<std::uint64_t>&& indices) {
  proto::RestampResults(frames, s.id, ++s.results_seq);
  s.retained.push_back(Retained{s.results_seq, std::move(indices), proto::CopyFrames(frames)});
  send(s.client, std::move(frames));
}

// Results the broker itself answers (outcome unknown, poison).
void BrokerCore::deliver_failures(SessionState& s, proto::Results&& results) {
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
void BrokerCore::send_acks() {
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
void BrokerCore::end_session(SessionState& s) {
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

}  // namespace gatherer
