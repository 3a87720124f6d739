#include "gatherer/status.h"

#include <gtest/gtest.h>

namespace gatherer {
namespace {

TEST(StatusTest, OkIsCheapAndEmpty) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "ok");
}

TEST(StatusTest, CarriesCodeAndMessage) {
  Status s = Unavailable("connection refused");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(s.ToString(), "unavailable: connection refused");
  Status copy = s;
  EXPECT_EQ(copy, s);
}

TEST(StatusTest, RetryableCodesAreTransientOnes) {
  EXPECT_TRUE(IsRetryable(StatusCode::kUnavailable));
  EXPECT_TRUE(IsRetryable(StatusCode::kDeadlineExceeded));
  EXPECT_FALSE(IsRetryable(StatusCode::kInvalidArgument));
  EXPECT_FALSE(IsRetryable(StatusCode::kFailedPrecondition));
  EXPECT_FALSE(IsRetryable(StatusCode::kCancelled));
}

TEST(StatusTest, UnknownWireCodeBecomesInternal) {
  EXPECT_EQ(StatusCodeFromWire(14), StatusCode::kUnavailable);
  EXPECT_EQ(StatusCodeFromWire(200), StatusCode::kInternal);
  EXPECT_EQ(StatusCodeFromWire(2), StatusCode::kUnknown);
  EXPECT_EQ(StatusCodeName(StatusCode::kUnknown), "unknown");
  EXPECT_EQ(StatusCodeName(StatusCode::kAborted), "aborted");
  EXPECT_FALSE(IsRetryable(StatusCode::kUnknown));
}

TEST(StatusTest, ResultHoldsValueOrStatus) {
  Result<int> good = 3;
  Result<int> bad = Unexpected(NotFound("x"));
  ASSERT_TRUE(good.has_value());
  EXPECT_EQ(*good, 3);
  ASSERT_FALSE(bad.has_value());
  EXPECT_EQ(bad.error().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace gatherer
