// gatherer-ctl's renderings: aligned tables, ages, rates, JSON field names.
#include "ctl.h"

#include <gtest/gtest.h>

namespace gatherer::ctl {
namespace {

TEST(CtlTest, TablePadsColumnsAndRightAlignsNumbers) {
  const std::string t = Table({"ID", "HOST", "DONE"}, {{"w1", "10.0.0.1", "5"}, {"worker-22", "h", "1234"}});
  EXPECT_EQ(t,
            "ID         HOST      DONE\n"
            "w1         10.0.0.1     5\n"
            "worker-22  h         1234\n");
  // No rows: the header alone, no trailing spaces.
  EXPECT_EQ(Table({"ID", "STATE"}, {}), "ID  STATE\n");
}

TEST(CtlTest, AgesAndRates) {
  EXPECT_EQ(Age(0), "0ms");
  EXPECT_EQ(Age(999), "999ms");
  EXPECT_EQ(Age(12'400), "12.4s");
  EXPECT_EQ(Age(185'000), "3m05s");
  EXPECT_EQ(Age(7'260'000), "2h01m");
  EXPECT_EQ(Rate(0), "0.0");
  EXPECT_EQ(Rate(12'345), "12.3");
}

TEST(CtlTest, JsonNamesTheFields) {
  const auto s = ToJson(protocol::StatusReport{"0.1.0", 1, 2, 3, 4, 5, 6, 7, 8, 9, 1500, 500});
  EXPECT_EQ(s["done"], 6);
  EXPECT_EQ(s["redispatched"], 9);
  EXPECT_DOUBLE_EQ(s["rate_10s"].get<double>(), 1.5);
  const auto w = ToJson(std::vector<protocol::WorkerRow>{{"w1", "h", 42, 8, 1, 2, 3, 150, "busy"}});
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0]["id"], "w1");
  EXPECT_EQ(w[0]["pid"], 42);
  EXPECT_EQ(w[0]["state"], "busy");
  EXPECT_EQ(ToJson(std::vector<protocol::SessionRow>{}), nlohmann::json::array());
  EXPECT_EQ(s["rate_keys"], nlohmann::json::array());
}

// §3.9.7: the rate keys, in JSON and as a section of `status` that is there
// only when the broker has keys, and says when its list is full.
TEST(CtlTest, RateKeysInStatus) {
  protocol::StatusReport r{"0.1.0", 1, 2, 3, 4, 5, 6, 7, 8, 9, 1500, 500};
  EXPECT_EQ(StatusTable(r, "tcp://b:1").find("rate limits"), std::string::npos);
  r.rate_keys = {{"host api.example:443", {{20, 1000}, {100, 120000}}, 1234, 2, 1500},
                 {"endpoint GET /a/{} api.example:443", {}, 7, 0, 0}};
  const auto j = ToJson(r);
  ASSERT_EQ(j["rate_keys"].size(), 2u);
  EXPECT_EQ(j["rate_keys"][0]["key"], "host api.example:443");
  EXPECT_EQ(j["rate_keys"][0]["windows"], "20:1,100:120");
  EXPECT_EQ(j["rate_keys"][0]["used"], 1234);
  EXPECT_EQ(j["rate_keys"][0]["throttled"], 2);
  EXPECT_EQ(j["rate_keys"][0]["paused_ms"], 1500);
  EXPECT_EQ(j["rate_keys"][1]["windows"], "");
  const std::string t = StatusTable(r, "tcp://b:1");
  const auto at = t.find("\n\nrate limits\n");
  ASSERT_NE(at, std::string::npos) << t;
  EXPECT_EQ(t.substr(at + 2),
            "rate limits\n"
            "KEY                                 WINDOWS       USED  THROTTLED  PAUSED\n"
            "host api.example:443                20:1,100:120  1234          2  1.5s\n"
            "endpoint GET /a/{} api.example:443  -                7          0  -\n");
  EXPECT_EQ(RateKeysTable({{"rule a\x1b[2J\nb h", {}, 1, 0, 0}}).find_first_of("\x1b"), std::string::npos);
  EXPECT_NE(RateKeysTable({{"rule a\x1b[2J\nb h", {}, 1, 0, 0}}).find("rule a?[2J?b h"), std::string::npos);
  r.rate_keys.resize(protocol::kMaxStatusRateKeys, r.rate_keys[1]);
  EXPECT_EQ(RateKeysHeading("rate limits", r.rate_keys), "rate limits (the 100 busiest keys)\n");
}

}  // namespace
}  // namespace gatherer::ctl
