#include "broker_impl.h"

namespace gatherer {

namespace {

// Moves the back half of `group` out (the front half stays, order kept):
// how quarantine groups are split (§4.5).
std::vector<proto::HeldStatement> TakeBackHalf(std::vector<proto::HeldStatement>& group) {
  const auto mid = group.begin() + static_cast<std::ptrdiff_t>(group.size() / 2);
  std::vector<proto::HeldStatement> back(std::make_move_iterator(mid), std::make_move_iterator(group.end()));
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

// A worker's leases outlive it (PROTOCOL.md §4.5, §3.4.7): a non-idempotent
// statement fails as "outcome unknown" (it may have reached the server); the
// others are queued again when the worker left, or quarantined when it died,
// and a statement that keeps killing the workers that run it alone fails as
// poison after options.poison_after deaths.
void BrokerCore::remove_worker(const std::string& routing_id, Departure how, const char* why) {
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
  for (const auto& [sid, hold] : w.sessions) {
    auto s = sessions.find(sid);
    if (s == sessions.end()) continue;
    SessionState& session = s->second;
    session.workers.erase(routing_id);
    std::vector<proto::HeldStatement> held;
    for (auto l = session.leases.begin(); l != session.leases.end();) {
      if (l->second.worker == w.serial) {
        if (session.rate) session.rate->answered(l->first, now());  // out of flight (§3.8.3)
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
    std::vector<proto::HeldStatement> again;
    again.reserve(held.size());
    for (auto& ws : held) {
      if (!ws.idempotent()) {
        failed.results.push_back(Failure(
            ws.index, StatusCode::kUnknown,
            fmt::format("outcome unknown: worker {} {} while this {} was in its hands; not sent again "
                        "(non-idempotent)",
                        w.worker_id, how == Departure::kDied ? "died" : "left", ws.method()),
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

void BrokerCore::release_quarantine_worker() {
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
void BrokerCore::dispatch_quarantine() {
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
      std::deque<proto::HeldStatement> rest(std::make_move_iterator(group.begin()),
                                            std::make_move_iterator(group.end()));
      group.clear();
      wake_at(s, s.rate->take(rest, rest.size(), now(), group));
      if (!rest.empty()) {
        s.quarantine.insert(s.quarantine.begin() + 1,
                            std::vector<proto::HeldStatement>(std::make_move_iterator(rest.begin()),
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
    std::vector<proto::HeldStatement> chunk = std::move(group);
    s.quarantine.pop_front();
    --quarantine_groups;
    quarantined.pop_front();
    if (!s.quarantine.empty()) quarantined.push_back(sid);
    std::erase_if(chunk, [&](const proto::HeldStatement& ws) {
      return !s.leases.try_emplace(ws.index, Lease{worker.serial, {}}).second;
    });
    if (!chunk.empty()) {
      // A group runs alone on its worker: as many connections as statements.
      const auto held = worker.sessions.find(sid);
      const std::uint32_t share = held != worker.sessions.end()
                                      ? std::max(held->second.share, static_cast<std::uint32_t>(chunk.size()))
                                      : static_cast<std::uint32_t>(chunk.size());
      if (ensure_session(s, worker, share) && send_dispatch(s, worker, chunk)) {
        worker.isolated = true;
      } else {
        // The worker cannot be reached: the group waits for the next turn.
        for (const auto& ws : chunk) s.leases.erase(ws.index);
        s.quarantine.push_front(std::move(chunk));
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

}  // namespace gatherer
