// request.h on its own: header lists, the checks that end a statement before
// any attempt, source addresses; then one request built by ConfigureRequest
// sent through libcurl to a real server on a loopback address.
#include "request.h"

#include <curl/curl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "gatherer/strings.h"
#include "http_server.h"

namespace gatherer::worker {
namespace {

using gatherer::testing::HttpReply;
using gatherer::testing::HttpRequest;
using gatherer::testing::HttpServer;

std::vector<std::string> Lines(const curl_slist* list) {
  std::vector<std::string> out;
  for (; list != nullptr; list = list->next) out.emplace_back(list->data);
  return out;
}

// What an I/O thread keeps to plan a session's requests (its settings, its
// header lists, the scratch and the statement's own list), and the last plan.
struct Planner {
  explicit Planner(SessionSettings session_settings = {})
      : settings(std::move(session_settings)), headers(settings.headers) {}
  ~Planner() { curl_slist_free_all(own); }
  Planner(const Planner&) = delete;
  Planner& operator=(const Planner&) = delete;

  std::optional<ResponseError> operator()(const Statement& statement, const DestinationPolicy& destinations = {}) {
    return PlanRequest(statement, settings, headers, destinations, scratch, own, plan);
  }

  SessionSettings settings;
  const SessionHeaders headers;
  RequestScratch scratch;
  curl_slist* own = nullptr;  // a statement's own header list, freed with the planner
  RequestPlan plan;
};

TEST(RequestTest, SessionHeadersAddTheUserAgentAndRemoveLibcurlsContentTypeForABody) {
  const SessionHeaders headers({{"Accept", "text/html"}, {"X-Empty", ""}});
  ASSERT_FALSE(headers.error.has_value());
  ASSERT_NE(AcceptEncodingLine(), nullptr);  // Debian's libcurl decodes gzip, deflate, br and zstd
  EXPECT_EQ(Lines(headers.plain()),
            (std::vector<std::string>{"Accept: text/html", "X-Empty;", kUserAgentLine, AcceptEncodingLine()}));
  EXPECT_EQ(Lines(headers.with_body()), (std::vector<std::string>{kNoContentTypeLine, "Accept: text/html", "X-Empty;",
                                                                  kUserAgentLine, AcceptEncodingLine()}));
}

TEST(RequestTest, AcceptEncodingListsWhatLibcurlDecodes) {
  const std::string line = AcceptEncodingLine();
  const curl_version_info_data* info = curl_version_info(CURLVERSION_NOW);
  EXPECT_TRUE(line.starts_with("Accept-Encoding: ")) << line;
  EXPECT_EQ(line.find("gzip") != std::string::npos, (info->features & CURL_VERSION_LIBZ) != 0) << line;
  EXPECT_EQ(line.find("br") != std::string::npos, (info->features & CURL_VERSION_BROTLI) != 0) << line;
  EXPECT_EQ(line.find("zstd") != std::string::npos, (info->features & CURL_VERSION_ZSTD) != 0) << line;
}

TEST(RequestTest, AnAcceptEncodingOfTheSessionOrTheStatementReplacesTheDefault) {
  const SessionHeaders headers(Headers{{"accept-encoding", "identity"}});
  EXPECT_EQ(Lines(headers.plain()), (std::vector<std::string>{"accept-encoding: identity", kUserAgentLine}));

  Planner planner;
  Statement get = Get("http://127.0.0.1/a");
  get.headers = {{"Accept-Encoding", "gzip"}};
  ASSERT_FALSE(planner(get).has_value());
  EXPECT_EQ(Lines(planner.plan.headers), (std::vector<std::string>{"Accept-Encoding: gzip", kUserAgentLine}));
}

TEST(RequestTest, SessionHeadersKeepTheSessionsOwnUserAgentAndContentType) {
  const SessionHeaders headers({{"user-agent", "crawler/2"}, {"Content-Type", "application/json"}});
  ASSERT_FALSE(headers.error.has_value());
  EXPECT_EQ(Lines(headers.plain()),
            (std::vector<std::string>{"user-agent: crawler/2", "Content-Type: application/json",
                                      AcceptEncodingLine()}));
  EXPECT_EQ(headers.with_body(), headers.plain());
}

TEST(RequestTest, AnInvalidSessionHeaderIsTheErrorOfEveryStatement) {
  for (const Headers& bad : {Headers{{"X-Evil", "a\r\nHost: other"}}, Headers{{"Bad Name", "v"}}, Headers{{"", "v"}}}) {
    const SessionHeaders headers(bad);
    ASSERT_TRUE(headers.error.has_value()) << bad[0].first;
    EXPECT_EQ(headers.error->code, StatusCode::kInvalidArgument);
    EXPECT_NE(headers.error->message.find("invalid header '" + bad[0].first + "'"), std::string::npos);

    SessionSettings settings;
    settings.headers = bad;
    Planner planner(settings);
    const auto error = planner(Get("http://127.0.0.1/"));
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->code, StatusCode::kInvalidArgument);
  }
}

TEST(RequestTest, AStatementWithoutHeadersTakesTheSessionsListAsItIs) {
  SessionSettings settings;
  settings.headers = {{"Accept", "*/*"}};
  Planner planner(settings);
  const Statement get = Get("http://127.0.0.1/a");
  ASSERT_FALSE(planner(get).has_value());
  EXPECT_EQ(planner.plan.url, &get.url);  // not copied
  EXPECT_EQ(planner.plan.headers, planner.headers.plain());
  EXPECT_FALSE(planner.plan.posts);
  EXPECT_EQ(planner.own, nullptr);  // nothing allocated for it

  Statement post = get;
  post.method = "POST";
  ASSERT_FALSE(planner(post).has_value());
  EXPECT_EQ(planner.plan.headers, planner.headers.with_body());
  EXPECT_TRUE(planner.plan.posts);
  EXPECT_EQ(planner.own, nullptr);

  Statement head = get;
  head.method = "HEAD";
  head.body = "ignored";
  ASSERT_FALSE(planner(head).has_value());
  EXPECT_FALSE(planner.plan.posts);
}

TEST(RequestTest, AStatementsOwnHeadersReplaceTheSessionsOfTheSameName) {
  SessionSettings settings;
  settings.headers = {{"Accept", "*/*"}, {"X-Session", "s"}};
  Planner planner(settings);
  Statement put = Get("http://127.0.0.1/a");
  put.method = "PUT";
  put.body = "{}";
  put.headers = {{"accept", "application/json"}, {"X-Statement", ""}};
  ASSERT_FALSE(planner(put).has_value());
  EXPECT_EQ(planner.plan.headers, planner.own);
  EXPECT_TRUE(planner.plan.posts);
  EXPECT_EQ(Lines(planner.plan.headers),
            (std::vector<std::string>{"X-Session: s", "accept: application/json", "X-Statement;", kUserAgentLine,
                                      AcceptEncodingLine(), kNoContentTypeLine}));
}

TEST(RequestTest, AnInvalidStatementHeaderEndsTheStatement) {
  Planner planner;
  Statement get = Get("http://127.0.0.1/a");
  get.headers = {{"X-Split", "a\nb"}};
  const auto error = planner(get);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kInvalidArgument);
  EXPECT_EQ(error->message, "invalid header 'X-Split'");
}

