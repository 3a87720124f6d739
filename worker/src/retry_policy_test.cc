// The retry rules on their own: no server, no clock; the backoff's jitter
// bounds checked over thousands of draws.
#include "retry_policy.h"

#include <gtest/gtest.h>

namespace gatherer::worker {
namespace {

SessionSettings Settings() {
  SessionSettings s;
  s.backoff_base_ms = 100;
  s.backoff_max_ms = 10'000;
  s.retry_after_max_ms = 60'000;
  return s;
}

// The lowest and highest of `n` draws for attempt `attempts`.
std::pair<std::uint64_t, std::uint64_t> Spread(const RetryWait& wait, std::uint32_t attempts,
                                               const SessionSettings& s, int n = 4000) {
  std::mt19937_64 rng(7);
  std::uint64_t lo = UINT64_MAX, hi = 0;
  for (int i = 0; i < n; ++i) {
    const auto d = BackoffDelayMs(wait, attempts, s, rng);
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  return {lo, hi};
}

TEST(RetryPolicyTest, WhichAnswersAreTriedAgain) {
  const auto s = Settings();
  for (long status : {408L, 429L, 500L, 502L, 503L, 504L}) {
    EXPECT_TRUE(HttpRetry(status, true, std::nullopt, s).has_value()) << status;
  }
  for (long status : {200L, 301L, 400L, 404L, 501L, 505L}) {
    EXPECT_FALSE(HttpRetry(status, true, std::nullopt, s).has_value()) << status;
  }
  // A non-idempotent statement: only when the server says it did not act.
  EXPECT_FALSE(HttpRetry(500, false, std::nullopt, s).has_value());
  EXPECT_FALSE(HttpRetry(503, false, std::nullopt, s).has_value());
  EXPECT_TRUE(HttpRetry(503, false, 2000, s).has_value());
  EXPECT_TRUE(HttpRetry(429, false, std::nullopt, s).has_value());
  // Retry-After counts on 429 and 503 only.
  EXPECT_FALSE(HttpRetry(500, true, 2000, s)->retry_after_ms.has_value());
  EXPECT_EQ(HttpRetry(503, true, 2000, s)->retry_after_ms, 2000u);
}

TEST(RetryPolicyTest, BackoffIsFullJitterUnderADoublingCeiling) {
  const auto s = Settings();
  const RetryWait wait{std::nullopt, 100};
  for (std::uint32_t attempts = 1; attempts <= 5; ++attempts) {
    const std::uint64_t ceiling = 100u << (attempts - 1);
    const auto [lo, hi] = Spread(wait, attempts, s);
    EXPECT_LE(hi, ceiling) << "attempt " << attempts;
    EXPECT_GE(hi, ceiling * 9 / 10) << "the draws do not reach the ceiling";
    EXPECT_LE(lo, ceiling / 10) << "the draws do not reach 0: not full jitter";
  }
  // Capped by backoff_max_ms, however many attempts (no overflow past 32).
  for (std::uint32_t attempts : {8u, 33u, 200u}) {
    EXPECT_LE(Spread(wait, attempts, s).second, 10'000u) << attempts;
  }
}

TEST(RetryPolicyTest, A429WithoutRetryAfterBacksOffFromASecond) {
  const auto s = Settings();
  const auto wait = HttpRetry(429, true, std::nullopt, s);
  ASSERT_TRUE(wait.has_value());
  EXPECT_EQ(wait->base_ms, kThrottledBackoffBaseMs);
  EXPECT_GE(Spread(*wait, 1, s).second, 900u);
  SessionSettings slow = s;
  slow.backoff_base_ms = 5000;
  EXPECT_EQ(HttpRetry(429, true, std::nullopt, slow)->base_ms, 5000u) << "a larger base of the session's wins";
}

TEST(RetryPolicyTest, RetryAfterIsWaitedAsSaidUpToItsOwnCap) {
  auto s = Settings();
  std::mt19937_64 rng(1);
  EXPECT_EQ(BackoffDelayMs(RetryWait{30'000, 100}, 1, s, rng), 30'000u) << "backoff_max_ms does not cut it";
  s.retry_after_max_ms = 5000;
  EXPECT_EQ(BackoffDelayMs(RetryWait{30'000, 100}, 1, s, rng), 5000u);
  EXPECT_EQ(BackoffDelayMs(RetryWait{0, 100}, 3, s, rng), 0u);
}

}  // namespace
}  // namespace gatherer::worker
