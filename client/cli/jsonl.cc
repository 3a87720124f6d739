// JSON Lines in and out for the CLI (jsonl.h): statement lines parsed with
// simdjson's ondemand API, response lines written by hand (the escaping of
// their strings is json_escape.cc), the input reader and the spool file of a
// two-pass input. Somewhat over 500 lines: the reader and the writer are one
// format's two directions and are tested together (jsonl_test.cc, the
// round-trip test in particular); split, each would still need the other.
#include "jsonl.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include <simdjson.h>

#include "gatherer/gatherer.h"
#include "gatherer/strings.h"
#include "json_escape.h"

namespace gatherer::cli {
namespace {

namespace od = simdjson::ondemand;

constexpr std::string_view kSpace = " \t\r\n\v\f";

std::string_view Trim(std::string_view s) {
  const auto first = s.find_first_not_of(kSpace);
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(kSpace);
  return s.substr(first, last - first + 1);
}

bool IsBlank(std::string_view s) { return s.find_first_not_of(kSpace) == std::string_view::npos; }


// The ondemand parser keeps its buffers between documents, and the padded
// copy of the line is reused too, so parsing a line allocates only for the
// Statement's own strings (simdjson needs SIMDJSON_PADDING readable bytes
// past the input, which a std::string_view from getline does not promise).
struct LineParser {
  od::parser parser;
  std::string padded;
};

LineParser& ThreadLineParser() {
  thread_local LineParser p;
  return p;
}

Status JsonError(simdjson::error_code error) {
  return InvalidArgument(std::string("invalid JSON: ") + simdjson::error_message(error));
}

Status TypeError(std::string_view key, std::string_view expected) {
  // Built with append: g++ 12's -Wrestrict misfires on "'" + std::string(...) at -O2.
  std::string message;
  message.reserve(key.size() + expected.size() + 10);
  message.append("'").append(key).append("' must be ").append(expected);
  return InvalidArgument(message);
}

// Reads `value` (a string) into `out`; `key` names it in the error.
Status GetString(od::value& value, std::string_view key, std::string& out) {
  std::string_view s;
  if (const auto error = value.get_string().get(s)) {
    return error == simdjson::INCORRECT_TYPE ? TypeError(key, "a string") : JsonError(error);
  }
  out.assign(s);
  return Status::Ok();
}

Status ParseHeaderObject(od::object object, Headers& headers) {
  for (auto field_result : object) {
    od::field field;
    if (const auto error = std::move(field_result).get(field)) return JsonError(error);
    std::string_view name;
    if (const auto error = field.unescaped_key().get(name)) return JsonError(error);
    std::string value;
    if (Status s = GetString(field.value(), "headers." + std::string(name), value); !s.ok()) {
      return s;
    }
    headers.emplace_back(std::string(name), std::move(value));
  }
  return Status::Ok();
}

Status ParseHeaderArray(od::array array, Headers& headers) {
  constexpr std::string_view kPair = "'headers' entries must be [name, value] string pairs";
  for (auto element_result : array) {
    od::value element;
    if (const auto error = std::move(element_result).get(element)) return JsonError(error);
    od::array pair;
    if (const auto error = element.get_array().get(pair)) {
      return error == simdjson::INCORRECT_TYPE ? InvalidArgument(kPair) : JsonError(error);
    }
    std::string parts[2];
    std::size_t n = 0;
    for (auto part_result : pair) {
      od::value part;
      if (const auto error = std::move(part_result).get(part)) return JsonError(error);
      if (n == 2) return InvalidArgument(kPair);
      std::string_view s;
      if (const auto error = part.get_string().get(s)) {
        return error == simdjson::INCORRECT_TYPE ? InvalidArgument(kPair) : JsonError(error);
      }
      parts[n++].assign(s);
    }
    if (n != 2) return InvalidArgument(kPair);
    headers.emplace_back(std::move(parts[0]), std::move(parts[1]));
  }
  return Status::Ok();
}

Status ParseHeaders(od::value& value, Headers& headers) {
  od::json_type type;
  if (const auto error = value.type().get(type)) return JsonError(error);
  if (type == od::json_type::object) {
    od::object object;
    if (const auto error = value.get_object().get(object)) return JsonError(error);
    return ParseHeaderObject(object, headers);
  }
  if (type == od::json_type::array) {
    od::array array;
    if (const auto error = value.get_array().get(array)) return JsonError(error);
    return ParseHeaderArray(array, headers);
  }
  return TypeError("headers", "an object or an array of [name, value] pairs");
}

Status ParseTimeout(od::value& value, std::uint32_t& out) {
  double ms = 0;
  if (const auto error = value.get_double().get(ms)) {
    return error == simdjson::INCORRECT_TYPE ? TypeError("timeout_ms", "a number")
                                             : JsonError(error);
  }
  if (!(ms >= 0) || ms > static_cast<double>(std::numeric_limits<std::uint32_t>::max())) {
    return InvalidArgument("'timeout_ms' must be between 0 and 4294967295");
  }
  out = static_cast<std::uint32_t>(std::llround(ms));
  return Status::Ok();
}

bool HasHeader(const Headers& headers, std::string_view name) {
  for (const auto& header : headers) {
    if (EqualsIgnoreCase(header.first, name)) return true;
  }
  return false;
}

// Reads a "body": a string as is, an object or an array as its JSON text.
// The ondemand parser skips a value it is not asked to read without checking
// its numbers and literals, so the text is parsed in full once more (in
// place: the line's padded copy is readable past it) before it is sent as
// JSON. Sets `json` when the body is JSON text.
Status ParseBody(od::value& value, std::string& out, bool& json) {
  od::json_type type;
  if (const auto error = value.type().get(type)) return JsonError(error);
  std::string_view text;
  if (type == od::json_type::string) return GetString(value, "body", out);
  if (type == od::json_type::object) {
    od::object object;
    if (const auto error = value.get_object().get(object)) return JsonError(error);
    if (const auto error = object.raw_json().get(text)) return JsonError(error);
  } else if (type == od::json_type::array) {
    od::array array;
    if (const auto error = value.get_array().get(array)) return JsonError(error);
    if (const auto error = array.raw_json().get(text)) return JsonError(error);
  } else {
    return TypeError("body", "a string, an object or an array");
  }
  // raw_json() runs up to the next token: the whitespace after the value too.
  text = Trim(text);
  thread_local simdjson::dom::parser full;
  simdjson::dom::element ignored;
  if (const auto error = full.parse(text.data(), text.size(), false).get(ignored)) {
    return InvalidArgument(std::string("invalid JSON in 'body': ") + simdjson::error_message(error));
  }
  out.assign(text);
  json = true;
  return Status::Ok();
}

Result<Statement> ParseJsonObject(std::string_view json, const ParseOptions& options) {
  LineParser& lp = ThreadLineParser();
  if (lp.padded.size() < json.size() + simdjson::SIMDJSON_PADDING) {
    lp.padded.resize(json.size() + simdjson::SIMDJSON_PADDING);
  }
  std::memcpy(lp.padded.data(), json.data(), json.size());

  od::document doc;
  if (const auto error = lp.parser.iterate(lp.padded.data(), json.size(), lp.padded.size()).get(doc)) {
    return Unexpected(JsonError(error));
  }
  od::object object;
  if (const auto error = doc.get_object().get(object)) return Unexpected(JsonError(error));

  Statement statement;
  bool has_url = false;
  bool json_body = false;
  // One bit per known key, to reject a key given twice.
  unsigned seen = 0;
  for (auto field_result : object) {
    od::field field;
    if (const auto error = std::move(field_result).get(field)) return Unexpected(JsonError(error));
    std::string_view key;
    if (const auto error = field.unescaped_key().get(key)) return Unexpected(JsonError(error));
    od::value value = field.value();

    unsigned bit = 0;
    if (key == "url") bit = 1;
    else if (key == "method") bit = 2;
    else if (key == "headers") bit = 4;
    else if (key == "body") bit = 8;
    else if (key == "timeout_ms") bit = 16;
    else if (key == "idempotent") bit = 32;
    else return Unexpected(InvalidArgument("unknown key '" + std::string(key) + "'"));
    if (seen & bit) return Unexpected(InvalidArgument("key '" + std::string(key) + "' repeated"));
    seen |= bit;

    if (bit == 1) {
      if (Status s = GetString(value, key, statement.url); !s.ok()) return Unexpected(s);
      has_url = true;
      continue;
    }
    // Optional keys accept null as "absent": producers often write None/nil.
    bool is_null = false;
    if (const auto error = value.is_null().get(is_null)) return Unexpected(JsonError(error));
    if (is_null) continue;
    Status s;
    switch (bit) {
      case 2: s = GetString(value, key, statement.method); break;
      case 4: s = ParseHeaders(value, statement.headers); break;
      case 8: s = ParseBody(value, statement.body, json_body); break;
      case 16: s = ParseTimeout(value, statement.timeout_ms); break;
      case 32: {
        bool b = false;
        if (const auto error = value.get_bool().get(b)) {
          s = error == simdjson::INCORRECT_TYPE ? TypeError(key, "true or false") : JsonError(error);
        } else {
          statement.idempotent = b;
        }
        break;
      }
    }
    if (!s.ok()) return Unexpected(s);
  }
  // The ondemand parser stops at the object's closing brace; anything after
  // it ("{...} {...}", "{...} x") would otherwise be silently dropped.
  // current_location() reports OUT_OF_BOUNDS exactly when nothing follows.
  const char* rest = nullptr;
  if (!doc.current_location().get(rest)) {
    return Unexpected(InvalidArgument("trailing content after the JSON object"));
  }
  if (!has_url) return Unexpected(InvalidArgument("missing 'url'"));
  if (json_body && options.json_content_type && !HasHeader(statement.headers, "Content-Type")) {
    statement.headers.emplace_back("Content-Type", "application/json");
  }
  return statement;
}

// --- output -----------------------------------------------------------------

bool IsUtf8(std::string_view s) { return simdjson::validate_utf8(s.data(), s.size()); }

void AppendString(std::string& out, std::string_view s) {
  out += '"';
  if (WrittenAsItIs(s)) {
    out += s;
  } else {
    AppendJsonEscaped(out, s, !IsUtf8(s));
  }
  out += '"';
}

void AppendBase64(std::string& out, std::string_view s) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  const std::size_t start = out.size();
  out.resize(start + (n + 2) / 3 * 4);
  char* o = out.data() + start;
  std::size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    const std::uint32_t v = (std::uint32_t{p[i]} << 16) | (std::uint32_t{p[i + 1]} << 8) | p[i + 2];
    *o++ = kAlphabet[(v >> 18) & 63];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = kAlphabet[(v >> 6) & 63];
    *o++ = kAlphabet[v & 63];
  }
  if (i < n) {
    std::uint32_t v = std::uint32_t{p[i]} << 16;
    if (i + 1 < n) v |= std::uint32_t{p[i + 1]} << 8;
    *o++ = kAlphabet[(v >> 18) & 63];
    *o++ = kAlphabet[(v >> 12) & 63];
    *o++ = i + 1 < n ? kAlphabet[(v >> 6) & 63] : '=';
    *o++ = '=';
  }
}

