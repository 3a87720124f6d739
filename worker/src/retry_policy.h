#pragma once
// The worker's retry rules (PROTOCOL.md §3.1 "retries"), apart from libcurl
// and the clock: which answers are tried again, and how long to wait before
// the next attempt. The fetcher applies them; retry_policy_test.cc checks
// them on their own, thousands of draws in microseconds.
//
// Pure functions but BackoffDelayMs, which draws from the generator it is
// given; safe from any thread with its own generator.

#include <cstdint>
#include <optional>
#include <random>

#include "gatherer/config.h"
#include "gatherer/statement.h"

namespace gatherer::worker {

// Backoff base after a 429 without Retry-After (unless backoff_base_ms is
// larger): the server said "too many", and another try 100 ms later, from
// every statement of a burst, only says it again.
inline constexpr std::uint64_t kThrottledBackoffBaseMs = 1000;

// Statuses tried again: the request timed out at the server (408), was
// throttled (429), or met a failing or overloaded server (500, 502-504).
bool IsRetryableHttpStatus(long status);

// How to wait before the next attempt.
struct RetryWait {
  std::optional<std::uint64_t> retry_after_ms;  // the server's Retry-After, if it gave one
  std::uint64_t base_ms = 0;                    // exponential backoff base otherwise
};

// Whether an HTTP answer `status` is tried again, and how to wait: nullopt
// when it is not (whatever the attempts left). A non-idempotent statement is
// sent again only when the answer says it was not acted on: 429, or 503
// with a Retry-After (a deliberate "come back later", RFC 9110 §15.6.4).
// `retry_after_ms`: the response's Retry-After, read by the caller.
std::optional<RetryWait> HttpRetry(long status, bool idempotent, std::optional<std::uint64_t> retry_after_ms,
                                   const SessionSettings& settings);

// The wait before attempt `attempts + 1`, `attempts` counting every attempt
// made so far (those of earlier DISPATCHes too). A Retry-After is waited as
// it says, up to retry_after_max_ms (backoff_max_ms does not cut it: the
// server said when). Otherwise full jitter ("Exponential Backoff and
// Jitter", AWS architecture blog), which spreads the retries of a burst
// that failed together: uniform in [0, min(backoff_max_ms, base * 2^(attempts - 1))].
std::uint64_t BackoffDelayMs(const RetryWait& wait, std::uint32_t attempts, const SessionSettings& settings,
                             std::mt19937_64& rng);

}  // namespace gatherer::worker
