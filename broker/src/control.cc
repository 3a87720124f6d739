#include "broker_impl.h"

namespace gatherer {

// ---- Operations (PROTOCOL.md §3.9): figures and control requests ----

// `n` statements of `s` answered to its client, `failed` of them with an
// error; `w` is the worker that answered them (nullptr: the broker did).
// Plain loop-thread counters plus relaxed atomics: no lock, no allocation.
void BrokerCore::answered(SessionState& s, WorkerState* w, std::uint64_t n, std::uint64_t failed,
                            std::uint64_t retries) {
  if (n == 0) return;
  const auto now = this->now();
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

void BrokerCore::on_control(const std::string& peer, proto::Command command, std::span<zmq::message_t> body) {
  using proto::Command;
  const auto now = this->now();
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
void BrokerCore::publish_metrics() {
  const auto now = this->now();
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

}  // namespace gatherer