template <typename Int>
void AppendInt(std::string& out, Int value) {
  char buf[24];
  const auto result = std::to_chars(buf, buf + sizeof buf, value);
  out.append(buf, result.ptr);
}

// A name received once maps to its value, a repeated one to the list of its
// values (jsonl.h).
void AppendHeaders(std::string& out, const Headers& headers) {
  out += '{';
  bool first = true;
  for (std::size_t i = 0; i < headers.size(); ++i) {
    const std::string& name = headers[i].first;
    // Quadratic, but responses carry a few dozen headers at most and this
    // avoids allocating a map per response.
    bool seen_before = false;
    for (std::size_t j = 0; j < i && !seen_before; ++j) {
      seen_before = EqualsIgnoreCase(headers[j].first, name);
    }
    if (seen_before) continue;
    bool repeated = false;
    for (std::size_t j = i + 1; j < headers.size() && !repeated; ++j) {
      repeated = EqualsIgnoreCase(headers[j].first, name);
    }
    if (!first) out += ',';
    first = false;
    AppendString(out, name);
    out += ':';
    if (!repeated) {
      AppendString(out, headers[i].second);
      continue;
    }
    out += '[';
    AppendString(out, headers[i].second);
    for (std::size_t j = i + 1; j < headers.size(); ++j) {
      if (!EqualsIgnoreCase(headers[j].first, name)) continue;
      out += ',';
      AppendString(out, headers[j].second);
    }
    out += ']';
  }
  out += '}';
}