TEST(RequestTest, APathIsJoinedToTheBaseUrlAndNeedsOne) {
  Planner planner;
  auto error = planner(Get("/items/1"));
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kInvalidArgument);
  EXPECT_EQ(error->message, "url is a path and the session has no base_url");

  planner.settings.base_url = "https://api.example.com/v1//";
  ASSERT_FALSE(planner(Get("/items/1")).has_value());
  EXPECT_EQ(*planner.plan.url, "https://api.example.com/v1/items/1");
  EXPECT_EQ(planner.plan.url, &planner.scratch.joined_url);
}

TEST(RequestTest, AMethodMustBeAnHttpToken) {
  Planner planner;
  Statement bad = Get("http://127.0.0.1/");
  bad.method = "GET /x HTTP/1.1\r\n";
  const auto error = planner(bad);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kInvalidArgument);
}

TEST(RequestTest, AHostOffTheAllowListIsRefusedBeforeAnyAttempt) {
  Planner planner;
  DestinationPolicy destinations;
  destinations.allowed_hosts = {"*.example.com"};
  EXPECT_FALSE(planner(Get("https://api.example.com/"), destinations).has_value());
  const auto error = planner(Get("https://example.org/"), destinations);
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->code, StatusCode::kPermissionDenied);
  EXPECT_NE(error->message.find("host example.org is not among"), std::string::npos) << error->message;
  EXPECT_EQ(RefusedHost("https://api.example.com/x", destinations), "");
}

