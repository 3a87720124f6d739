// Tests of the CLI's JSON Lines input and output (jsonl.h).

#include "jsonl.h"

#include <cstdio>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

namespace gatherer::cli {
namespace {

// gmock is not linked into client_test; a substring check is all we need.
::testing::AssertionResult Contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << text << "' does not contain '" << part << "'";
}

std::string ParseError(std::string_view line) {
  auto r = ParseStatementLine(line);
  if (r) return "(parsed)";
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  return r.error().message();
}

// --- ParseStatementLine -------------------------------------------------------

TEST(ParseStatementLineTest, BareUrl) {
  auto r = ParseStatementLine("  https://api.example/a?b=1 \r");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->url, "https://api.example/a?b=1");
  EXPECT_EQ(r->method, "GET");
  EXPECT_TRUE(r->headers.empty());
  EXPECT_TRUE(r->body.empty());
  EXPECT_FALSE(r->idempotent.has_value());
}

TEST(ParseStatementLineTest, BareUrlIsNotValidatedHere) {
  auto r = ParseStatementLine("ftp://x");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->url, "ftp://x");
}

TEST(ParseStatementLineTest, JsonObjectWithEveryKey) {
  auto r = ParseStatementLine(
      R"( {"url":"http://h/p","method":"POST","headers":{"A":"1","B":"x\ny"},)"
      R"("body":"{\"k\":\"\u00e9\"}","timeout_ms":1500,"idempotent":true}  )"
      "\r");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->url, "http://h/p");
  EXPECT_EQ(r->method, "POST");
  ASSERT_EQ(r->headers.size(), 2u);
  EXPECT_EQ(r->headers[0], (std::pair<std::string, std::string>{"A", "1"}));
  EXPECT_EQ(r->headers[1], (std::pair<std::string, std::string>{"B", "x\ny"}));
  EXPECT_EQ(r->body, "{\"k\":\"\xc3\xa9\"}");
  EXPECT_EQ(r->timeout_ms, 1500u);
  ASSERT_TRUE(r->idempotent.has_value());
  EXPECT_TRUE(*r->idempotent);
}

TEST(ParseStatementLineTest, JsonDefaults) {
  auto r = ParseStatementLine(R"({"url":"http://h/"})");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->method, "GET");
  EXPECT_EQ(r->timeout_ms, 0u);
  EXPECT_FALSE(r->idempotent.has_value());
}

TEST(ParseStatementLineTest, NullMeansAbsent) {
  auto r = ParseStatementLine(
      R"({"url":"http://h/","method":null,"headers":null,"body":null,"timeout_ms":null,"idempotent":null})");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->method, "GET");
  EXPECT_FALSE(r->idempotent.has_value());
}

TEST(ParseStatementLineTest, HeadersAsArrayOfPairsKeepOrderAndRepeats) {
  auto r = ParseStatementLine(
      R"({"url":"http://h/","headers":[["Accept","a"],["X-Y","1"],["Accept","b"]]})");
  ASSERT_TRUE(r) << r.error().ToString();
  ASSERT_EQ(r->headers.size(), 3u);
  EXPECT_EQ(r->headers[0].first, "Accept");
  EXPECT_EQ(r->headers[1].first, "X-Y");
  EXPECT_EQ(r->headers[2].second, "b");
}

TEST(ParseStatementLineTest, BadHeaders) {
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":[["A"]]})"), "[name, value]"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":[["A","b","c"]]})"), "[name, value]"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":[["A",1]]})"), "[name, value]"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":["A: b"]})"), "[name, value]"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":{"A":1}})"), "'headers.A' must be a string"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","headers":"A: b"})"), "'headers' must be"));
}