Status LineError(std::uint64_t line_number, const Status& why) {
  return InvalidArgument("line " + std::to_string(line_number) + ": " + why.message());
}

// An unlinked temporary file in $TMPDIR, opened for writing then reading.
Result<std::FILE*> OpenSpoolFile() {
  const char* env = std::getenv("TMPDIR");
  const std::string dir = env != nullptr && *env != '\0' ? env : "/tmp";
  // O_TMPFILE never has a name, so no crash can leave the copy behind.
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    // Some file systems (NFS, older overlayfs) lack O_TMPFILE: a named file,
    // unlinked at once, is the next best thing.
    std::string path = dir + "/gatherer-spool-XXXXXX";
    fd = ::mkostemp(path.data(), O_CLOEXEC);
    if (fd >= 0) ::unlink(path.c_str());
  }
  if (fd < 0) {
    return Unexpected(DataLoss("cannot create a temporary file in " + dir + ": " + std::strerror(errno)));
  }
  std::FILE* f = ::fdopen(fd, "w+");
  if (f == nullptr) {
    const int err = errno;
    ::close(fd);
    return Unexpected(DataLoss(std::string("fdopen: ") + std::strerror(err)));
  }
  return f;
}

}  // namespace

Result<Statement> ParseStatementLine(std::string_view line, const ParseOptions& options) {
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  const std::string_view trimmed = Trim(line);
  if (trimmed.empty()) return Unexpected(InvalidArgument("empty line"));
  if (trimmed.front() != '{') return Get(std::string(trimmed));
  return ParseJsonObject(trimmed, options);
}

