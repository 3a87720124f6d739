#pragma once
// JSON Lines in and out for the `gatherer` CLI (README, "CLI"): statements
// are read one per line (a bare URL or a JSON object), responses are written
// one JSON object per line in input order. Kept out of main.cc so it can be
// unit-tested.
//
// Thread-safety: every free function may be called from any thread (the
// parser state reused between lines is thread_local); LineReader and
// TwoPassInput are owned by one thread.

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <string_view>
#include <utility>

#include "gatherer/config.h"
#include "gatherer/statement.h"
#include "gatherer/status.h"

namespace gatherer::cli {

// How input lines become statements.
struct ParseOptions {
  // A JSON "body" (object or array) gets "Content-Type: application/json"
  // unless the line's headers name a Content-Type. The CLI turns this off
  // when a --header sets Content-Type for every statement: a statement's own
  // header would replace that default.
  bool json_content_type = true;
};

// Parses one input line into a statement, without validating it (see
// ValidateStatement). A line whose first non-space character is not '{' is a
// bare URL (surrounding whitespace trimmed); otherwise it is a JSON object:
//   url         string, required
//   method      string, default "GET"
//   headers     {"Name": "value", ...} or [["Name", "value"], ...]
//   body        string (sent as is), or an object or array (sent as its JSON
//               text, as written in the line, with Content-Type:
//               application/json, see ParseOptions)
//   timeout_ms  number (milliseconds, 0 .. 2^32-1)
//   idempotent  bool
// Optional keys may be null (= absent). Unknown or repeated keys are errors
// so that a typo ("heders") does not silently drop a field. A trailing '\r'
// is ignored. Errors are InvalidArgument with a short message, no line number.
[[nodiscard]] Result<Statement> ParseStatementLine(std::string_view line, const ParseOptions& options = {});

// Appends exactly one line (ending in '\n') to `out`:
//   {"index":N,"status":200,"headers":{"Name":"v",...},"body":"...",
//    "error":null,"attempts":1,"elapsed_ms":12.345,"worker":"..."}
// The body goes in "body_base64" instead of "body" when it is not valid
// UTF-8. A header name received once has its value as a string; a name
// received more than once (compared case-insensitively, spelled as first
// received, e.g. two Set-Cookie) has the list of its values in the order
// received: {"Set-Cookie":["a=1","b=2"],"Content-Type":"text/html"}.
// "error" is null or {"kind":"<StatusCodeName>","message":"..."}. Other
// strings that are not valid UTF-8 (a header value in Latin-1) are read as
// Latin-1 so the line stays valid JSON.
void AppendResponseJson(std::string& out, std::uint64_t index, const Response& response);

// LineReader: the lines of a FILE*, one at a time in one reused buffer, so
// memory stays at the longest line whatever the size of the input (the CLI
// must stream a million statements, docs/architecture.md §1).
// Blank (whitespace-only) lines are skipped but counted; a UTF-8 byte order
// mark on line 1 (editors on Windows add one) is dropped. With a `spool`,
// every byte read is also written there, blank lines included, so a second
// pass over the spool sees the same line numbers.
//
// Not thread-safe; does not own `in` or `spool`.
class LineReader {
 public:
  explicit LineReader(std::FILE* in, std::FILE* spool = nullptr);
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  // Sets `line` to the next non-blank line without its '\n' (valid until the
  // next call) and returns true, or returns false at the end of the input.
  // DataLoss on a read error or a failed write to the spool.
  [[nodiscard]] Result<bool> next(std::string_view& line);
  // 1-based number of the line last returned, blank lines counted.
  std::uint64_t line_number() const { return line_number_; }

 private:
  std::FILE* in_;
  std::FILE* spool_;
  char* buffer_ = nullptr;  // getline()'s, grown to the longest line
  std::size_t capacity_ = 0;
  std::uint64_t line_number_ = 0;
};

// Reads the next statement from `reader` into `out` (ParseStatementLine,
// not validated) and returns true, or false at the end of the input. A bad
// line is InvalidArgument "line N: <why>"; a read error DataLoss.
[[nodiscard]] Result<bool> ReadStatement(LineReader& reader, Statement& out, const ParseOptions& options = {});

// The first pass of the CLI: reads every statement from `reader`, parses it
// and validates it with ValidateStatement against `settings`, keeping
// nothing. Returns the number of statements, or stops at the first bad line
// with InvalidArgument "line N: <why>" (N 1-based, blank lines counted). A
// read error is DataLoss.
[[nodiscard]] Result<std::uint64_t> CountValidStatements(LineReader& reader,
                                                         const SessionSettings& settings,
                                                         const ParseOptions& options = {});

// TwoPassInput: the CLI's input read twice, once to validate every line and
// once to fetch, without holding it in memory. A regular file is sought back
// to where it started; anything else (a pipe, a FIFO, a terminal) is copied
// during the first pass to an unlinked temporary file in $TMPDIR (default
// /tmp), which the second pass reads: the copy costs disk, not memory, and
// vanishes with the process.
//
// Not thread-safe; does not own `in`.
class TwoPassInput {
 public:
  // Decides how to rewind `in`, creating the spool file if needed.
  // DataLoss if the spool file cannot be created.
  [[nodiscard]] static Result<std::unique_ptr<TwoPassInput>> Open(std::FILE* in);
  ~TwoPassInput();
  TwoPassInput(const TwoPassInput&) = delete;
  TwoPassInput& operator=(const TwoPassInput&) = delete;

  // The reader of the current pass: the first until rewind(), then the second.
  LineReader& reader() { return *reader_; }
  // Starts the second pass at the first line again. DataLoss if the input
  // cannot be sought or the spool not flushed.
  [[nodiscard]] Status rewind();
  // True when the input is copied to a spool file (it is not seekable).
  bool spooled() const { return spool_ != nullptr; }

 private:
  TwoPassInput() = default;
  std::FILE* in_ = nullptr;
  std::FILE* spool_ = nullptr;  // owned
  long long start_ = 0;         // offset of the first line in a seekable `in`
  std::unique_ptr<LineReader> reader_;
};

// Parses a --header argument "Name: value" (value trimmed of spaces/tabs,
// may be empty). The name must be an RFC 7230 token; name and value free of
// CR, LF and NUL.
[[nodiscard]] Result<std::pair<std::string, std::string>> ParseHeaderArg(std::string_view arg);

}  // namespace gatherer::cli
