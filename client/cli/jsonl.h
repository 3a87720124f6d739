#pragma once
// JSON Lines in and out for the `gatherer` CLI (DESIGN §2 "CLI"): statements
// are read one per line (a bare URL or a JSON object), responses are written
// one JSON object per line in input order. Kept out of main.cc so it can be
// unit-tested.
//
// Thread-safety: every function may be called from any thread; the parser
// state reused between lines is thread_local.

#include <cstdint>
#include <cstdio>
#include <istream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gatherer/config.h"
#include "gatherer/statement.h"
#include "gatherer/status.h"

namespace gatherer::cli {

// Parses one input line into a statement, without validating it (see
// ValidateStatement). A line whose first non-space character is not '{' is a
// bare URL (surrounding whitespace trimmed); otherwise it is a JSON object:
//   url         string, required
//   method      string, default "GET"
//   headers     {"Name": "value", ...} or [["Name", "value"], ...]
//   body        string
//   timeout_ms  number (milliseconds, 0 .. 2^32-1)
//   idempotent  bool
// Optional keys may be null (= absent). Unknown or repeated keys are errors
// so that a typo ("heders") does not silently drop a field. A trailing '\r'
// is ignored. Errors are InvalidArgument with a short message, no line number.
[[nodiscard]] Result<Statement> ParseStatementLine(std::string_view line);

// Appends exactly one line (ending in '\n') to `out`:
//   {"index":N,"status":200,"headers":{"Name":"v",...},"body":"...",
//    "error":null,"attempts":1,"elapsed_ms":12.345,"worker":"..."}
// The body goes in "body_base64" instead of "body" when it is not valid
// UTF-8. Repeated header names (compared case-insensitively) become one key
// whose values are joined with ", ", spelled as first received. "error" is
// null or {"kind":"<StatusCodeName>","message":"..."}. Other strings that
// are not valid UTF-8 (a header value in Latin-1) are read as Latin-1 so the
// line stays valid JSON.
void AppendResponseJson(std::string& out, std::uint64_t index, const Response& response);

// Reads every line of `in`, skipping blank (whitespace-only) lines, parses
// each with ParseStatementLine and validates it with ValidateStatement
// against `settings`. Stops at the first bad line: the error is
// InvalidArgument "line N: <why>" with N the 1-based line number in the
// input (blank lines counted). A read error is DataLoss.
[[nodiscard]] Result<std::vector<Statement>> ReadStatements(std::istream& in,
                                                            const SessionSettings& settings);
[[nodiscard]] Result<std::vector<Statement>> ReadStatements(std::FILE* in,
                                                            const SessionSettings& settings);

// Parses a --header argument "Name: value" (value trimmed of spaces/tabs,
// may be empty). The name must be an RFC 7230 token; name and value free of
// CR, LF and NUL.
[[nodiscard]] Result<std::pair<std::string, std::string>> ParseHeaderArg(std::string_view arg);


}  // namespace gatherer::cli
