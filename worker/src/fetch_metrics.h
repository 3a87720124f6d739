#pragma once
// FetchMetrics: what a worker's I/O threads count for /metrics — retries by
// cause, 429 answers by host, request latency and response body size
// histograms. Relaxed atomics: a finished statement costs a few uncontended
// increments, no lock and no allocation; only a 429 (a rare answer) takes
// a mutex, to count it under its host.
//
// Thread-safety: note_*() from any I/O thread; Render() from any thread.

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace gatherer::worker {

enum class RetryCause : std::uint8_t { k408, k429, k500, k502, k503, k504, kTransport, kCount };

class FetchMetrics {
 public:
  static constexpr std::array<double, 14> kLatencyBounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                            1,     2.5,  5,     10,   30,  60,  120};
  static constexpr std::array<double, 12> kBodyBounds = {64,      256,     1024,     4096,     16384,    65536,
                                                         262144,  1048576, 4194304,  16777216, 67108864, 268435456};

  void note_retry(RetryCause cause) { retries_[static_cast<std::size_t>(cause)].fetch_add(1, kRelaxed); }
  // A 429 answer (retried or not) from `host`.
  void note_429(const std::string& host);
  // A statement finished (its last attempt), after `elapsed_us`, with a body of `bytes`.
  void note_finished(std::uint64_t elapsed_us, std::uint64_t bytes, bool failed) {
    Observe(latency_, kLatencyBounds, static_cast<double>(elapsed_us) / 1e6);
    latency_sum_us_.fetch_add(elapsed_us, kRelaxed);
    Observe(body_, kBodyBounds, static_cast<double>(bytes));
    body_sum_.fetch_add(bytes, kRelaxed);
    if (failed) failed_.fetch_add(1, kRelaxed);
  }
  // Prometheus text of these series (gatherer_worker_…).
  std::string render() const;

 private:
  static constexpr auto kRelaxed = std::memory_order_relaxed;
  template <std::size_t N>
  static void Observe(std::array<std::atomic<std::uint64_t>, N + 1>& buckets, const std::array<double, N>& bounds,
                      double v) {
    std::size_t i = 0;
    while (i < N && v > bounds[i]) ++i;
    buckets[i].fetch_add(1, kRelaxed);  // non-cumulative here; summed when rendered
  }
  std::array<std::atomic<std::uint64_t>, static_cast<std::size_t>(RetryCause::kCount)> retries_{};
  std::array<std::atomic<std::uint64_t>, kLatencyBounds.size() + 1> latency_{};
  std::atomic<std::uint64_t> latency_sum_us_{0};
  std::array<std::atomic<std::uint64_t>, kBodyBounds.size() + 1> body_{};
  std::atomic<std::uint64_t> body_sum_{0};
  std::atomic<std::uint64_t> failed_{0};
  mutable std::mutex throttled_mutex_;
  std::map<std::string, std::uint64_t> throttled_;  // 429s by host, under throttled_mutex_
};

}  // namespace gatherer::worker
