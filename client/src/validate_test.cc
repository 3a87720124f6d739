// One test per ValidateStatement rule (README, "Library").

#include <string>

#include <gtest/gtest.h>

#include "gatherer/gatherer.h"

namespace gatherer {
namespace {

// gmock is not linked into client_test; a substring check is all we need.
::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

Status Check(const Statement& s, const SessionSettings& settings = {}) {
  return ValidateStatement(s, settings);
}

Statement WithUrl(std::string url) { return Get(std::move(url)); }

Statement WithMethod(std::string method) {
  Statement s = Get("http://example.com/");
  s.method = std::move(method);
  return s;
}

Statement WithHeader(std::string name, std::string value) {
  Statement s = Get("http://example.com/");
  s.headers.emplace_back(std::move(name), std::move(value));
  return s;
}

TEST(ValidateTest, AcceptsPlainGet) {
  EXPECT_TRUE(Check(WithUrl("http://example.com/a?b=1#c")).ok());
  EXPECT_TRUE(Check(WithUrl("https://example.com")).ok());
}

TEST(ValidateTest, MethodMustBeOneOfTheUpperCaseTokens) {
  for (const char* m : {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}) {
    EXPECT_TRUE(Check(WithMethod(m)).ok()) << m;
  }
  for (const char* m : {"get", "Post", "TRACE", "CONNECT", "", "GET ", "G\r\nET"}) {
    const Status s = Check(WithMethod(m));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << m;
    EXPECT_TRUE(Contains(s.message(), "method")) << m;
  }
}

TEST(ValidateTest, MethodMessageDoesNotEchoControlBytes) {
  const Status s = Check(WithMethod("G\r\nET"));
  EXPECT_EQ(s.message().find_first_of("\r\n"), std::string::npos);
  EXPECT_TRUE(Contains(s.message(), "\\x0D\\x0A"));
}

TEST(ValidateTest, SchemeIsCaseInsensitive) {
  EXPECT_TRUE(Check(WithUrl("HTTP://example.com/")).ok());
  EXPECT_TRUE(Check(WithUrl("HtTpS://example.com/")).ok());
}

TEST(ValidateTest, OtherSchemesAreNotAllowed) {
  for (const char* url : {"ftp://x", "file:///etc/passwd", "gopher://h/", "ws://h/", "mailto:a@b"}) {
    const Status s = Check(WithUrl(url));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << url;
    EXPECT_TRUE(Contains(s.message(), "scheme not allowed")) << url;
  }
}

TEST(ValidateTest, UrlNeedsAHost) {
  for (const char* url : {"http://", "http:///path", "https://:80/", "http://user@/", "http:x",
                          "http://[]/"}) {
    const Status s = Check(WithUrl(url));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << url;
    EXPECT_TRUE(Contains(s.message(), "no host")) << url;
  }
}

TEST(ValidateTest, HostForms) {
  EXPECT_TRUE(Check(WithUrl("http://127.0.0.1:8080/x")).ok());
  EXPECT_TRUE(Check(WithUrl("http://[::1]:8080/x")).ok());
  EXPECT_TRUE(Check(WithUrl("http://user:pw@host/x")).ok());
  EXPECT_TRUE(Check(WithUrl("http://host:/x")).ok());  // empty port = default
  EXPECT_TRUE(Check(WithUrl("http://host?q")).ok());
  EXPECT_TRUE(Contains(Check(WithUrl("http://host:99999/")).message(), "port"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://host:8a/")).message(), "port"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://host:0/")).message(), "port"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://[::1/")).message(), "IPv6"));
}

TEST(ValidateTest, UrlMustNotContainSpacesOrControlBytes) {
  EXPECT_TRUE(Contains(Check(WithUrl("http://h/a b")).message(), "space"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://h/a\r\nHost: evil")).message(), "CR/LF"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://h/a\n")).message(), "CR/LF"));
  EXPECT_TRUE(Contains(Check(WithUrl(std::string("http://h/a\0b", 12))).message(), "control"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://h/a\tb")).message(), "control"));
  EXPECT_TRUE(Contains(Check(WithUrl("http://h/a\x7f")).message(), "control"));
}

TEST(ValidateTest, UrlAtMost8KiB) {
  const std::string prefix = "http://h/";
  EXPECT_TRUE(Check(WithUrl(prefix + std::string(8192 - prefix.size(), 'a'))).ok());
  const Status s = Check(WithUrl(prefix + std::string(8193 - prefix.size(), 'a')));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "8192"));
}

TEST(ValidateTest, EmptyOrRelativeUrlIsRejected) {
  EXPECT_TRUE(Contains(Check(WithUrl("")).message(), "url is empty"));
  EXPECT_TRUE(Contains(Check(WithUrl("example.com/a")).message(), "absolute"));
  EXPECT_TRUE(Contains(Check(WithUrl("//example.com/a")).message(), "base_url"));
}

TEST(ValidateTest, PathNeedsABaseUrl) {
  const Status s = Check(WithUrl("/a/b"));
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(s.message(), "no base_url"));

  SessionSettings settings;
  settings.base_url = "https://api.example";
  EXPECT_TRUE(Check(WithUrl("/a/b"), settings).ok());
}

TEST(ValidateTest, BaseUrlPlusPathIsValidatedToo) {
  SessionSettings settings;
  settings.base_url = "ftp://files.example";
  EXPECT_TRUE(Contains(Check(WithUrl("/a"), settings).message(), "scheme not allowed"));

  settings.base_url = "https://api.example";
  EXPECT_TRUE(Contains(Check(WithUrl("/a b"), settings).message(), "space"));
  EXPECT_TRUE(Contains(Check(WithUrl(std::string(9000, '/')), settings).message(), "8192"));

  settings.base_url = "http://";
  EXPECT_TRUE(Contains(Check(WithUrl("/a"), settings).message(), "no host"));
}

TEST(ValidateTest, AbsoluteUrlIgnoresBaseUrl) {
  SessionSettings settings;
  settings.base_url = "https://api.example";
  EXPECT_TRUE(Check(WithUrl("http://other.example/x"), settings).ok());
  EXPECT_TRUE(Contains(Check(WithUrl("ftp://x"), settings).message(), "scheme not allowed"));
}

TEST(ValidateTest, HeaderNamesAreNonEmptyTokens) {
  EXPECT_TRUE(Check(WithHeader("X-Riot-Token", "abc")).ok());
  EXPECT_TRUE(Check(WithHeader("!#$%&'*+-.^_`|~09azAZ", "")).ok());
  EXPECT_TRUE(Contains(Check(WithHeader("", "v")).message(), "header name is empty"));
  for (const char* name : {"X Token", "X:Token", "X-Tok\xc3\xa9n", "(x)", "x\"y", "x/y"}) {
    const Status s = Check(WithHeader(name, "v"));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << name;
    EXPECT_TRUE(Contains(s.message(), "not a token")) << name;
  }
}

TEST(ValidateTest, HeaderNamesAndValuesFreeOfCrLfNul) {
  EXPECT_TRUE(Contains(Check(WithHeader("X\r\nEvil", "v")).message(), "contains CR/LF"));
  EXPECT_TRUE(Contains(Check(WithHeader(std::string("X\0Y", 3), "v")).message(), "NUL"));
  EXPECT_EQ(Check(WithHeader("X", "a\r\nEvil: 1")).message(),
            "header 'X' value contains CR/LF");
  EXPECT_EQ(Check(WithHeader("X", "a\n")).message(), "header 'X' value contains CR/LF");
  EXPECT_EQ(Check(WithHeader("X", std::string("a\0b", 3))).message(),
            "header 'X' value contains NUL");
  // Tabs and obs-text are legal in a value (RFC 7230 §3.2).
  EXPECT_TRUE(Check(WithHeader("X", "a\tb \xe9")).ok());
}

TEST(ValidateTest, BodyAtMostTheStatementLimit) {
  Statement s = Get("http://h/");
  s.method = "POST";
  s.body.assign(kMaxStatementBody, 'x');
  EXPECT_TRUE(Check(s).ok());
  s.body.push_back('x');
  const Status st = Check(s);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(Contains(st.message(), "body"));
}

}  // namespace
}  // namespace gatherer
