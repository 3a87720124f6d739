// Tests of the CLI's JSON Lines input and output (jsonl.h). Over 600 lines:
// one suite of many short cases, one per input or output rule.

#include "jsonl.h"
#include "flags.h"
#include "json_escape.h"
#include "summary.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <utility>

#include <simdjson.h>
#include <vector>

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
  EXPECT_EQ(ParseError(R"({"url":"u","body":5})"), "'body' must be a string, an object or an array");
  EXPECT_EQ(ParseError(R"({"url":"u","body":false})"), "'body' must be a string, an object or an array");
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

TEST(ParseStatementLineTest, JsonBodyIsSentAsItsJsonTextWithAJsonContentType) {
  auto r = ParseStatementLine(R"({"url":"http://h/","method":"POST","body":{"a": [1, 2.5e3, "x\"y"], "b":{}} })");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->body, R"({"a": [1, 2.5e3, "x\"y"], "b":{}})");
  ASSERT_EQ(r->headers.size(), 1u);
  EXPECT_EQ(r->headers[0], (std::pair<std::string, std::string>{"Content-Type", "application/json"}));

  r = ParseStatementLine(R"({"body":[1,{"k":null}],"url":"http://h/","method":"PUT"})");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->body, R"([1,{"k":null}])");
  ASSERT_EQ(r->headers.size(), 1u);
  EXPECT_EQ(r->headers[0].second, "application/json");
}

TEST(ParseStatementLineTest, JsonBodyKeepsTheLinesContentType) {
  // Headers after the body, name in another case: still the line's choice.
  auto r = ParseStatementLine(
      R"({"url":"http://h/","method":"POST","body":{"a":1},"headers":[["content-TYPE","application/x+json"]]})");
  ASSERT_TRUE(r) << r.error().ToString();
  ASSERT_EQ(r->headers.size(), 1u);
  EXPECT_EQ(r->headers[0].second, "application/x+json");
  EXPECT_EQ(r->body, R"({"a":1})");
}

TEST(ParseStatementLineTest, JsonBodyWithoutContentTypeWhenTurnedOff) {
  ParseOptions options;
  options.json_content_type = false;
  auto r = ParseStatementLine(R"({"url":"http://h/","method":"POST","body":{"a":1}})", options);
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_TRUE(r->headers.empty());
  EXPECT_EQ(r->body, R"({"a":1})");
}

TEST(ParseStatementLineTest, StringBodyIsSentAsIsWithoutAContentType) {
  auto r = ParseStatementLine(R"({"url":"http://h/","method":"POST","body":"{\"a\":1}"})");
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(r->body, R"({"a":1})");
  EXPECT_TRUE(r->headers.empty());
}

TEST(ParseStatementLineTest, InvalidJsonInsideABodyIsAnError) {
  for (const char* line : {R"({"url":"u","body":{"a":tru}})", R"({"url":"u","body":[1,,2]})",
                           R"({"url":"u","body":{"a":01}})", R"({"url":"u","body":{"a" 1}})"}) {
    EXPECT_TRUE(Contains(ParseError(line), "JSON")) << line;
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

// Every ASCII byte, in runs and alone, between multi-byte characters: the
// line parses back (simdjson) to exactly the body.
TEST(AppendResponseJsonTest, EscapedBodyParsesBackToTheSameBytes) {
  Response r = OkResponse();
  for (int round = 0; round < 300; ++round) {
    for (int c = 0; c < 0x80; c += 1 + round % 7) r.body += static_cast<char>(c);
    r.body += round % 2 ? "\xc3\xa9" : "{\"k\":\"v\\\"}";
  }
  std::string out;
  AppendResponseJson(out, 0, r);
  simdjson::dom::parser parser;
  simdjson::dom::element line;
  ASSERT_EQ(parser.parse(out).get(line), simdjson::SUCCESS) << out.substr(0, 200);
  std::string_view body;
  ASSERT_EQ(line["body"].get(body), simdjson::SUCCESS);
  EXPECT_EQ(body, r.body);
}

// Escaping works on 16-byte chunks with each run between escaped bytes
// stored whole: every escaped byte (two-character escapes, \u00XX, quote,
// backslash), alone and in runs, at every offset of a chunk and of the tail,
// in bodies of every length around the chunk size, comes out exactly as
// escaping byte by byte does; so do bodies of escaped bytes of every kind
// mixed at random. Run on each way the CPU offers (with SSSE3, a shuffle per
// half chunk; SSE2 alone, a store per run).
void CheckEscapingMatchesBytewise() {
  const auto bytewise = [](std::string_view s) {
    std::string out;
    for (const unsigned char c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) {
            static constexpr char kHex[] = "0123456789abcdef";
            out += "\\u00";
            out += kHex[c >> 4];
            out += kHex[c & 0xf];
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    return out;
  };
  static constexpr char kSpecial[] = {'"', '\\', '\n', '\x01', '\x1f', '\0', '\t', '\x7f', '\xc3'};
  int checked = 0;
  for (std::size_t len = 0; len <= 50; ++len) {
    for (std::size_t at = 0; at < std::max<std::size_t>(len, 1); ++at) {
      for (const char special : kSpecial) {
        for (std::size_t run = 1; run <= 3; ++run) {
          std::string body(len, 'a');
          for (std::size_t k = at; k < std::min(len, at + run); ++k) body[k] = special;
          if (len > 20) body[len - 1 - at % 7] = '"';  // a second one in the same or the tail chunk
          const Response r = [&] {
            Response x = OkResponse();
            x.body = body;
            return x;
          }();
          if (!simdjson::validate_utf8(body.data(), body.size())) continue;  // written as base64
          std::string out;
          AppendResponseJson(out, 0, r);
          ASSERT_TRUE(Contains(out, "\"body\":\"" + bytewise(body) + "\",")) << "length " << len << ", at " << at
                                                                            << ", byte " << int(special) << ": " << out;
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 5000);
  // Long bodies, every byte or every other one escaped: the per-lane counts
  // pass their 255-chunk flush many times over.
  for (const std::string& body : {std::string(10'000, '"'), std::string(10'001, '\x01'), [] {
         std::string b;
         for (int k = 0; k < 6'000; ++k) b += k % 2 ? "\\" : "x";
         return b;
       }()}) {
    Response r = OkResponse();
    r.body = body;
    std::string out;
    AppendResponseJson(out, 0, r);
    ASSERT_TRUE(Contains(out, "\"body\":\"" + bytewise(body) + "\",")) << "a long body of " << int(body[1]);
  }
  static constexpr char kMix[] = {'a', 'b', '"', '\\', '\n', '\t', '\r', '\b', '\f', '\x01', '\x0b', '\x10', '\x1f', ' '};
  std::uint32_t state = 12345;
  for (int round = 0; round < 3'000; ++round) {
    std::string body(round % 97, 'a');
    for (char& c : body) {
      state = state * 1664525u + 1013904223u;
      // Mostly plain bytes, as in a JSON body; every kind somewhere.
      c = (state >> 24) % 3 ? kMix[state >> 28 & 1] : kMix[(state >> 16) % sizeof kMix];
    }
    Response r = OkResponse();
    r.body = body;
    std::string out;
    AppendResponseJson(out, 0, r);
    ASSERT_TRUE(Contains(out, "\"body\":\"" + bytewise(body) + "\",")) << "round " << round << ": " << out;
  }
}

TEST(AppendResponseJsonTest, ChunkedEscapingMatchesBytewise) { CheckEscapingMatchesBytewise(); }

// The header strings' shortcut agrees with the escaping, byte by byte, in both modes.
TEST(AppendResponseJsonTest, WrittenAsItIsAgreesWithTheEscaping) {
  for (int c = 0; c < 256; ++c) {
    const std::string one(1, static_cast<char>(c));
    std::string utf8, latin1;
    AppendJsonEscaped(utf8, one, false);
    AppendJsonEscaped(latin1, one, true);
    EXPECT_EQ(WrittenAsItIs(one), utf8 == one && latin1 == one) << "byte " << c;
  }
  EXPECT_TRUE(WrittenAsItIs("Thu, 03 Dec 2026 15:33:02 GMT"));
  EXPECT_FALSE(WrittenAsItIs("\"6b118b99-252\""));
  EXPECT_FALSE(WrittenAsItIs("caf\xc3\xa9"));
}

TEST(AppendResponseJsonTest, ChunkedEscapingMatchesBytewiseOnSse2Alone) {
  struct Baseline {
    Baseline() { detail::BaselineEscaping() = true; }
    ~Baseline() { detail::BaselineEscaping() = false; }
  } baseline;
  CheckEscapingMatchesBytewise();
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
  r.error = ResponseError{StatusCode::kHttpStatus, "status 404 \"Not Found\""};
  r.attempts = 1;
  std::string out;
  AppendResponseJson(out, 3, r);
  EXPECT_TRUE(Contains(
      out, R"("error":{"kind":"http_status","message":"status 404 \"Not Found\""},)"))
      << out;
  EXPECT_TRUE(Contains(out, R"({"index":3,"status":404,"headers":{},"body":"",)")) << out;
}

TEST(AppendResponseJsonTest, RepeatedHeaderKeepsEveryValueInAList) {
  Response r = OkResponse();
  r.headers = {{"Set-Cookie", "a=1"}, {"Content-Type", "text/plain"}, {"set-cookie", "b=2, c"},
               {"SET-COOKIE", "d=\"4\""}};
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(
      out, R"("headers":{"Set-Cookie":["a=1","b=2, c","d=\"4\""],"Content-Type":"text/plain"},)"))
      << out;
}

TEST(AppendResponseJsonTest, RepeatedNonUtf8HeaderValuesReadAsLatin1) {
  Response r = OkResponse();
  r.headers = {{"X", "caf\xe9"}, {"X", "ok"}};
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("headers":{"X":["caf\u00e9","ok"]},)")) << out;
}

TEST(AppendResponseJsonTest, NonUtf8HeaderValueReadAsLatin1) {
  Response r = OkResponse();
  r.headers = {{"X", "caf\xe9 \"x\""}};
  std::string out;
  AppendResponseJson(out, 0, r);
  EXPECT_TRUE(Contains(out, R"("headers":{"X":"caf\u00e9 \"x\""},)")) << out;
}

// --- LineReader, ReadStatement, CountValidStatements ------------------------

// A FILE* over a copy of `text`, closed with the object.
class MemoryFile {
 public:
  explicit MemoryFile(std::string text) : text_(std::move(text)) {
    // fmemopen() rejects a zero size; "" is opened as /dev/null instead.
    file_ = text_.empty() ? std::fopen("/dev/null", "r") : ::fmemopen(text_.data(), text_.size(), "r");
  }
  ~MemoryFile() {
    if (file_ != nullptr) std::fclose(file_);
  }
  std::FILE* get() const { return file_; }

 private:
  std::string text_;
  std::FILE* file_ = nullptr;
};

std::string ReadAll(std::FILE* f) {
  std::string text;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  return text;
}

// Line 8 is bad; lines 2, 5 and 7 are blank (one of them only whitespace).
constexpr char kBadLineEight[] =
    "http://h/1\n"
    "\n"
    R"({"url":"http://h/3","method":"POST","body":"x"})" "\n"
    "http://h/4\r\n"
    "   \t\n"
    "http://h/6\n"
    "\n"
    "http://\n"
    "http://h/9\n";

TEST(LineReaderTest, SkipsBlankLinesButCountsThem) {
  MemoryFile in("\n  \nfirst\r\n\t\nsecond\n\n\nthird");  // no final newline
  ASSERT_NE(in.get(), nullptr);
  LineReader reader(in.get());
  std::vector<std::pair<std::string, std::uint64_t>> got;
  std::string_view line;
  for (;;) {
    auto r = reader.next(line);
    ASSERT_TRUE(r) << r.error().ToString();
    if (!*r) break;
    got.emplace_back(std::string(line), reader.line_number());
  }
  const std::vector<std::pair<std::string, std::uint64_t>> want = {
      {"first\r", 3}, {"second", 5}, {"third", 8}};
  EXPECT_EQ(got, want);
  // The end stays the end.
  auto again = reader.next(line);
  ASSERT_TRUE(again);
  EXPECT_FALSE(*again);
}

TEST(LineReaderTest, ByteOrderMarkOnlyOnTheFirstLine) {
  MemoryFile in("\xEF\xBB\xBFhttp://h/1\n\xEF\xBB\xBFhttp://h/2\n");
  LineReader reader(in.get());
  std::string_view line;
  ASSERT_TRUE(reader.next(line).value());
  EXPECT_EQ(line, "http://h/1");
  ASSERT_TRUE(reader.next(line).value());
  EXPECT_EQ(line, "\xEF\xBB\xBFhttp://h/2");
}

TEST(LineReaderTest, LinesLongerThanAnyBufferSoFar) {
  const std::string big(200000, 'x');
  MemoryFile in("a\n" + big + "\nb\n");
  LineReader reader(in.get());
  std::string_view line;
  ASSERT_TRUE(reader.next(line).value());
  EXPECT_EQ(line, "a");
  ASSERT_TRUE(reader.next(line).value());
  EXPECT_EQ(line, big);
  ASSERT_TRUE(reader.next(line).value());
  EXPECT_EQ(line, "b");
}

TEST(LineReaderTest, CopiesEveryByteReadToTheSpool) {
  const std::string text = std::string(kBadLineEight) + "\n\nlast without newline";
  MemoryFile in(text);
  std::FILE* spool = std::tmpfile();
  ASSERT_NE(spool, nullptr);
  {
    LineReader reader(in.get(), spool);
    std::string_view line;
    while (reader.next(line).value()) {
    }
  }
  std::rewind(spool);
  EXPECT_EQ(ReadAll(spool), text);
  std::fclose(spool);
}

TEST(ReadStatementTest, EachStatementReplacesTheLastOne) {
  // `out` is reused by the stream: a bare URL after a JSON line must not
  // inherit its method, headers or body.
  MemoryFile in(R"({"url":"http://h/1","method":"POST","headers":[["A","b"]],"body":"x","timeout_ms":5})"
                "\n\nhttp://h/2\n");
  LineReader reader(in.get());
  Statement out;
  ASSERT_TRUE(ReadStatement(reader, out).value());
  EXPECT_EQ(out.method, "POST");
  EXPECT_EQ(out.headers.size(), 1u);
  ASSERT_TRUE(ReadStatement(reader, out).value());
  EXPECT_EQ(out.url, "http://h/2");
  EXPECT_EQ(out.method, "GET");
  EXPECT_TRUE(out.headers.empty());
  EXPECT_TRUE(out.body.empty());
  EXPECT_EQ(out.timeout_ms, 0u);
  EXPECT_EQ(reader.line_number(), 3u);
  EXPECT_FALSE(ReadStatement(reader, out).value());
}

TEST(ReadStatementTest, ParseErrorsNameTheLine) {
  MemoryFile in("http://h/1\n\n{\"url\":\"http://h/\",\"x\":1}\n");
  LineReader reader(in.get());
  Statement out;
  ASSERT_TRUE(ReadStatement(reader, out).value());
  auto r = ReadStatement(reader, out);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.error().message(), "line 3: unknown key 'x'");
}

TEST(CountValidStatementsTest, NamesTheBadLine) {
  MemoryFile in(kBadLineEight);
  LineReader reader(in.get());
  auto r = CountValidStatements(reader, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(r.error().message(), "line 8: url has no host");
}

TEST(CountValidStatementsTest, CountsGoodLines) {
  MemoryFile in(
      "\n"
      "http://h/1\n"
      "   \n"
      R"({"url":"/p","headers":[["A","b"]]})" "\r\n"
      "https://h/3");  // no final newline
  SessionSettings settings;
  settings.base_url = "http://base";
  LineReader reader(in.get());
  auto r = CountValidStatements(reader, settings);
  ASSERT_TRUE(r) << r.error().ToString();
  EXPECT_EQ(*r, 3u);
}

TEST(CountValidStatementsTest, ValidatesAgainstSessionSettings) {
  MemoryFile in("/relative\n");
  LineReader reader(in.get());
  auto r = CountValidStatements(reader, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_TRUE(Contains(r.error().message(), "line 1: ")) << r.error().message();
  EXPECT_TRUE(Contains(r.error().message(), "base_url")) << r.error().message();
}

TEST(CountValidStatementsTest, SchemeNotAllowed) {
  std::string input;
  for (int i = 1; i <= 7; ++i) input += i % 3 == 0 ? "\n" : "http://h/" + std::to_string(i) + "\n";
  MemoryFile good(input);
  LineReader good_reader(good.get());
  auto ok = CountValidStatements(good_reader, SessionSettings{});
  ASSERT_TRUE(ok) << ok.error().ToString();
  EXPECT_EQ(*ok, 5u);

  MemoryFile bad(input + "ftp://x\n");
  LineReader bad_reader(bad.get());
  auto r = CountValidStatements(bad_reader, SessionSettings{});
  ASSERT_FALSE(r);
  EXPECT_TRUE(Contains(r.error().message(), "line 8: ")) << r.error().message();
  EXPECT_TRUE(Contains(r.error().message(), "scheme not allowed")) << r.error().message();
}

TEST(CountValidStatementsTest, EmptyInputHasNoStatements) {
  for (const char* text : {"", "\n \n"}) {
    MemoryFile in(text);
    LineReader reader(in.get());
    auto r = CountValidStatements(reader, SessionSettings{});
    ASSERT_TRUE(r) << r.error().ToString();
    EXPECT_EQ(*r, 0u);
  }
}

// --- TwoPassInput ---------------------------------------------------------------

// Both passes over `input`: the count of the first and the URLs of the second.
std::pair<std::uint64_t, std::vector<std::string>> TwoPasses(TwoPassInput& input) {
  auto count = CountValidStatements(input.reader(), SessionSettings{});
  EXPECT_TRUE(count) << count.error().ToString();
  Status s = input.rewind();
  EXPECT_TRUE(s.ok()) << s.ToString();
  std::vector<std::string> urls;
  Statement statement;
  for (;;) {
    auto got = ReadStatement(input.reader(), statement);
    EXPECT_TRUE(got) << got.error().ToString();
    if (!got || !*got) break;
    urls.push_back(statement.url);
  }
  return {count.value_or(0), urls};
}

std::string Urls(int from, int to, std::vector<std::string>* urls = nullptr) {
  std::string text;
  for (int i = from; i < to; ++i) {
    const std::string url = "http://h/" + std::to_string(i);
    text += url + (i % 10 == 3 ? "\n\n" : "\n");
    if (urls != nullptr) urls->push_back(url);
  }
  return text;
}

TEST(TwoPassInputTest, RegularFileIsSoughtBackToWhereItStarted) {
  const std::string path = ::testing::TempDir() + "gatherer_two_pass_input.txt";
  std::vector<std::string> want;
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    const std::string text = "skipped by the caller\n" + Urls(0, 50, &want);
    std::fwrite(text.data(), 1, text.size(), f);
    std::fclose(f);
  }
  std::FILE* f = std::fopen(path.c_str(), "r");
  ASSERT_NE(f, nullptr);
  char first[64];
  ASSERT_NE(std::fgets(first, sizeof first, f), nullptr);  // like `(read x; gatherer fetch) < file`
  auto input = TwoPassInput::Open(f);
  ASSERT_TRUE(input) << input.error().ToString();
  EXPECT_FALSE((*input)->spooled());
  const auto [count, urls] = TwoPasses(**input);
  EXPECT_EQ(count, 50u);
  EXPECT_EQ(urls, want);
  input->reset();
  std::fclose(f);
  std::remove(path.c_str());
}

TEST(TwoPassInputTest, PipeIsSpooledToATemporaryFile) {
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  std::vector<std::string> want;
  // Far more than a pipe holds (64 KiB), so the writer runs alongside pass 1.
  const std::string text = Urls(0, 100000, &want);
  std::thread writer([fd = fds[1], &text] {
    std::size_t pos = 0;
    while (pos < text.size()) {
      const ssize_t n = ::write(fd, text.data() + pos, text.size() - pos);
      if (n <= 0) break;
      pos += static_cast<std::size_t>(n);
    }
    ::close(fd);
  });
  std::FILE* f = ::fdopen(fds[0], "r");
  ASSERT_NE(f, nullptr);
  auto input = TwoPassInput::Open(f);
  ASSERT_TRUE(input) << input.error().ToString();
  EXPECT_TRUE((*input)->spooled());
  const auto [count, urls] = TwoPasses(**input);
  writer.join();
  EXPECT_EQ(count, 100000u);
  EXPECT_EQ(urls, want);
  std::fclose(f);
}

TEST(TwoPassInputTest, SpoolGoesToTmpdir) {
  const char* old = std::getenv("TMPDIR");
  const std::string saved = old != nullptr ? old : "";
  ::setenv("TMPDIR", "/nonexistent/gatherer-tmp", 1);
  MemoryFile in("http://h/1\n");  // an fmemopen FILE has no fd: not seekable
  auto input = TwoPassInput::Open(in.get());
  if (old != nullptr) {
    ::setenv("TMPDIR", saved.c_str(), 1);
  } else {
    ::unsetenv("TMPDIR");
  }
  ASSERT_FALSE(input);
  EXPECT_EQ(input.error().code(), StatusCode::kDataLoss);
  EXPECT_TRUE(Contains(input.error().message(), "/nonexistent/gatherer-tmp")) << input.error().message();
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
// --- CheckBrokerEndpoint, ParseByteSize ---------------------------------------

TEST(CheckBrokerEndpointTest, Accepted) {
  for (const char* ep : {"tcp://127.0.0.1:5555", "tcp://broker.example:1", "tcp://my_host-2.lan:65535",
                         "tcp://[::1]:5555", "tcp://[::ffff:10.0.0.1]:80", "ipc:///tmp/gatherer.sock",
                         "ipc://@abstract"}) {
    EXPECT_TRUE(CheckBrokerEndpoint(ep).ok()) << ep << ": " << CheckBrokerEndpoint(ep).message();
  }
}

TEST(CheckBrokerEndpointTest, Refused) {
  for (const char* ep : {"localhost:5555", "tcp://host", "http://x", "tcp://host:0", "tcp://host:65536",
                         "tcp://host:55x", "tcp://:5555", "tcp://host:-1", "tcp://host:5555/x", "ipc://", "5555",
                         "tcp://host:", "tcp://ho st:1", "tcp://[::1:5555", "tcp://[]:1", "tcp://[fe80::1%eth0]:1",
                         "inproc://x", "", "TCP://host:1", "tcp://host:+1", "tcp://a;b:1"}) {
    const Status s = CheckBrokerEndpoint(ep);
    EXPECT_FALSE(s.ok()) << ep;
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << ep;
  }
  EXPECT_TRUE(Contains(CheckBrokerEndpoint("tcp://host:0").message(), "1 to 65535"));
  EXPECT_TRUE(Contains(CheckBrokerEndpoint("localhost:5555").message(), "tcp://HOST:PORT or ipc://PATH"));
}

TEST(ParseByteSizeTest, Units) {
  const std::pair<const char*, std::uint64_t> cases[] = {
      {"0", 0},           {"4096", 4096},       {"4K", 4096},         {"4k", 4096},    {"4KiB", 4096},
      {"4KB", 4096},      {"64M", 64ull << 20}, {"64mib", 64ull << 20}, {"1G", 1ull << 30}, {"12B", 12},
      {"256M", 256ull << 20}};
  for (const auto& [text, value] : cases) {
    auto r = ParseByteSize(text);
    ASSERT_TRUE(r) << text << ": " << r.error().message();
    EXPECT_EQ(*r, value) << text;
  }
}

TEST(ParseByteSizeTest, Refused) {
  for (const char* text : {"", "x", "12x", "-1", "1.5M", " 1", "1 M", "1T", "99999999999999999999",
                           "17179869184G"}) {
    EXPECT_FALSE(ParseByteSize(text)) << text;
  }
}

// --- RunSummary ---------------------------------------------------------------

Response Failed(StatusCode code, int status = 0, std::uint32_t attempts = 1) {
  Response r;
  r.status = status;
  r.error = ResponseError{code, "x"};
  r.attempts = attempts;
  return r;
}

TEST(RunSummaryTest, AllOk) {
  RunSummary s;
  Response ok = OkResponse();
  for (int i = 0; i < 3; ++i) s.Add(ok);
  EXPECT_EQ(s.written(), 3u);
  EXPECT_EQ(s.Format(3, std::chrono::milliseconds(1500)), "3 statements: 3 ok, 0 failed, 0 retried; 1.50 s, 2.0 req/s");
  EXPECT_EQ(RunSummary().Format(0, std::chrono::nanoseconds(0)), "0 statements: 0 ok, 0 failed, 0 retried; 0.00 s, 0.0 req/s");
}

TEST(RunSummaryTest, FailuresByKindMostFrequentFirstWithHttpStatuses) {
  RunSummary s;
  Response ok = OkResponse();
  ok.attempts = 3;
  s.Add(ok);
  s.Add(Failed(StatusCode::kDeadlineExceeded, 0, 4));
  s.Add(Failed(StatusCode::kHttpStatus, 503, 4));
  s.Add(Failed(StatusCode::kHttpStatus, 404));
  s.Add(Failed(StatusCode::kHttpStatus, 404));
  s.Add(Failed(StatusCode::kUnavailable));
  s.Add(Failed(StatusCode::kUnavailable));
  EXPECT_EQ(s.failed(), 6u);
  EXPECT_EQ(s.Format(10, std::chrono::seconds(2)),
            "10 statements: 1 ok, 6 failed (3 http_status [HTTP 404: 2, HTTP 503: 1], 2 unavailable, "
            "1 deadline_exceeded), 3 not answered, 3 retried; 2.00 s, 3.5 req/s");
}

TEST(RunSummaryTest, AtMostFiveStatusesListed) {
  RunSummary s;
  for (int status = 400; status < 407; ++status) s.Add(Failed(StatusCode::kHttpStatus, status));
  EXPECT_TRUE(Contains(s.Format(7, std::chrono::seconds(1)),
                       "(7 http_status [HTTP 400: 1, HTTP 401: 1, HTTP 402: 1, HTTP 403: 1, HTTP 404: 1, ...])"));
}

}  // namespace
}  // namespace gatherer::cli