TEST(ParseStatementLineTest, BadJson) {
  for (const char* line : {R"({"url":"http://h/")", R"({"url":"http://h/",})", R"({url:"x"})",
                           R"({"url":"http://h/"} x)", R"({"url":"a"}{"url":"b"})", "{"}) {
    const std::string error = ParseError(line);
    EXPECT_TRUE(Contains(error, "JSON") || Contains(error, "trailing")) << line << " -> " << error;
  }
}

TEST(ParseStatementLineTest, UnknownKeyIsAnError) {
  EXPECT_EQ(ParseError(R"({"url":"http://h/","heders":{}})"), "unknown key 'heders'");
}

TEST(ParseStatementLineTest, RepeatedKeyIsAnError) {
  EXPECT_EQ(ParseError(R"({"url":"http://a/","url":"http://b/"})"), "key 'url' repeated");
}

TEST(ParseStatementLineTest, MissingUrl) {
  EXPECT_EQ(ParseError(R"({"method":"GET"})"), "missing 'url'");
  EXPECT_EQ(ParseError(R"({})"), "missing 'url'");
}

TEST(ParseStatementLineTest, WrongTypes) {
  EXPECT_EQ(ParseError(R"({"url":5})"), "'url' must be a string");
  EXPECT_EQ(ParseError(R"({"url":null})"), "'url' must be a string");
  EXPECT_EQ(ParseError(R"({"url":"u","method":1})"), "'method' must be a string");
  EXPECT_EQ(ParseError(R"({"url":"u","body":[]})"), "'body' must be a string");
  EXPECT_EQ(ParseError(R"({"url":"u","timeout_ms":"5"})"), "'timeout_ms' must be a number");
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","timeout_ms":-1})"), "between"));
  EXPECT_TRUE(Contains(ParseError(R"({"url":"u","timeout_ms":5e12})"), "between"));
  EXPECT_EQ(ParseError(R"({"url":"u","idempotent":1})"), "'idempotent' must be true or false");
}

TEST(ParseStatementLineTest, ParserIsReusedAcrossLinesOfDifferentSizes) {
  const std::string big = R"({"url":"http://h/","body":")" + std::string(100000, 'x') + R"("})";
  for (int i = 0; i < 3; ++i) {
    auto a = ParseStatementLine(big);
    ASSERT_TRUE(a);
    EXPECT_EQ(a->body.size(), 100000u);
    auto b = ParseStatementLine(R"({"url":"http://h/s"})");
    ASSERT_TRUE(b);
    EXPECT_EQ(b->url, "http://h/s");
    EXPECT_TRUE(b->body.empty());
  }
}

// --- AppendResponseJson -------------------------------------------------------

Response OkResponse() {
  Response r;
  r.status = 200;
  r.headers = {{"Content-Type", "text/plain"}};
  r.body = "hello";
  r.attempts = 1;
  r.elapsed_us = 12345;
  r.worker = "w-1";
  return r;
}

TEST(AppendResponseJsonTest, OneLineWithEveryField) {
  std::string out = "previous\n";
  AppendResponseJson(out, 7, OkResponse());
  EXPECT_EQ(out,
            "previous\n"
            R"({"index":7,"status":200,"headers":{"Content-Type":"text/plain"},"body":"hello",)"
            R"("error":null,"attempts":1,"elapsed_ms":12.345,"worker":"w-1"})"
            "\n");
}

TEST(AppendResponseJsonTest, ElapsedMsKeepsThreeDecimals) {
  Response r = OkResponse();
  r.elapsed_us = 5;
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("elapsed_ms":0.005,)"));
  r.elapsed_us = 2'000'000;
  out.clear();
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("elapsed_ms":2000.000,)"));
}

TEST(AppendResponseJsonTest, EscapesStrings) {
  Response r = OkResponse();
  static constexpr char kRaw[] = "q\"b\\n\nr\rt\tb\bf\f\x01\x1f\0z/\xc3\xa9";
  r.body.assign(kRaw, sizeof kRaw - 1);
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("body":"q\"b\\n\nr\rt\tb\bf\f\u0001\u001f\u0000z/)"
                            "\xc3\xa9\","))
      << out;
  // Exactly one newline: the terminator.
  EXPECT_EQ(out.find('\n'), out.size() - 1);
}

TEST(AppendResponseJsonTest, InvalidUtf8BodyIsBase64) {
  Response r = OkResponse();
  r.body = std::string("\xff\xfe\x00\x01", 4);
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("body_base64":"//4AAQ==",)")) << out;
  EXPECT_FALSE(Contains(out, R"("body":)"));

  for (const auto& [body, encoded] : std::initializer_list<std::pair<std::string, std::string>>{
           {"\xff", "/w=="}, {"\xff\xff", "//8="}, {"\xff\xff\xff", "////"}}) {
    r.body = body;
    out.clear();
    AppendResponseJson(out, 0, r);
    EXPECT_TRUE(Contains(out, "\"body_base64\":\"" + encoded + "\"")) << out;
  }
}

TEST(AppendResponseJsonTest, EmptyBodyIsAnEmptyString) {
  Response r = OkResponse();
  r.body.clear();
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("body":"",)"));
}

TEST(AppendResponseJsonTest, ErrorObject) {
  Response r;
  r.status = 404;
  r.error = ResponseError{StatusCode::kFailedPrecondition, "status 404 \"Not Found\""};
  r.attempts = 1;
  std::string out;
  AppendResponseJson(out, 3, r);
  EXPECT_TRUE(Contains(
      out, R"("error":{"kind":"failed_precondition","message":"status 404 \"Not Found\""},)"))
      << out;
  EXPECT_TRUE(Contains(out, R"({"index":3,"status":404,"headers":{},"body":"",)")) << out;
}

TEST(AppendResponseJsonTest, DuplicateHeadersJoined) {
  Response r = OkResponse();
  r.headers = {{"Set-Cookie", "a=1"}, {"Content-Type", "text/plain"}, {"set-cookie", "b=2"},
               {"SET-COOKIE", "c=3"}};
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("headers":{"Set-Cookie":"a=1, b=2, c=3","Content-Type":"text/plain"},)"))
      << out;
}

TEST(AppendResponseJsonTest, NonUtf8HeaderValueReadAsLatin1) {
  Response r = OkResponse();
  r.headers = {{"X", "caf\xe9 \"x\""}};
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("headers":{"X":"caf\u00e9 \"x\""},)")) << out;
}

// --- ReadStatements -----------------------------------------------------------

TEST(ReadStatementsTest, SkipsBlankLinesAndNamesTheBadLine) {
  // Line 8 is bad; lines 2, 5 and 7 are blank (one of them only whitespace).
  const std::string input =
      "http://h/1\n"
      "\n"
      R"({"url":"http://h/3","method":"POST","body":"x"})" "\n"
      "http://h/4\r\n"
      "   \t\n"
      "http://h/6\n"
      "\n"
      "http://\n"
      "http://h/9\n";
  std::istringstream in(input);
  auto r = ReadStatements(in, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.error().message(), "line 8: url has no host");
}

TEST(ReadStatementsTest, ReadsAllGoodLines) {
  const std::string input =
      "\n"
      "http://h/1\n"
      "   \n"
      R"({"url":"/p","headers":[["A","b"]]})" "\r\n"
      "https://h/3";  // no final newline
  SessionSettings settings;
  settings.base_url = "http://base";
  std::istringstream in(input);
  auto r = ReadStatements(in, settings);
  ASSERT_TRUE(r) << r.error().ToString();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_EQ((*r)[0].url, "http://h/1");
  EXPECT_EQ((*r)[1].url, "/p");
  EXPECT_EQ((*r)[1].headers.size(), 1u);
  EXPECT_EQ((*r)[2].url, "https://h/3");
}

TEST(ReadStatementsTest, ParseErrorsNameTheLineToo) {
  std::istringstream in("http://h/1\n{\"url\":\"http://h/\",\"x\":1}\n");
  auto r = ReadStatements(in, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().message(), "line 2: unknown key 'x'");
}

TEST(ReadStatementsTest, ValidatesAgainstSessionSettings) {
  std::istringstream in("/relative\n");
  auto r = ReadStatements(in, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_TRUE(Contains(r.error().message(), "line 1: ")) << r.error().message();
  EXPECT_TRUE(Contains(r.error().message(), "base_url")) << r.error().message();
}

TEST(ReadStatementsTest, EmptyInputGivesNoStatements) {
  std::istringstream in("\n \n");
  auto r = ReadStatements(in, SessionSettings{});
  ASSERT_TRUE(r);
  EXPECT_TRUE(r->empty());
}

TEST(ReadStatementsTest, ByteOrderMarkOnFirstLineIgnored) {
  std::istringstream in("\xEF\xBB\xBFhttp://h/1\n");
  auto r = ReadStatements(in, SessionSettings{});
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ((*r)[0].url, "http://h/1");
}

TEST(ReadStatementsTest, FromFile) {
  std::string input;
  for (int i = 1; i <= 7; ++i) input += i % 3 == 0 ? "\n" : "http://h/" + std::to_string(i) + "\n";
  input += "ftp://x\n";
  std::FILE* f = ::fmemopen(input.data(), input.size(), "r");
  ASSERT_NE(f, nullptr);
  auto r = ReadStatements(f, SessionSettings{});
  std::fclose(f);
  ASSERT_FALSE(r);
  EXPECT_TRUE(Contains(r.error().message(), "line 8: ")) << r.error().message();
  EXPECT_TRUE(Contains(r.error().message(), "scheme not allowed")) << r.error().message();

  input.resize(input.size() - std::string("ftp://x\n").size());
  f = ::fmemopen(input.data(), input.size(), "r");
  ASSERT_NE(f, nullptr);
  auto ok = ReadStatements(f, SessionSettings{});
  std::fclose(f);
  ASSERT_TRUE(ok) << ok.error().ToString();
  EXPECT_EQ(ok->size(), 5u);
  EXPECT_EQ(ok->back().url, "http://h/7");
}

// --- flags --------------------------------------------------------------------

TEST(ParseHeaderArgTest, NameColonValue) {
  auto h = ParseHeaderArg("X-Riot-Token:  abc def \t");
  ASSERT_TRUE(h) << h.error().ToString();
  EXPECT_EQ(h->first, "X-Riot-Token");
  EXPECT_EQ(h->second, "abc def");
  auto empty = ParseHeaderArg("X-Empty:");
  ASSERT_TRUE(empty);
  EXPECT_EQ(empty->second, "");
}

TEST(ParseHeaderArgTest, Malformed) {
  EXPECT_FALSE(ParseHeaderArg("no colon"));
  EXPECT_FALSE(ParseHeaderArg(": value"));
  EXPECT_FALSE(ParseHeaderArg("Bad Name: v"));
  EXPECT_FALSE(ParseHeaderArg("X: a\r\nY: b"));
}


}  // namespace
}  // namespace gatherer::cli
