#include "gatherer/rate_limit.h"

#include <gtest/gtest.h>

namespace gatherer {
namespace {

constexpr std::int64_t kNow = 784111777;  // Sun, 06 Nov 1994 08:49:37 GMT

TEST(RateWindowsTest, ParsesCountSecondsPairs) {
  auto w = ParseRateWindows("20:1,100:120");
  ASSERT_TRUE(w);
  EXPECT_EQ(*w, (RateWindows{{20, 1000}, {100, 120'000}}));
  EXPECT_EQ(ParseRateWindows(" 10:0.25 ")->front(), (RateWindow{10, 250}));
  EXPECT_EQ(FormatRateWindows(*w), "20:1,100:120");
  EXPECT_EQ(FormatRateWindows({{10, 250}}), "10:0.25");
  for (const char* bad : {"", "20", "20:", ":1", "0:1", "20:0", "20:1,", "a:1", "20:1.2345", "2000000:1",
                          "20:100000", "-1:1", "20:1;100:120"}) {
    EXPECT_FALSE(ParseRateWindows(bad)) << bad;
  }
}

TEST(RateRuleTest, HostAndNamedRules) {
  auto host = ParseRateRule("20:1,100:120");
  ASSERT_TRUE(host);
  EXPECT_TRUE(host->path.empty());
  EXPECT_EQ(host->windows.size(), 2u);
  auto named = ParseRateRule("match=GET /matches/{id} 250:10");
  ASSERT_TRUE(named);
  EXPECT_EQ(named->name, "match");
  EXPECT_EQ(named->method, "GET");
  EXPECT_EQ(named->path, "/matches/{id}");
  EXPECT_EQ(named->windows, (RateWindows{{250, 10'000}}));
  auto unnamed = ParseRateRule("/summoners/* 5:1");
  ASSERT_TRUE(unnamed);
  EXPECT_EQ(unnamed->name, "/summoners/*");
  EXPECT_TRUE(unnamed->method.empty());
  for (const char* bad : {"GET 20:1", "= /a 20:1", "get /a 20:1", "/a 20", "a/b 20:1"}) {
    EXPECT_FALSE(ParseRateRule(bad)) << bad;
  }
}

TEST(RateRuleTest, PathPatterns) {
  EXPECT_TRUE(MatchRatePath("/matches/{id}", "/matches/42"));
  EXPECT_TRUE(MatchRatePath("/matches/{id}", "/matches/42?x=1"));
  EXPECT_FALSE(MatchRatePath("/matches/{id}", "/matches/42/timeline"));
  EXPECT_FALSE(MatchRatePath("/matches/{id}", "/matches/"));
  EXPECT_TRUE(MatchRatePath("/a/*/c", "/a/b/c"));
  EXPECT_TRUE(MatchRatePath("/a/**", "/a/b/c"));
  EXPECT_FALSE(MatchRatePath("/a", "/b"));
  std::string_view host, path;
  ASSERT_TRUE(SplitUrl("http://127.0.0.1:8080/x/y?z", host, path));
  EXPECT_EQ(host, "127.0.0.1:8080");
  EXPECT_EQ(path, "/x/y?z");
  ASSERT_TRUE(SplitUrl("https://u:p@h", host, path));
  EXPECT_EQ(host, "h");
  EXPECT_EQ(path, "/");
  EXPECT_FALSE(SplitUrl("/relative", host, path));
}

TEST(RateHeadersTest, NothingToSayIsNullopt) {
  EXPECT_FALSE(ParseRateHeaders(200, {{"Content-Type", "application/json"}}, kNow));
  EXPECT_FALSE(ParseRateHeaders(503, {}, kNow));
  auto bare = ParseRateHeaders(429, {}, kNow);
  ASSERT_TRUE(bare);
  EXPECT_TRUE(bare->throttled);
  EXPECT_EQ(bare->retry_after_ms, 0u);
}

TEST(RateHeadersTest, RiotStyle) {
  auto r = ParseRateHeaders(429,
                            {{"x-app-rate-limit", "20:1,100:120"},
                             {"X-App-Rate-Limit-Count", "21:1,40:120"},
                             {"X-Method-Rate-Limit", "250:10"},
                             {"X-Method-Rate-Limit-Count", "3:10"},
                             {"Retry-After", "2"},
                             {"X-Rate-Limit-Type", "method"}},
                            kNow);
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->throttled);
  EXPECT_EQ(r->type, RateLimitType::kMethod);
  EXPECT_EQ(r->retry_after_ms, 2000u);
  EXPECT_EQ(r->app, (RateWindows{{20, 1000}, {100, 120'000}}));
  EXPECT_EQ(r->method, (RateWindows{{250, 10'000}}));
  auto ok = ParseRateHeaders(200, {{"X-App-Rate-Limit", "20:1, junk, 100:120"}}, kNow);
  ASSERT_TRUE(ok);
  EXPECT_FALSE(ok->throttled);
  EXPECT_EQ(ok->app.size(), 2u);
  auto service = ParseRateHeaders(429, {{"X-Rate-Limit-Type", "service"}}, kNow);
  EXPECT_EQ(service->type, RateLimitType::kService);
}

TEST(RateHeadersTest, RetryAfterSecondsAndDates) {
  EXPECT_EQ(ParseRetryAfter("120", kNow), 120'000u);
  EXPECT_EQ(ParseRetryAfter("Sun, 06 Nov 1994 08:49:40 GMT", kNow), 3000u);
  EXPECT_EQ(ParseRetryAfter("Sun, 06 Nov 1994 08:49:30 GMT", kNow), 0u);
  EXPECT_FALSE(ParseRetryAfter("soon", kNow));
  // The two obsolete HTTP-date forms a recipient must still read (RFC 9110 §5.6.7).
  EXPECT_EQ(ParseRetryAfter("Sunday, 06-Nov-94 08:49:40 GMT", kNow), 3000u);
  EXPECT_EQ(ParseRetryAfter("Sun Nov  6 08:49:40 1994", kNow), 3000u);
  EXPECT_FALSE(ParseRetryAfter("Sun Nov  6 25:49:40 1994", kNow));
  EXPECT_FALSE(ParseRetryAfter("Sunday, 06-Nov-94 08:49:40 UTC", kNow));
  EXPECT_FALSE(ParseRetryAfter("Sun, 06 Foo 1994 08:49:40 GMT", kNow));
  EXPECT_EQ(ParseRateHeaders(429, {{"Retry-After", "99999999999"}}, kNow)->retry_after_ms, kMaxRateWindowMs);
}

TEST(RateHeadersTest, DraftAndIetfHeaders) {
  auto draft = ParseRateHeaders(
      200, {{"RateLimit-Limit", "100"}, {"RateLimit-Remaining", "0"}, {"RateLimit-Reset", "30"}}, kNow);
  ASSERT_TRUE(draft);
  EXPECT_EQ(draft->retry_after_ms, 30'000u);
  auto policy = ParseRateHeaders(200, {{"RateLimit-Policy", "10;w=1, 100;w=60"}}, kNow);
  ASSERT_TRUE(policy);
  EXPECT_EQ(policy->app, (RateWindows{{10, 1000}, {100, 60'000}}));
  auto ietf = ParseRateHeaders(
      200, {{"RateLimit-Policy", "\"burst\";q=100;w=60"}, {"RateLimit", "\"burst\";r=0;t=5"}}, kNow);
  ASSERT_TRUE(ietf);
  EXPECT_EQ(ietf->app, (RateWindows{{100, 60'000}}));
  EXPECT_EQ(ietf->retry_after_ms, 5000u);
  auto old = ParseRateHeaders(200, {{"RateLimit", "limit=100, remaining=0, reset=7"}}, kNow);
  ASSERT_TRUE(old);
  EXPECT_EQ(old->retry_after_ms, 7000u);
  auto x = ParseRateHeaders(
      200, {{"X-RateLimit-Limit", "60"}, {"X-RateLimit-Remaining", "0"}, {"X-RateLimit-Reset", "784111787"}}, kNow);
  ASSERT_TRUE(x);
  EXPECT_EQ(x->retry_after_ms, 10'000u);
  auto windowed = ParseRateHeaders(200, {{"X-RateLimit-Limit", "60"}, {"X-RateLimit-Window", "60"}}, kNow);
  ASSERT_TRUE(windowed);
  EXPECT_EQ(windowed->app, (RateWindows{{60, 60'000}}));
  // Remaining above zero says nothing worth reporting.
  EXPECT_FALSE(ParseRateHeaders(200, {{"X-RateLimit-Limit", "60"}, {"X-RateLimit-Remaining", "5"}}, kNow));
}

}  // namespace
}  // namespace gatherer
