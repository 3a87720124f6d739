#pragma once
// Operations figures the broker keeps for gatherer-ctl (PROTOCOL.md §3.9)
// and /metrics: per-session and per-worker counters and rate meters. Owned
// and updated by the broker's loop thread only (no atomics, no locks); what
// other threads read goes through BrokerStats' relaxed atomics or the
// metrics text the loop publishes once per heartbeat.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "gatherer/broker.h"
#include "gatherer/protocol.h"
#include "rate_limiter.h"

namespace gatherer::broker_ops {

using Clock = std::chrono::steady_clock;

// Events per second over the last N whole seconds, from N one-second
// buckets: add() and rate() are O(1) amortised, no allocation.
template <std::size_t N>
class RateMeter {
 public:
  void add(Clock::time_point now, std::uint64_t n) {
    advance(now);
    buckets_[static_cast<std::size_t>(second_) % N] += n;
  }
  // Events per second over the last `seconds` (≤ N - 1) complete seconds
  // plus the current partial one, times 1,000; over the time since `since`
  // when that is shorter (a broker or session younger than the window).
  std::uint64_t rate_milli(Clock::time_point now, std::size_t seconds, Clock::time_point since) {
    advance(now);
    if (seconds >= N) seconds = N - 1;
    std::uint64_t sum = 0;
    for (std::size_t i = 0; i <= seconds; ++i) {
      sum += buckets_[static_cast<std::size_t>(second_ - static_cast<std::int64_t>(i) + static_cast<std::int64_t>(N)) % N];
    }
    const auto into = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
    const auto age_ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - since).count();
    const std::uint64_t span_ms = std::max<std::uint64_t>(
        1, std::min<std::uint64_t>(seconds * 1000 + static_cast<std::uint64_t>(into),
                                   static_cast<std::uint64_t>(std::max<std::int64_t>(age_ms, 0))));
    return sum * 1'000'000 / span_ms;
  }

 private:
  void advance(Clock::time_point now) {
    const std::int64_t s = std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
    if (s <= second_) return;
    const std::int64_t steps = std::min<std::int64_t>(s - second_, static_cast<std::int64_t>(N));
    for (std::int64_t i = 1; i <= steps; ++i) buckets_[static_cast<std::size_t>(second_ + i) % N] = 0;
    second_ = s;
  }
  std::array<std::uint64_t, N> buckets_{};
  std::int64_t second_ = 0;
};

// What a session shows (SESSIONS, §3.9).
struct SessionFigures {
  std::string client_host;
  Clock::time_point opened;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  RateMeter<11> rate;
};

// What a worker shows (WORKERS, §3.9).
struct WorkerFigures {
  std::uint32_t pid = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
};

// Broker-wide figures kept by the loop thread.
struct BrokerFigures {
  Clock::time_point started = Clock::now();
  RateMeter<61> rate;
};

// §3.9.3: a worker's state, by precedence.
const char* WorkerStateName(bool draining, std::chrono::milliseconds silent, std::chrono::milliseconds heartbeat,
                            std::uint32_t leased);

// The client's address for SESSIONS: ZeroMQ's Peer-Address of the message
// (tcp), or "local" when the transport has none (inproc, ipc).
std::string PeerHost(const zmq::message_t& frame);

// Per-worker and per-session figures for /metrics, copied by the loop.
struct WorkerMetric {
  std::string worker_id;
  std::string host;
  std::uint32_t slots = 0;
  std::uint32_t in_flight = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  double heartbeat_age_s = 0;
  const char* state = "";
};
struct SessionMetric {
  std::string session;
  std::uint32_t window = 0;
  std::uint64_t queued = 0;
  std::uint64_t in_flight = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
};
// The rate keys operators see (STATUS_REPORT §3.9.7, /metrics): the
// protocol::kMaxStatusRateKeys busiest of `limiter`, each pause as the time
// left at `now`. Loop thread (the limiter is not synchronised).
std::vector<protocol::RateKeyRow> RateKeyRows(const broker::RateLimiter& limiter, Clock::time_point now);
// "1", "1.5", "0.25": a window's length in seconds, as --rate-limit spells it.
std::string WindowSeconds(std::uint32_t window_ms);
std::string RenderDetail(const std::vector<WorkerMetric>& workers, const std::vector<SessionMetric>& sessions,
                         const std::vector<protocol::RateKeyRow>& rate_keys);
// The whole exposition: broker-wide counters (relaxed loads) then `detail`.
std::string RenderBrokerMetrics(const BrokerStats& stats, Clock::time_point started, const std::string& detail);

// The version string this broker reports.
const char* Version();

}  // namespace gatherer::broker_ops
