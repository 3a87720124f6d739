#include "gatherer/ids.h"

#include <set>

#include <gtest/gtest.h>

namespace gatherer {
namespace {

TEST(IdsTest, SessionIdIsUuid4AndRoundTrips) {
  SessionId id = NewSessionId();
  const std::string text = id.ToString();
  ASSERT_EQ(text.size(), 36u);
  EXPECT_EQ(text[14], '4');  // version nibble
  EXPECT_NE(std::string("89ab").find(text[19]), std::string::npos);  // RFC 4122 variant
  auto parsed = ParseSessionId(text);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(*parsed, id);
  auto raw = SessionIdFromRaw(id.raw());
  ASSERT_TRUE(raw.has_value());
  EXPECT_EQ(*raw, id);
}

TEST(IdsTest, SessionIdsAreUnique) {
  std::set<SessionId> seen;
  for (int i = 0; i < 1000; ++i) EXPECT_TRUE(seen.insert(NewSessionId()).second);
}

TEST(IdsTest, RejectsBadForms) {
  EXPECT_FALSE(ParseSessionId("not-a-uuid").has_value());
  EXPECT_FALSE(ParseSessionId("zzzzzzzz-zzzz-4zzz-8zzz-zzzzzzzzzzzz").has_value());
  EXPECT_FALSE(SessionIdFromRaw("short").has_value());
}

TEST(IdsTest, WorkerIdsDiffer) { EXPECT_NE(NewWorkerId(), NewWorkerId()); }

}  // namespace
}  // namespace gatherer
