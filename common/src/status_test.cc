#include "gatherer/status.h"

#include <gtest/gtest.h>

#include <set>
#include <string_view>

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

TEST(StatusTest, HttpStatusHasWireValue16) {
  EXPECT_EQ(static_cast<int>(StatusCode::kHttpStatus), 16);
  EXPECT_EQ(StatusCodeFromWire(16), StatusCode::kHttpStatus);
  EXPECT_EQ(StatusCodeName(StatusCode::kHttpStatus), "http_status");
  EXPECT_EQ(StatusCodeName(StatusCode::kPermissionDenied), "permission_denied");
  EXPECT_FALSE(IsRetryable(StatusCode::kPermissionDenied));
  EXPECT_EQ(Status(StatusCode::kHttpStatus, "HTTP 404 Not Found").ToString(), "http_status: HTTP 404 Not Found");
  // The HTTP status decided; trying again is the fetcher's business, not the code's.
  EXPECT_FALSE(IsRetryable(StatusCode::kHttpStatus));
}

TEST(StatusTest, EveryWireValueRoundTripsOrBecomesInternal) {
  // 6, 11 and 12 are absl codes Gatherer does not use; they and anything
  // past the last code read as internal.
  std::set<std::string_view> names;
  for (int v = 0; v < 256; ++v) {
    const StatusCode code = StatusCodeFromWire(static_cast<std::uint8_t>(v));
    const bool used = v <= 5 || (v >= 7 && v <= 10) || (v >= 13 && v <= 16);
    if (used) {
      EXPECT_EQ(static_cast<int>(code), v);
      names.insert(StatusCodeName(code));
    } else {
      EXPECT_EQ(code, StatusCode::kInternal) << v;
    }
  }
  EXPECT_EQ(names.size(), 14u) << "every used code has a name of its own";
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
