// libFuzzer target for the `gatherer` CLI's JSON Lines code (client/cli/jsonl.h),
// the other parser of untrusted input: statements piped in by users, and
// response headers and bodies sent by any HTTP server.
//
// Each input is used four ways:
//   1. ParseStatementLine on the whole input. A statement parsed from a JSON
//      object, written back as a JSON object line, parses to an equal
//      statement (round trip); ValidateStatement then runs on it.
//   2. The input as a file, read by LineReader and CountValidStatements, as
//      the CLI's first pass does (blank lines, byte order mark, '\r').
//   3. The input as an HTTP response (body = input, headers and messages cut
//      from it) written by AppendResponseJson: the output is exactly one
//      line of valid JSON whose body, or body_base64, gives back the input.
//   4. ParseHeaderArg, the parser of --header "Name: value".
// Beyond these checks: no crash, no leak, no UB (ASan, UBSan, libFuzzer).

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

#include <simdjson.h>

#include "fuzz_check.h"
#include "gatherer/gatherer.h"
#include "jsonl.h"

namespace gatherer::fuzz {
namespace {

// A JSON string for `s`, which simdjson has already checked to be UTF-8.
void AppendJsonString(std::string& out, std::string_view s) {
  static constexpr char kHex[] = "0123456789abcdef";
  out += '"';
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += "\\u00";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    } else {
      out += ch;
    }
  }
  out += '"';
}

std::string StatementJson(const Statement& s) {
  std::string out = "{\"url\":";
  AppendJsonString(out, s.url);
  out += ",\"method\":";
  AppendJsonString(out, s.method);
  out += ",\"headers\":[";
  for (std::size_t i = 0; i < s.headers.size(); ++i) {
    out += i == 0 ? "[" : ",[";
    AppendJsonString(out, s.headers[i].first);
    out += ',';
    AppendJsonString(out, s.headers[i].second);
    out += ']';
  }
  out += "],\"body\":";
  AppendJsonString(out, s.body);
  out += ",\"timeout_ms\":" + std::to_string(s.timeout_ms);
  if (s.idempotent) out += *s.idempotent ? ",\"idempotent\":true" : ",\"idempotent\":false";
  out += '}';
  return out;
}

void CheckStatementLine(std::string_view input) {
  auto parsed = cli::ParseStatementLine(input);
  if (!parsed) return;
  (void)ValidateStatement(*parsed, SessionSettings{});
  const std::size_t first = input.find_first_not_of(" \t\r\n\v\f");
  if (first == std::string_view::npos || input[first] != '{') return;
  const std::string again = StatementJson(*parsed);
  auto back = cli::ParseStatementLine(again);
  FUZZ_CHECK(back.has_value());
  FUZZ_CHECK(back->url == parsed->url && back->method == parsed->method);
  FUZZ_CHECK(back->headers == parsed->headers && back->body == parsed->body);
  FUZZ_CHECK(back->timeout_ms == parsed->timeout_ms && back->idempotent == parsed->idempotent);
}

void CheckLineReader(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return;
  std::FILE* in = ::fmemopen(const_cast<std::uint8_t*>(data), size, "r");
  FUZZ_CHECK(in != nullptr);
  {
    cli::LineReader reader(in);
    (void)cli::CountValidStatements(reader, SessionSettings{});
  }
  std::fclose(in);
}

std::string DecodeBase64(std::string_view s) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  std::string out;
  std::uint32_t bits = 0;
  int count = 0;
  for (const char c : s) {
    const int v = value(c);
    if (v < 0) break;  // '=' padding
    bits = (bits << 6) | static_cast<std::uint32_t>(v);
    count += 6;
    if (count >= 8) {
      count -= 8;
      out += static_cast<char>((bits >> count) & 0xff);
    }
  }
  return out;
}

void CheckResponseJson(std::string_view input) {
  Response response;
  response.status = 200;
  response.body.assign(input);
  // Header name and value, error message, worker: pieces of the input, so
  // invalid UTF-8 and control bytes reach every string the writer escapes.
  const std::size_t third = input.size() / 3;
  response.headers = {{std::string(input.substr(0, third)), std::string(input.substr(third))},
                      {"X-Same", "a"},
                      {std::string(input.substr(0, third)), std::string(input.substr(0, third))}};
  if (!input.empty() && (input[0] & 1)) {
    response.error = ResponseError{StatusCodeFromWire(static_cast<std::uint8_t>(input[0])),
                                   std::string(input.substr(third))};
  }
  response.attempts = static_cast<std::uint32_t>(input.size());
  response.elapsed_us = 0xFFFFFFFFFFFFFFFFull - input.size();
  response.worker.assign(input.substr(2 * third));

  std::string out = "prefix\n";
  const std::size_t start = out.size();
  cli::AppendResponseJson(out, input.size(), response);
  const std::string_view line = std::string_view(out).substr(start);
  FUZZ_CHECK(!line.empty() && line.back() == '\n');
  FUZZ_CHECK(line.find('\n') == line.size() - 1);
  FUZZ_CHECK(simdjson::validate_utf8(line.data(), line.size()));

  thread_local simdjson::dom::parser parser;
  simdjson::dom::element root;
  FUZZ_CHECK(parser.parse(line.data(), line.size()).get(root) == simdjson::SUCCESS);
  std::uint64_t index = 0;
  FUZZ_CHECK(root["index"].get(index) == simdjson::SUCCESS && index == input.size());
  std::string_view body;
  if (root["body"].get(body) == simdjson::SUCCESS) {
    FUZZ_CHECK(body == input);
  } else {
    FUZZ_CHECK(root["body_base64"].get(body) == simdjson::SUCCESS);
    FUZZ_CHECK(DecodeBase64(body) == input);
  }
  simdjson::dom::element error;
  FUZZ_CHECK(root["error"].get(error) == simdjson::SUCCESS);
  FUZZ_CHECK(error.is_null() == !response.error.has_value());
}

void CheckHeaderArg(std::string_view input) {
  auto header = cli::ParseHeaderArg(input);
  if (!header) return;
  FUZZ_CHECK(!header->first.empty() && header->first.find(':') == std::string::npos);
  FUZZ_CHECK(header->second.find_first_of("\r\n") == std::string::npos);
}

}  // namespace
}  // namespace gatherer::fuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace gatherer::fuzz;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  CheckStatementLine(input);
  CheckLineReader(data, size);
  CheckResponseJson(input);
  CheckHeaderArg(input);
  return 0;
}