void AppendResponseJson(std::string& out, std::uint64_t index, const Response& response) {
  // Headers and escapes make the line a little longer than the body; one
  // reserve avoids most regrowth of a big output buffer mid-line.
  out.reserve(out.size() + response.body.size() + response.body.size() / 3 + 256);
  out += "{\"index\":";
  AppendInt(out, index);
  out += ",\"status\":";
  AppendInt(out, response.status);
  out += ",\"headers\":";
  AppendHeaders(out, response.headers);
  if (IsUtf8(response.body)) {
    out += ",\"body\":\"";
    AppendJsonEscaped(out, response.body, false);
    out += '"';
  } else {
    out += ",\"body_base64\":\"";
    AppendBase64(out, response.body);
    out += '"';
  }
  out += ",\"error\":";
  if (response.error) {
    out += "{\"kind\":";
    AppendString(out, StatusCodeName(response.error->code));
    out += ",\"message\":";
    AppendString(out, response.error->message);
    out += '}';
  } else {
    out += "null";
  }
  out += ",\"attempts\":";
  AppendInt(out, response.attempts);
  // Fixed three decimals from integer microseconds: exact, and no locale or
  // floating-point formatting in the hot path.
  out += ",\"elapsed_ms\":";
  AppendInt(out, response.elapsed_us / 1000);
  const auto frac = static_cast<unsigned>(response.elapsed_us % 1000);
  const char decimals[4] = {'.', static_cast<char>('0' + frac / 100),
                            static_cast<char>('0' + frac / 10 % 10), static_cast<char>('0' + frac % 10)};
  out.append(decimals, sizeof decimals);
  out += ",\"worker\":";
  AppendString(out, response.worker);
  // Only for rate-limited statements that waited or met a 429 (§3.8).
  if (response.rate_wait_us > 0 || response.throttled > 0) {
    out += ",\"rate_wait_ms\":";
    AppendInt(out, response.rate_wait_us / 1000);
    out += ",\"throttled\":";
    AppendInt(out, response.throttled);
  }
  out += "}\n";
}

// --- input ------------------------------------------------------------------

LineReader::LineReader(std::FILE* in, std::FILE* spool) : in_(in), spool_(spool) {}

LineReader::~LineReader() { std::free(buffer_); }

