#include "gatherer/log.h"

#include <gtest/gtest.h>

namespace gatherer {
namespace {

TEST(ParseLogLevelTest, NumbersAndNames) {
  EXPECT_EQ(ParseLogLevel("10").value(), 10);
  EXPECT_EQ(ParseLogLevel("35").value(), 35);
  EXPECT_EQ(ParseLogLevel("debug").value(), 10);
  EXPECT_EQ(ParseLogLevel("INFO").value(), 20);
  EXPECT_EQ(ParseLogLevel("warning").value(), 30);
  EXPECT_EQ(ParseLogLevel("warn").value(), 30);
  EXPECT_EQ(ParseLogLevel("error").value(), 40);
  EXPECT_EQ(ParseLogLevel("critical").value(), 50);
  EXPECT_FALSE(ParseLogLevel("5"));
  EXPECT_FALSE(ParseLogLevel("60"));
  EXPECT_FALSE(ParseLogLevel("verbose"));
  EXPECT_FALSE(ParseLogLevel(""));
}

TEST(RateLimitedLogTest, LetsOneThroughPerIntervalAndCountsTheRest) {
  RateLimitedLog log(std::chrono::hours(1));
  std::uint64_t suppressed = 99;
  EXPECT_TRUE(log.allow(suppressed));
  EXPECT_EQ(suppressed, 0u);
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(log.allow(suppressed));
}

}  // namespace
}  // namespace gatherer
