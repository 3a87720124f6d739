#include "broker_impl.h"

#include <numeric>
#include <span>

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
std::size_t BrokerCore::take_limited(SessionState& s, std::size_t n, std::vector<proto::HeldStatement>& out) {
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

// The workers that take ordinary dispatch (not draining, not set aside for
// quarantine), by serial. When they change, each session's window is shared
// out anew, so every session with work is looked at again: one that had no
// room left in its workers' shares may have some now.
void BrokerCore::update_roster() {
  roster.clear();
  for (auto& [rid, w] : workers) {
    if (!w.draining && !w.reserved && w.slots > 0) roster.push_back(&w);
  }
  std::sort(roster.begin(), roster.end(), [](const WorkerState* a, const WorkerState* b) { return a->serial < b->serial; });
  roster_slots.clear();
  for (const WorkerState* w : roster) roster_slots.push_back(w->slots);
  bool same = roster.size() == roster_serials.size();
  for (std::size_t i = 0; same && i < roster.size(); ++i) same = roster[i]->serial == roster_serials[i];
  if (same) return;
  roster_serials.clear();
  for (const WorkerState* w : roster) roster_serials.push_back(w->serial);
  for (auto& [sid, s] : sessions) mark_ready(s);
}

// §4.2: `window` shared out over workers that hold `slots` statements each:
// evenly, none past its slots (what one cannot hold goes to the others), and
// what the division leaves one each to the workers from `first` on.
void ShareOut(std::uint32_t window, std::span<const std::uint32_t> slots, std::size_t first,
              std::vector<std::uint32_t>& shares) {
  const std::size_t n = slots.size();
  shares.assign(slots.begin(), slots.end());
  if (std::accumulate(slots.begin(), slots.end(), std::uint64_t{0}) <= window) return;
  auto filled = [&](std::uint32_t level) {
    std::uint64_t sum = 0;
    for (std::uint32_t c : slots) sum += std::min(c, level);
    return sum;
  };
  // The highest level that the window fills for every worker below it.
  std::uint32_t low = 0, high = window;
  while (low < high) {
    const std::uint32_t mid = low + (high - low + 1) / 2;
    if (filled(mid) <= window) {
      low = mid;
    } else {
      high = mid - 1;
    }
  }
  std::uint64_t left = window - filled(low);
  for (std::size_t i = 0; i < n; ++i) shares[i] = std::min(slots[i], low);
  for (std::size_t k = 0; k < n && left > 0; ++k) {
    const std::size_t i = (first + k) % n;
    if (shares[i] < slots[i]) {
      ++shares[i];
      --left;
    }
  }
}

// Credit-based, round-robin across sessions (PROTOCOL.md §4.2): each pass
// gives the next ready session one chunk for the worker with the most credit
// among those with room left in their share of the session's window. The
// window is shared out between the workers of the roster (ShareOut), the
// remainder going to the first ones from a place each session picks, so a
// session never holds more connections across workers than its window.
void BrokerCore::dispatch() {
  update_roster();
  const std::size_t roster_size = roster.size();
  while (!ready.empty() && roster_size > 0) {
    const SessionId sid = ready.front();
    ready.pop_front();
    auto it = sessions.find(sid);
    if (it == sessions.end()) continue;
    SessionState& s = it->second;
    s.in_ready = false;
    if (!s.quarantine.empty()) continue;  // marked ready again once it is empty
    const std::uint32_t window = s.settings.workers;
    const std::size_t window_room = window > s.leases.size() ? window - s.leases.size() : 0;
    if (window_room == 0 || s.pending.empty()) continue;
    ShareOut(window, roster_slots, std::hash<SessionId>{}(s.id) % roster_size, shares_scratch);
    WorkerState* best = nullptr;
    std::uint32_t best_share = 0, best_room = 0;
    bool waits_for_credit = false;
    for (std::size_t i = 0; i < roster_size; ++i) {
      WorkerState& w = *roster[i];
      const std::uint32_t share = shares_scratch[i];
      const auto held = w.sessions.find(s.id);
      const std::uint32_t leased = held == w.sessions.end() ? 0 : held->second.leased;
      if (leased >= share) continue;
      if (w.credit() == 0) {
        waits_for_credit = true;
        continue;
      }
      if (!best || w.credit() > best->credit()) {
        best = &w;
        best_share = share;
        best_room = share - leased;
      }
    }
    if (!best) {
      // Room only with workers that are full now: its turn comes again after
      // this pass. No room at all: a result or a new roster marks it ready.
      if (waits_for_credit) {
        s.in_ready = true;
        deferred_scratch.push_back(sid);
      }
      continue;
    }
    const std::size_t n = std::min({window_room, static_cast<std::size_t>(best_room),
                                    static_cast<std::size_t>(best->credit()),
                                    static_cast<std::size_t>(options.max_chunk), s.pending.size()});
    if (!ensure_session(s, *best, best_share)) {
      mark_ready(s);
      continue;  // unreachable: it has no credit now, another worker is tried
    }
    std::vector<proto::HeldStatement> chunk;
    chunk.reserve(n);
    std::size_t popped = 0;
    if (s.rate) {
      // §3.8: only what every key allows now, from anywhere in the queue.
      popped = take_limited(s, n, chunk);
      std::erase_if(chunk, [&](const proto::HeldStatement& ws) {
        return !s.leases.try_emplace(ws.index, Lease{best->serial, {}}).second;
      });
    }
    while (!s.rate && chunk.size() < n && !s.pending.empty()) {
      proto::HeldStatement ws = std::move(s.pending.front());
      s.pending.pop_front();
      ++popped;
      // A client that re-opened its session resubmits what it has not been
      // answered (§3.2.8): an index already leased is not sent twice.
      if (!s.leases.try_emplace(ws.index, Lease{best->serial, {}}).second) continue;
      chunk.push_back(std::move(ws));
    }
    total_pending -= popped;
    if (chunk.empty()) {
      if (!s.rate || popped > 0) mark_ready(s);  // a rate-limited one waits for its wake time
      continue;
    }
    if (!send_dispatch(s, *best, chunk)) requeue_front(s, std::move(chunk));
    mark_ready(s);
  }
  for (const SessionId& sid : deferred_scratch) ready.push_back(sid);
  deferred_scratch.clear();
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

// SESSION before the first DISPATCH of a session to a worker (§3.5.1), and
// again when the worker's share of the window has changed (§3.5.4): the
// settings it carries give that share as `workers`.
bool BrokerCore::ensure_session(SessionState& s, WorkerState& w, std::uint32_t share) {
  auto held = w.sessions.find(s.id);
  if (held != w.sessions.end() && held->second.share == share) return true;
  proto::Session order{s.id, s.settings, w.order_seq + 1};
  order.settings.workers = share;
  if (!send_order(w, proto::Encode(order))) return false;
  if (held != w.sessions.end()) {
    held->second.share = share;
    return true;
  }
  w.sessions.emplace(s.id, WorkerState::Held{w.order_seq, 0, share});
  s.workers.insert(w.routing_id);
  return true;
}

// DISPATCH of `chunk`, whose indices are already leased to `w` (with empty
// statements): each statement moves into its lease once sent. When the
// worker cannot be reached the leases are undone and `chunk` is left whole
// for the caller to queue again.
bool BrokerCore::send_dispatch(SessionState& s, WorkerState& w, std::vector<proto::HeldStatement>& chunk) {
  if (!send_order(w, proto::EncodeDispatch(s.id, chunk, w.order_seq + 1))) {
    for (const auto& ws : chunk) s.leases.erase(ws.index);
    return false;
  }
  for (auto& ws : chunk) {
    Lease& lease = s.leases[ws.index];
    lease.statement = std::move(ws);
    lease.seq = w.order_seq;
  }
  const std::size_t sent = chunk.size();
  w.leased += static_cast<std::uint32_t>(sent);
  if (auto held = w.sessions.find(s.id); held != w.sessions.end()) held->second.leased += static_cast<std::uint32_t>(sent);
  total_leased += sent;
  stats.dispatched.fetch_add(sent, std::memory_order_relaxed);
  return true;
}

// Statements that never reached a worker go back to the front of their
// session's queue, in index order.
void BrokerCore::requeue_front(SessionState& s, std::vector<proto::HeldStatement>&& statements) {
  if (statements.empty()) return;
  if (s.rate) {
    for (const auto& ws : statements) s.rate->answered(ws.index, now());  // out of flight (§3.8.3)
  }
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
  if (s.rate) {
    for (const auto& r : results.results) s.rate->answered(r.index, now());  // given up: out of flight (§3.8.3)
  }
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
  if (s.rate) s.rate->answered_all(now());  // its requests in flight are given up (§3.8.3)
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
