#include "fetch_metrics.h"

#include <fmt/format.h>

#include "gatherer/prometheus.h"

namespace gatherer::worker {
namespace {

constexpr std::size_t kMaxHosts = 1000;  // 429s of further hosts count under "other"

template <std::size_t N, typename Buckets>
void Histogram(std::string& out, const char* name, const char* help, const std::array<double, N>& bounds,
               const Buckets& buckets, double sum) {
  PrometheusHeader(out, name, "histogram", help);
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < N; ++i) {
    cumulative += buckets[i].load(std::memory_order_relaxed);
    out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, bounds[i], cumulative);
  }
  cumulative += buckets[N].load(std::memory_order_relaxed);
  out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, cumulative, name, sum, name,
                     cumulative);
}

}  // namespace

void FetchMetrics::note_429(const std::string& host) {
  std::lock_guard lock(throttled_mutex_);
  auto it = throttled_.find(host);
  if (it == throttled_.end()) it = throttled_.emplace(throttled_.size() < kMaxHosts ? host : "other", 0).first;
  ++it->second;
}

std::string FetchMetrics::render() const {
  std::string out;
  out += "# HELP gatherer_worker_retries_total Attempts scheduled again, by cause.\n"
         "# TYPE gatherer_worker_retries_total counter\n";
  static constexpr const char* kCauses[] = {"http_408", "http_429", "http_500", "http_502",
                                            "http_503", "http_504", "transport"};
  for (std::size_t i = 0; i < retries_.size(); ++i) {
    out += fmt::format("gatherer_worker_retries_total{{cause=\"{}\"}} {}\n", kCauses[i],
                       retries_[i].load(std::memory_order_relaxed));
  }
  out += "# HELP gatherer_worker_http_429_total 429 (Too Many Requests) answers, by host.\n"
         "# TYPE gatherer_worker_http_429_total counter\n";
  {
    std::lock_guard lock(throttled_mutex_);
    for (const auto& [host, n] : throttled_) {
      out += fmt::format("gatherer_worker_http_429_total{{host=\"{}\"}} {}\n", PrometheusLabel(host), n);
    }
  }
  out += fmt::format(
      "# HELP gatherer_worker_statements_failed_total Statements finished with an error.\n"
      "# TYPE gatherer_worker_statements_failed_total counter\ngatherer_worker_statements_failed_total {}\n",
      failed_.load(std::memory_order_relaxed));
  Histogram(out, "gatherer_worker_request_duration_seconds",
            "Time from a statement's first attempt to its outcome, retries included.", kLatencyBounds, latency_,
            static_cast<double>(latency_sum_us_.load(std::memory_order_relaxed)) / 1e6);
  Histogram(out, "gatherer_worker_response_body_bytes", "Size of each statement's response body.", kBodyBounds, body_,
            static_cast<double>(body_sum_.load(std::memory_order_relaxed)));
  return out;
}

}  // namespace gatherer::worker