Result<bool> LineReader::next(std::string_view& line) {
  for (;;) {
    const ssize_t n = ::getline(&buffer_, &capacity_, in_);
    if (n < 0) {
      if (!std::ferror(in_)) return false;
      return Unexpected(DataLoss("read error after line " + std::to_string(line_number_) + ": " +
                                 std::strerror(errno)));
    }
    const auto size = static_cast<std::size_t>(n);
    if (spool_ != nullptr && std::fwrite(buffer_, 1, size, spool_) != size) {
      return Unexpected(DataLoss(std::string("writing the temporary copy of the input: ") +
                                 std::strerror(errno)));
    }
    ++line_number_;
    std::string_view s(buffer_, size);
    if (!s.empty() && s.back() == '\n') s.remove_suffix(1);
    if (line_number_ == 1 && s.substr(0, 3) == "\xEF\xBB\xBF") s.remove_prefix(3);
    if (IsBlank(s)) continue;
    line = s;
    return true;
  }
}

Result<bool> ReadStatement(LineReader& reader, Statement& out, const ParseOptions& options) {
  std::string_view line;
  auto got = reader.next(line);
  if (!got) return Unexpected(got.error());
  if (!*got) return false;
  auto parsed = ParseStatementLine(line, options);
  if (!parsed) return Unexpected(LineError(reader.line_number(), parsed.error()));
  out = std::move(*parsed);
  return true;
}

Result<std::uint64_t> CountValidStatements(LineReader& reader, const SessionSettings& settings,
                                           const ParseOptions& options) {
  std::uint64_t count = 0;
  Statement statement;
  for (;;) {
    auto got = ReadStatement(reader, statement, options);
    if (!got) return Unexpected(got.error());
    if (!*got) return count;
    if (Status s = ValidateStatement(statement, settings); !s.ok()) {
      return Unexpected(LineError(reader.line_number(), s));
    }
    ++count;
  }
}

Result<std::unique_ptr<TwoPassInput>> TwoPassInput::Open(std::FILE* in) {
  std::unique_ptr<TwoPassInput> input(new TwoPassInput());
  input->in_ = in;
  struct stat st {};
  // Only a regular file is sure to read the same bytes twice; a FIFO or a
  // character device may accept fseeko and still not rewind.
  const bool regular = ::fstat(::fileno(in), &st) == 0 && S_ISREG(st.st_mode);
  const off_t start = regular ? ::ftello(in) : -1;
  if (start >= 0) {
    input->start_ = start;
  } else {
    auto spool = OpenSpoolFile();
    if (!spool) return Unexpected(spool.error());
    input->spool_ = *spool;
  }
  input->reader_ = std::make_unique<LineReader>(in, input->spool_);
  return input;
}

TwoPassInput::~TwoPassInput() {
  reader_.reset();
  if (spool_ != nullptr) std::fclose(spool_);
}

Status TwoPassInput::rewind() {
  std::FILE* from = in_;
  if (spool_ != nullptr) {
    if (std::fflush(spool_) != 0 || ::fseeko(spool_, 0, SEEK_SET) != 0) {
      return DataLoss(std::string("rewinding the temporary copy of the input: ") + std::strerror(errno));
    }
    from = spool_;
  } else if (::fseeko(in_, static_cast<off_t>(start_), SEEK_SET) != 0) {
    return DataLoss(std::string("rewinding the input: ") + std::strerror(errno));
  }
  reader_ = std::make_unique<LineReader>(from);
  return Status::Ok();
}

Result<std::pair<std::string, std::string>> ParseHeaderArg(std::string_view arg) {
  const auto colon = arg.find(':');
  if (colon == std::string_view::npos) {
    return Unexpected(InvalidArgument("header must be 'Name: value'"));
  }
  std::pair<std::string, std::string> header{std::string(arg.substr(0, colon)),
                                             std::string(Trim(arg.substr(colon + 1)))};
  // Same rules as a statement's own headers, so one place decides them.
  Statement probe = Get("http://localhost/");
  probe.headers.push_back(header);
  if (Status s = ValidateStatement(probe, {}); !s.ok()) return Unexpected(s);
  return header;
}

}  // namespace gatherer::cli
