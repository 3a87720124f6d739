// The broker's rate limiter in simulated time: every call is given `now`.
#include "rate_limiter.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "stats.h"

namespace gatherer::broker {
namespace {

using std::chrono::milliseconds;
namespace proto = protocol;

const RateTime kT0 = RateTime() + std::chrono::hours(1);

// Grants requests on `k` as early as the limiter allows, stepping simulated
// time by 1 ms at least; the i-th request reaches the server `delay(i)` after
// its grant and is answered as long again after that. Returns the times the
// server saw the requests (the grant times when there is no delay).
template <typename Delay>
std::vector<RateTime> Drive(RateLimiter& l, RateLimiter::Key* k, std::size_t n, RateTime start, Delay delay) {
  std::vector<RateTime> seen;
  std::multiset<RateTime> answers;  // to come
  RateTime now = start;
  for (int steps = 0; seen.size() < n && steps < 10'000'000; ++steps) {
    while (!answers.empty() && *answers.begin() <= now) {
      l.answered(k, *answers.begin());
      answers.erase(answers.begin());
    }
    const RateTime at = l.ready_at(k, now);
    if (at <= now) {
      const milliseconds d = delay(seen.size());
      l.record(k, now);
      seen.push_back(now + d);
      answers.insert(now + 2 * d);
      continue;
    }
    RateTime next = std::chrono::ceil<milliseconds>(at - RateTime()) + RateTime();
    if (!answers.empty()) next = std::min(next, *answers.begin());
    now = std::max(now + milliseconds(1), next);
  }
  std::sort(seen.begin(), seen.end());
  return seen;
}

std::vector<RateTime> Drive(RateLimiter& l, RateLimiter::Key* k, std::size_t n, RateTime start) {
  return Drive(l, k, n, start, [](std::size_t) { return milliseconds(0); });
}

// The most grants in any span of `window` (closed on both ends).
std::size_t MaxInWindow(const std::vector<RateTime>& grants, milliseconds window) {
  std::size_t best = 0, lo = 0;
  for (std::size_t hi = 0; hi < grants.size(); ++hi) {
    while (grants[hi] - grants[lo] > window) ++lo;
    best = std::max(best, hi - lo + 1);
  }
  return best;
}

TEST(RateLimiterTest, UnknownKeyIsUnlimited) {
  RateLimiter l;
  auto* k = l.key("host a");
  EXPECT_LE(l.ready_at(k, kT0), kT0);
  l.record(k, kT0);
  EXPECT_LE(l.ready_at(k, kT0), kT0);
  EXPECT_EQ(l.stats(k).used, 1u);
}

TEST(RateLimiterTest, PacesAndNeverExceedsAnyWindow) {
  RateLimiter l;
  auto* k = l.key("host a");
  ASSERT_TRUE(l.declare(k, {{20, 1000}, {100, 120'000}}));
  const auto grants = Drive(l, k, 220, kT0);
  ASSERT_EQ(grants.size(), 220u);
  // Spread over the short window, never a burst at its start.
  EXPECT_LE(MaxInWindow(grants, milliseconds(1000)), 20u);
  EXPECT_LE(MaxInWindow(grants, milliseconds(120'000)), 100u);
  EXPECT_LE(MaxInWindow(grants, milliseconds(90)), 2u);
  // The first 100 take about 5 s (paced at 20/s), the next 100 wait for the
  // 120 s window: the 101st goes just after the 1st left it.
  EXPECT_LT(grants[99] - grants[0], milliseconds(5200));
  EXPECT_GE(grants[100] - grants[0], milliseconds(120'000));
  EXPECT_LE(grants[100] - grants[0], milliseconds(120'000) + RateLimiter::Margin(120'000) + milliseconds(1));
}

TEST(RateLimiterTest, UsesNearlyAllTheAllowance) {
  RateLimiter l;
  auto* k = l.key("host a");
  l.declare(k, {{10, 1000}});
  const auto grants = Drive(l, k, 201, kT0);
  // 200 gaps at 10/s = 20 s; the margin costs W/100 + 5 ms per window.
  const auto span = grants.back() - grants.front();
  EXPECT_GE(span, milliseconds(20'000));
  EXPECT_LE(span, milliseconds(20'000 * 103 / 100));
}

// A request slow on its way to the server is counted by the server late.
// Windows counted from the answers keep every window the server sees within
// the limit whatever the delays, where windows counted from the grants (with
// only the margin for slack) put 11 of 10 into one.
TEST(RateLimiterTest, ServerNeverSeesMoreThanTheLimitWhateverTheDelays) {
  for (const int slow_ms : {0, 20, 150, 700, 2500}) {
    RateLimiter l;
    auto* k = l.key("host a");
    l.declare(k, {{10, 1000}, {30, 5000}});
    // Every 7th request is slow (every 10th with the two windows aligned
    // would be the worst case, and is covered by the sweep below).
    const auto seen = Drive(l, k, 120, kT0, [&](std::size_t i) {
      return milliseconds(i % 7 == 3 ? slow_ms : 1);
    });
    ASSERT_EQ(seen.size(), 120u);
    EXPECT_LE(MaxInWindow(seen, milliseconds(1000)), 10u) << slow_ms;
    EXPECT_LE(MaxInWindow(seen, milliseconds(5000)), 30u) << slow_ms;
  }
  for (std::size_t every = 2; every <= 12; ++every) {
    RateLimiter l;
    auto* k = l.key("host a");
    l.declare(k, {{10, 1000}});
    const auto seen = Drive(l, k, 60, kT0, [&](std::size_t i) {
      return milliseconds(i % every == 0 ? 40 : 1);
    });
    EXPECT_LE(MaxInWindow(seen, milliseconds(1000)), 10u) << every;
  }
}

// A request never answered holds one place, not the key: the others go on,
// one window's worth less, and the key never waits for an answer that may
// not come.
TEST(RateLimiterTest, UnansweredRequestHoldsOnePlaceOnly) {
  RateLimiter l;
  auto* k = l.key("host a");
  l.declare(k, {{2, 1000}});
  l.record(k, kT0);  // never answered
  const auto seen = Drive(l, k, 10, kT0 + milliseconds(1));
  ASSERT_EQ(seen.size(), 10u);
  // One place left of two: one request per window (plus margin).
  EXPECT_LE(MaxInWindow(seen, milliseconds(1000)), 1u);
  EXPECT_LE(seen.back() - seen.front(), 9 * (milliseconds(1000) + RateLimiter::Margin(1000)) + milliseconds(10));
  // With both places in flight nothing goes, yet the wake-up is finite: W
  // after now, the earliest an answer arriving now would free a place.
  l.record(k, seen.back() + milliseconds(2000));
  const RateTime t = seen.back() + milliseconds(2000);
  EXPECT_EQ(l.ready_at(k, t), t + milliseconds(1000) + RateLimiter::Margin(1000));
  l.answered(k, t + milliseconds(300));
  EXPECT_EQ(l.ready_at(k, t + milliseconds(300)), t + milliseconds(1300) + RateLimiter::Margin(1000));
}

TEST(RateLimiterTest, StricterDeclarationWins) {
  RateLimiter l;
  auto* k = l.key("host a");
  EXPECT_TRUE(l.declare(k, {{20, 1000}}));
  EXPECT_FALSE(l.declare(k, {{30, 1000}}));
  EXPECT_TRUE(l.declare(k, {{10, 1000}}));
  EXPECT_EQ(l.stats(k).windows, (RateWindows{{10, 1000}}));
}

TEST(RateLimiterTest, PauseAndServiceBackoff) {
  RateLimiter l;
  auto* k = l.key("host a");
  l.pause(k, kT0 + milliseconds(500));
  EXPECT_EQ(l.ready_at(k, kT0), kT0 + milliseconds(500));
  // An earlier pause does not shorten it.
  l.pause(k, kT0 + milliseconds(100));
  EXPECT_EQ(l.ready_at(k, kT0), kT0 + milliseconds(500));
  const RateTime first = l.backoff(k, kT0 + milliseconds(600));
  EXPECT_EQ(first, kT0 + milliseconds(1600));
  const RateTime second = l.backoff(k, first);
  EXPECT_EQ(second, first + milliseconds(2000));
  // Long after, it starts over from 1 s.
  const RateTime later = second + std::chrono::minutes(10);
  EXPECT_EQ(l.backoff(k, later), later + milliseconds(1000));
}

TEST(RateLimiterTest, CollectsOnlyUnreferencedIdleKeys) {
  RateLimiter l;
  auto* a = l.key("host a");
  auto* b = l.key("host b");
  l.declare(a, {{1, 1000}});
  l.record(a, kT0);
  l.record(b, kT0);
  l.acquire(b);
  l.collect(kT0 + std::chrono::minutes(5));
  EXPECT_EQ(l.size(), 1u);
  l.release(b);
  l.collect(kT0 + std::chrono::minutes(5));
  EXPECT_EQ(l.size(), 0u);
}

// Operators see the busiest keys, most grants first, ties by name, and
// only as many as asked for.
TEST(RateLimiterTest, BusiestKeysMostGrantsFirst) {
  RateLimiter l;
  const auto grant = [&](const char* name, int n) {
    auto* k = l.key(name);
    for (int i = 0; i < n; ++i) l.record(k, kT0);
    return k;
  };
  grant("host c", 1);
  grant("host a", 5);
  auto* b = grant("host b", 5);
  grant("host d", 9);
  l.declare(b, {{20, 1000}, {100, 120000}});
  l.pause(b, kT0 + milliseconds(1500));
  const auto top = l.busiest(3);
  ASSERT_EQ(top.size(), 3u);
  EXPECT_EQ(top[0].key, "host d");
  EXPECT_EQ(top[1].key, "host a");
  EXPECT_EQ(top[2].key, "host b");
  EXPECT_EQ(top[2].used, 5u);
  EXPECT_EQ(top[2].windows, (RateWindows{{20, 1000}, {100, 120000}}));
  EXPECT_EQ(top[2].paused_until, kT0 + milliseconds(1500));
  EXPECT_EQ(l.busiest(100).size(), 4u);
  EXPECT_TRUE(l.busiest(0).empty());
  EXPECT_TRUE(RateLimiter().busiest(10).empty());
}

// What STATUS_REPORT and /metrics show of the keys (§3.9.7): the pause as
// time left, rounded up; in the exposition every key's counters and one
// limit series per window, its name escaped as a label value.
TEST(RateLimiterTest, OperatorsSeeTheKeysFiguresAndEscapedNames) {
  RateLimiter l;
  auto* a = l.key("host api.example:443");
  l.declare(a, {{20, 1000}, {100, 120000}, {3, 1500}});
  for (int i = 0; i < 7; ++i) l.record(a, kT0);
  l.count_throttled(a);
  l.pause(a, kT0 + milliseconds(2000) + std::chrono::microseconds(300));
  auto* odd = l.key("rule q\"x\\y api.example:443");
  l.record(odd, kT0);
  const auto rows = broker_ops::RateKeyRows(l, kT0 + milliseconds(500));
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0], (proto::RateKeyRow{"host api.example:443", {{20, 1000}, {3, 1500}, {100, 120000}}, 7, 1, 1501}))
      << "windows come sorted by length";
  EXPECT_EQ(rows[1].paused_ms, 0u);
  EXPECT_EQ(broker_ops::RateKeyRows(l, kT0 + milliseconds(5000))[0].paused_ms, 0u);

  const std::string text = broker_ops::RenderDetail({}, {}, rows);
  for (const char* line : {
           "# TYPE gatherer_broker_rate_requests_total counter\n",
           "gatherer_broker_rate_requests_total{key=\"host api.example:443\"} 7\n",
           "gatherer_broker_rate_requests_total{key=\"rule q\\\"x\\\\y api.example:443\"} 1\n",
           "gatherer_broker_rate_throttled_total{key=\"host api.example:443\"} 1\n",
           "# TYPE gatherer_broker_rate_paused_seconds gauge\n",
           "gatherer_broker_rate_paused_seconds{key=\"host api.example:443\"} 1.501\n",
           "gatherer_broker_rate_paused_seconds{key=\"rule q\\\"x\\\\y api.example:443\"} 0.000\n",
           "# TYPE gatherer_broker_rate_limit gauge\n",
           "gatherer_broker_rate_limit{key=\"host api.example:443\",window_seconds=\"1.5\"} 3\n",
           "gatherer_broker_rate_limit{key=\"host api.example:443\",window_seconds=\"1\"} 20\n",
           "gatherer_broker_rate_limit{key=\"host api.example:443\",window_seconds=\"120\"} 100\n",
       }) {
    EXPECT_NE(text.find(line), std::string::npos) << line << "\nin:\n" << text;
  }
  EXPECT_EQ(text.find("gatherer_broker_rate_limit{key=\"rule q"), std::string::npos)
      << "a key without windows has no limit";
  EXPECT_EQ(broker_ops::WindowSeconds(250), "0.25");
  EXPECT_EQ(broker_ops::WindowSeconds(86'400'000), "86400");
}

proto::HeldStatement At(std::uint64_t index, std::string url, std::string method = "GET") {
  Statement s;
  s.url = std::move(url);
  s.method = std::move(method);
  return proto::Hold(index, s);
}

TEST(SessionRateTest, BlockedHostDoesNotHoldBackOthers) {
  RateLimiter l;
  SessionSettings settings;
  settings.rate_limits = {*ParseRateRule("1:1")};
  SessionRate s(settings, {});
  SessionRate::Bind(s, l);
  std::deque<proto::HeldStatement> pending = {At(0, "http://a/x"), At(1, "http://a/y"), At(2, "http://b/x"),
                                              At(3, "http://a/z"), At(4, "http://c/x")};
  std::vector<proto::HeldStatement> out;
  const RateTime wake = s.take(pending, 10, kT0, out);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_EQ(out[0].index, 0u);
  EXPECT_EQ(out[1].index, 2u);
  EXPECT_EQ(out[2].index, 4u);
  ASSERT_EQ(pending.size(), 2u);
  EXPECT_GT(wake, kT0);
  // Answered at once: the window counts from the answer (§3.8.3), and an
  // answer never makes a wake-up set before it earlier.
  for (const auto& ws : out) s.answered(ws.index, kT0);
  EXPECT_LE(wake, kT0 + milliseconds(1000) + RateLimiter::Margin(1000));
  out.clear();
  EXPECT_EQ(s.take(pending, 10, wake - milliseconds(1), out), wake);
  EXPECT_TRUE(out.empty());
  s.take(pending, 10, wake, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].index, 1u);
}

// §3.8.8: a statement that waited carries how long, and its 429s so far; one
// granted at once carries nothing (and costs no entry).
TEST(SessionRateTest, GrantsCarryTheWaitAndThe429s) {
  RateLimiter l;
  SessionSettings settings;
  settings.rate_limits = {*ParseRateRule("1:1")};
  settings.max_attempts = 5;
  SessionRate s(settings, {});
  SessionRate::Bind(s, l);
  std::deque<proto::HeldStatement> pending = {At(0, "http://a/x"), At(1, "http://a/y")};
  std::vector<proto::HeldStatement> out;
  const RateTime wake = s.take(pending, 10, kT0, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].rate_wait_us, 0u);
  s.answered(out[0].index, kT0);
  out.clear();
  s.take(pending, 10, wake, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].index, 1u);
  EXPECT_EQ(std::chrono::microseconds(out[0].rate_wait_us), std::chrono::duration_cast<std::chrono::microseconds>(wake - kT0));
  // A 429 on it: it runs again later and says so.
  RateReport hit;
  hit.throttled = true;
  hit.retry_after_ms = 100;
  s.answered(out[0].index, wake);
  ASSERT_TRUE(s.learn(out[0], hit, wake));
  pending.push_front(out[0]);
  out.clear();
  const RateTime again = s.take(pending, 10, wake, out);
  s.take(pending, 10, again, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].throttled, 1u);
  EXPECT_GT(out[0].rate_wait_us, 1'000'000u);
}

TEST(SessionRateTest, NamedRulesAndHostRuleBothApply) {
  RateLimiter l;
  SessionSettings settings;
  settings.base_url = "http://api";
  settings.rate_limits = {*ParseRateRule("match=GET /matches/{id} 1:1")};
  SessionRate s(settings, {});
  SessionRate::Bind(s, l);
  std::deque<proto::HeldStatement> pending = {At(0, "/matches/1"), At(1, "/matches/2"), At(2, "/players/1"),
                                              At(3, "/matches/3", "POST")};
  std::vector<proto::HeldStatement> out;
  s.take(pending, 10, kT0, out);
  ASSERT_EQ(out.size(), 3u);  // the second GET /matches waits on the rule
  EXPECT_EQ(pending.front().index, 1u);
  EXPECT_EQ(l.stats(l.key("host api")).used, 3u);
  EXPECT_EQ(l.stats(l.key("rule match api")).used, 1u);
  // Every key must allow: a paused host holds the rule's statements too.
  l.pause(l.key("host api"), kT0 + std::chrono::seconds(5));
  out.clear();
  EXPECT_EQ(s.take(pending, 10, kT0 + std::chrono::seconds(2), out), kT0 + std::chrono::seconds(5));
  EXPECT_TRUE(out.empty());
}

TEST(SessionRateTest, LearnsAdvertisedLimitsAndPausesOn429) {
  RateLimiter l;
  SessionSettings settings;
  settings.learn_rate_limits = true;
  settings.max_attempts = 3;
  SessionRate s(settings, {});
  SessionRate::Bind(s, l);
  auto ws = At(7, "http://api/matches/EUW1_123");
  RateReport ok;
  ok.app = {{20, 1000}};
  ok.method = {{5, 1000}};
  EXPECT_FALSE(s.learn(ws, ok, kT0));
  EXPECT_EQ(l.stats(l.key("host api")).windows, (RateWindows{{20, 1000}}));
  EXPECT_EQ(l.stats(l.key("endpoint GET /matches/{} api")).windows, (RateWindows{{5, 1000}}));
  // A method 429 pauses the endpoint, not the host; it runs again.
  RateReport hit;
  hit.throttled = true;
  hit.type = RateLimitType::kMethod;
  hit.retry_after_ms = 2000;
  EXPECT_TRUE(s.learn(ws, hit, kT0));
  EXPECT_EQ(l.ready_at(l.key("endpoint GET /matches/{} api"), kT0), kT0 + milliseconds(2000));
  EXPECT_LE(l.ready_at(l.key("host api"), kT0), kT0 + milliseconds(60));
  // Application type pauses the host; the third 429 (max_attempts) is final.
  hit.type = RateLimitType::kApplication;
  EXPECT_TRUE(s.learn(ws, hit, kT0));
  EXPECT_EQ(l.ready_at(l.key("host api"), kT0), kT0 + milliseconds(2000));
  EXPECT_FALSE(s.learn(ws, hit, kT0));
  EXPECT_EQ(l.stats(l.key("host api")).throttled, 2u);
  // Service type without Retry-After: exponential backoff on the host.
  RateReport service;
  service.throttled = true;
  service.type = RateLimitType::kService;
  auto svc = At(8, "http://svc/x");
  s.learn(svc, service, kT0);
  EXPECT_EQ(l.ready_at(l.key("host svc"), kT0), kT0 + milliseconds(1000));
}

// §3.8.6/§3.8.7: a failure handed back runs again after its wait, counted
// against the keys like a first attempt, without holding back the statements
// behind it; once its attempts are spent the failure is final.
TEST(SessionRateTest, HandedBackRetryWaitsItsBackoffAndIsGrantedAgain) {
  RateLimiter l;
  SessionSettings settings;
  settings.rate_limits = {*ParseRateRule("100:1")};
  settings.max_attempts = 3;
  SessionRate s(settings, {});
  SessionRate::Bind(s, l);
  std::deque<proto::HeldStatement> pending = {At(0, "http://a/x")};
  std::vector<proto::HeldStatement> out;
  s.take(pending, 10, kT0, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(l.stats(l.key("host a")).used, 1u);
  RateReport failed;
  failed.retry = true;
  failed.retry_after_ms = 300;
  proto::HeldStatement ws = out[0];
  ASSERT_TRUE(s.learn(ws, failed, kT0));
  EXPECT_EQ(ws.attempts, 1u);
  EXPECT_EQ(l.stats(l.key("host a")).throttled, 0u) << "a 5xx is not a 429";
  EXPECT_LE(l.ready_at(l.key("host a"), kT0 + milliseconds(20)), kT0 + milliseconds(20)) << "no key is paused";
  pending = {ws, At(1, "http://a/y")};
  out.clear();
  // Before its wait ends the retry stays; the statement behind it goes.
  const RateTime wake = s.take(pending, 10, kT0 + milliseconds(100), out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].index, 1u);
  EXPECT_EQ(wake, kT0 + milliseconds(300));
  out.clear();
  s.take(pending, 10, wake, out);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].index, 0u);
  EXPECT_EQ(out[0].attempts, 1u) << "the attempts made so far travel with it";
  EXPECT_EQ(l.stats(l.key("host a")).used, 3u) << "the retry was counted";
  // Second failure: attempt 2 of 3, runs again; third: final, forwarded.
  ws = out[0];
  ASSERT_TRUE(s.learn(ws, failed, wake));
  EXPECT_EQ(ws.attempts, 2u);
  EXPECT_FALSE(s.learn(ws, failed, wake));
}

}  // namespace
}  // namespace gatherer::broker
