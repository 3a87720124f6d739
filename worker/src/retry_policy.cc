#include "retry_policy.h"

#include <algorithm>

namespace gatherer::worker {

bool IsRetryableHttpStatus(long status) {
  return status == 408 || status == 429 || status == 500 || status == 502 || status == 503 || status == 504;
}

std::optional<RetryWait> HttpRetry(long status, bool idempotent, std::optional<std::uint64_t> retry_after_ms,
                                   const SessionSettings& settings) {
  if (!IsRetryableHttpStatus(status)) return std::nullopt;
  // Retry-After means something on a 429 or a 503 only (RFC 9110 §10.2.3).
  if (status != 429 && status != 503) retry_after_ms.reset();
  if (!(idempotent || status == 429 || (status == 503 && retry_after_ms))) return std::nullopt;
  const std::uint64_t base =
      status == 429 ? std::max<std::uint64_t>(settings.backoff_base_ms, kThrottledBackoffBaseMs) : settings.backoff_base_ms;
  return RetryWait{retry_after_ms, base};
}

std::uint64_t BackoffDelayMs(const RetryWait& wait, std::uint32_t attempts, const SessionSettings& settings,
                             std::mt19937_64& rng) {
  if (wait.retry_after_ms) return std::min<std::uint64_t>(*wait.retry_after_ms, settings.retry_after_max_ms);
  const std::uint64_t cap = settings.backoff_max_ms;
  const std::uint32_t shift = attempts > 0 ? attempts - 1 : 0;
  // The base is at most 2^32 ms, so a shift below 32 cannot overflow.
  const std::uint64_t ceiling = shift >= 32 ? cap : std::min(cap, wait.base_ms << shift);
  return std::uniform_int_distribution<std::uint64_t>(0, ceiling)(rng);
}

}  // namespace gatherer::worker
