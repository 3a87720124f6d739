#include "stats.h"

#include <fmt/format.h>

#include "gatherer/prometheus.h"

namespace gatherer::broker_ops {

const char* WorkerStateName(bool draining, std::chrono::milliseconds silent, std::chrono::milliseconds heartbeat,
                            std::uint32_t leased) {
  if (draining) return "draining";
  if (silent > 2 * heartbeat) return "unresponsive";
  return leased > 0 ? "busy" : "idle";
}

std::string PeerHost(const zmq::message_t& frame) {
  // zmq_msg_gets returns NULL (EINVAL) when the transport sets no such property.
  const char* address = zmq_msg_gets(const_cast<zmq_msg_t*>(frame.handle()), "Peer-Address");
  return address ? std::string(address) : std::string("local");
}

const char* Version() { return GATHERER_VERSION; }

std::vector<protocol::RateKeyRow> RateKeyRows(const broker::RateLimiter& limiter, Clock::time_point now) {
  std::vector<protocol::RateKeyRow> rows;
  const auto keys = limiter.busiest(protocol::kMaxStatusRateKeys);
  rows.reserve(keys.size());
  for (const auto& k : keys) {
    // Rounded up: a key paused for a fraction of a millisecond more is still paused.
    const auto left =
        k.paused_until > now ? std::chrono::ceil<std::chrono::milliseconds>(k.paused_until - now).count() : 0;
    rows.push_back({k.key, k.windows, k.used, k.throttled, static_cast<std::uint64_t>(left)});
  }
  return rows;
}

std::string WindowSeconds(std::uint32_t window_ms) {
  const std::string one = FormatRateWindows({{1, window_ms}});  // "1:SECONDS"
  return one.substr(one.find(':') + 1);
}

std::string RenderDetail(const std::vector<WorkerMetric>& workers, const std::vector<SessionMetric>& sessions,
                         const std::vector<protocol::RateKeyRow>& rate_keys) {
  std::string out;
  out.reserve(256 + 600 * workers.size() + 300 * sessions.size() + 400 * rate_keys.size());
  const auto per_worker = [&](const char* name, const char* type, const char* help, auto value) {
    PrometheusHeader(out, name, type, help);
    for (const auto& w : workers) {
      out += fmt::format("{}{{worker=\"{}\",host=\"{}\"}} {}\n", name, PrometheusLabel(w.worker_id), PrometheusLabel(w.host), value(w));
    }
  };
  per_worker("gatherer_broker_worker_slots", "gauge", "Statements the worker takes at once.",
             [](const WorkerMetric& w) { return std::to_string(w.slots); });
  per_worker("gatherer_broker_worker_in_flight", "gauge", "Statements leased to the worker.",
             [](const WorkerMetric& w) { return std::to_string(w.in_flight); });
  per_worker("gatherer_broker_worker_done_total", "counter", "Statements the worker answered.",
             [](const WorkerMetric& w) { return std::to_string(w.done); });
  per_worker("gatherer_broker_worker_failed_total", "counter", "Statements the worker answered with an error.",
             [](const WorkerMetric& w) { return std::to_string(w.failed); });
  per_worker("gatherer_broker_worker_heartbeat_age_seconds", "gauge", "Time since the worker was last heard from.",
             [](const WorkerMetric& w) { return fmt::format("{:.3f}", w.heartbeat_age_s); });
  PrometheusHeader(out, "gatherer_broker_worker_state", "gauge", "1 for the worker's state (busy, idle, draining, unresponsive).");
  for (const auto& w : workers) {
    for (const char* state : {"busy", "idle", "draining", "unresponsive"}) {
      out += fmt::format("gatherer_broker_worker_state{{worker=\"{}\",state=\"{}\"}} {}\n", PrometheusLabel(w.worker_id), state,
                         std::string_view(state) == w.state ? 1 : 0);
    }
  }
  const auto per_session = [&](const char* name, const char* type, const char* help, auto value) {
    PrometheusHeader(out, name, type, help);
    for (const auto& s : sessions) out += fmt::format("{}{{session=\"{}\"}} {}\n", name, s.session, value(s));
  };
  per_session("gatherer_broker_session_window", "gauge", "The session's window (statements leased at once at most).",
              [](const SessionMetric& s) { return s.window; });
  per_session("gatherer_broker_session_queued", "gauge", "Statements of the session queued at the broker.",
              [](const SessionMetric& s) { return s.queued; });
  per_session("gatherer_broker_session_in_flight", "gauge", "Statements of the session leased to workers.",
              [](const SessionMetric& s) { return s.in_flight; });
  per_session("gatherer_broker_session_done_total", "counter", "Statements of the session answered.",
              [](const SessionMetric& s) { return s.done; });
  per_session("gatherer_broker_session_failed_total", "counter", "Statements of the session answered with an error.",
              [](const SessionMetric& s) { return s.failed; });
  // Rate keys (§3.8), the busiest kMaxStatusRateKeys only, so that a broker
  // with many hosts keeps its exposition bounded.
  static_assert(protocol::kMaxStatusRateKeys == 100, "the HELP lines below name the bound");
  const auto per_key = [&](const char* name, const char* type, const char* help, auto value) {
    PrometheusHeader(out, name, type, help);
    for (const auto& k : rate_keys) out += fmt::format("{}{{key=\"{}\"}} {}\n", name, PrometheusLabel(k.key), value(k));
  };
  per_key("gatherer_broker_rate_requests_total", "counter",
          "Requests granted under the rate key (the 100 busiest keys).",
          [](const protocol::RateKeyRow& k) { return std::to_string(k.used); });
  per_key("gatherer_broker_rate_throttled_total", "counter",
          "429 answers met under the rate key (the 100 busiest keys).",
          [](const protocol::RateKeyRow& k) { return std::to_string(k.throttled); });
  per_key("gatherer_broker_rate_paused_seconds", "gauge",
          "Time left of the rate key's pause (after a 429 or a limit with nothing remaining), 0 when not paused "
          "(the 100 busiest keys).",
          [](const protocol::RateKeyRow& k) {
            return fmt::format("{:.3f}", static_cast<double>(k.paused_ms) / 1000.0);
          });
  PrometheusHeader(out, "gatherer_broker_rate_limit", "gauge",
                   "Requests the rate key allows per window of window_seconds (the 100 busiest keys).");
  for (const auto& k : rate_keys) {
    const std::string key = PrometheusLabel(k.key);
    for (const auto& w : k.windows) {
      out += fmt::format("gatherer_broker_rate_limit{{key=\"{}\",window_seconds=\"{}\"}} {}\n", key,
                         WindowSeconds(w.window_ms), w.count);
    }
  }
  return out;
}

std::string RenderBrokerMetrics(const BrokerStats& stats, Clock::time_point started, const std::string& detail) {
  std::string out;
  out.reserve(4096 + detail.size());
  const auto one = [&](const char* name, const char* type, const char* help, std::uint64_t value) {
    PrometheusHeader(out, name, type, help);
    out += fmt::format("{} {}\n", name, value);
  };
  const auto load = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  PrometheusHeader(out, "gatherer_broker_build_info", "gauge", "Always 1; the version in a label.");
  out += fmt::format("gatherer_broker_build_info{{version=\"{}\"}} 1\n", Version());
  PrometheusHeader(out, "gatherer_broker_uptime_seconds", "gauge", "Time since the broker started.");
  out += fmt::format("gatherer_broker_uptime_seconds {:.3f}\n",
                     std::chrono::duration<double>(Clock::now() - started).count());
  one("gatherer_broker_sessions", "gauge", "Open sessions.", load(stats.sessions));
  one("gatherer_broker_workers", "gauge", "Registered workers.", load(stats.workers));
  one("gatherer_broker_statements_queued", "gauge", "Statements queued at the broker.", load(stats.queued));
  one("gatherer_broker_statements_in_flight", "gauge", "Statements leased to workers.", load(stats.in_flight));
  one("gatherer_broker_statements_dispatched_total", "counter", "Statements leased to workers (each attempt).",
      load(stats.dispatched));
  one("gatherer_broker_statements_done_total", "counter", "Statements answered to their clients.", load(stats.done));
  one("gatherer_broker_statements_failed_total", "counter", "Statements answered with an error.", load(stats.failed));
  one("gatherer_broker_statements_retried_total", "counter", "Attempts beyond the first that workers reported.",
      load(stats.retried));
  PrometheusHeader(out, "gatherer_broker_statements_redispatched_total", "counter",
         "Statements queued again (their worker left or never got them) or quarantined (their worker died).");
  out += fmt::format("gatherer_broker_statements_redispatched_total{{cause=\"requeued\"}} {}\n", load(stats.requeued));
  out += fmt::format("gatherer_broker_statements_redispatched_total{{cause=\"quarantined\"}} {}\n",
                     load(stats.quarantined));
  one("gatherer_broker_statements_outcome_unknown_total", "counter",
      "Non-idempotent statements failed as outcome unknown after their worker died.", load(stats.outcome_unknown));
  one("gatherer_broker_statements_poisoned_total", "counter", "Statements failed as poison.", load(stats.poisoned));
  one("gatherer_broker_duplicates_dropped_total", "counter", "Results dropped as duplicates.",
      load(stats.duplicates_dropped));
  one("gatherer_broker_malformed_frames_total", "counter", "Malformed messages dropped.", load(stats.malformed));
  one("gatherer_broker_sessions_expired_total", "counter", "Sessions expired after their client went silent.",
      load(stats.sessions_expired));
  one("gatherer_broker_sessions_cancelled_total", "counter", "Sessions cancelled by an operator.",
      load(stats.sessions_cancelled));
  out += detail;
  return out;
}

}  // namespace gatherer::broker_ops