TEST(RequestTest, OnlyIpLiteralsAreSourceAddresses) {
  for (const char* good : {"127.0.0.12", "10.0.0.5", "::1", "2001:db8::5", "::ffff:127.0.0.1"}) {
    EXPECT_TRUE(IsIpLiteral(good)) << good;
  }
  for (const char* bad : {"", "localhost", "eth0", "127.0.0.256", "127.0.0.1 ", "fe80::1%eth0", "host!127.0.0.1",
                          "1.2.3", "0000:0000:0000:0000:0000:0000:0000:0000:0000"}) {
    EXPECT_FALSE(IsIpLiteral(bad)) << bad;
  }
}

// Hooks that gather the body into a std::string (`data`).
size_t GatherBody(char* data, size_t size, size_t count, void* user) {
  static_cast<std::string*>(user)->append(data, size * count);
  return size * count;
}
size_t IgnoreHeader(char*, size_t size, size_t count, void*) { return size * count; }

TEST(RequestTest, ConfiguredRequestCarriesMethodBodyHeadersAndLeavesFromTheSourceAddress) {
  std::mutex mu;
  HttpRequest seen;  // guarded by mu: the handler runs on the server's thread
  HttpServer server([&](const HttpRequest& request) {
    std::lock_guard lock(mu);
    seen = request;
    return HttpReply{200, {}, "done"};
  });
  SessionSettings settings;
  settings.headers = {{"X-Session", "s"}};
  Planner planner(settings);
  Statement patch = Get(server.url("/thing"));
  patch.method = "PATCH";
  patch.body = "{\"a\":1}";
  patch.headers = {{"Content-Type", "application/json"}};
  const DestinationPolicy destinations;
  ASSERT_FALSE(planner(patch, destinations).has_value());

  CURL* easy = curl_easy_init();
  ASSERT_NE(easy, nullptr);
  std::string body;
  char error_buffer[CURL_ERROR_SIZE] = {};
  RequestHooks hooks;
  hooks.data = &body;
  hooks.error_buffer = error_buffer;
  hooks.write = &GatherBody;
  hooks.header = &IgnoreHeader;
  RequestPolicy policy;
  policy.destinations = &destinations;
  policy.interface = "host!127.0.0.23";
  ASSERT_FALSE(ConfigureRequest(easy, patch, planner.settings, planner.plan, false, nullptr, policy, hooks).has_value());
  const CURLcode rc = curl_easy_perform(easy);
  curl_easy_cleanup(easy);
  ASSERT_EQ(rc, CURLE_OK) << curl_easy_strerror(rc) << ": " << error_buffer;
  EXPECT_EQ(body, "done");
  std::lock_guard lock(mu);
  EXPECT_EQ(seen.method, "PATCH");
  EXPECT_EQ(seen.target, "/thing");
  EXPECT_EQ(seen.body, "{\"a\":1}");
  EXPECT_EQ(seen.header("Content-Type"), "application/json");
  EXPECT_EQ(seen.header("X-Session"), "s");
  EXPECT_EQ(seen.header("User-Agent"), std::string(kUserAgentLine).substr(12));
  EXPECT_EQ(seen.header("Accept-Encoding"), std::string(AcceptEncodingLine()).substr(17));
  EXPECT_EQ(std::count_if(seen.headers.begin(), seen.headers.end(),
                          [](const auto& h) { return EqualsIgnoreCase(h.first, "Accept-Encoding"); }),
            1);  // the list's line, none of libcurl's beside it
  EXPECT_EQ(seen.peer_address, "127.0.0.23");
}

}  // namespace
}  // namespace gatherer::worker
