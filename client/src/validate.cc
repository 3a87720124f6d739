// ValidateStatement: the checks gather() and the CLI run on every statement
// before anything is sent (README, "Library"). A bad
// statement must fail here, with a message a user can act on, rather than
// reach a worker and fail there (or worse, smuggle a header via CR/LF).
//
// The URL is parsed by hand rather than with curl_url(): the rules we need are
// few (scheme, authority, forbidden bytes, length), and a hand parser gives
// precise messages ("url has no host") where CURLU only says "malformed".

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "gatherer/gatherer.h"
#include "gatherer/strings.h"

namespace gatherer {
namespace {

// Long URLs are almost always a bug (a body pasted into a query string), and
// common servers reject request lines over 8 KiB anyway (nginx
// large_client_header_buffers default).
constexpr std::size_t kMaxUrlBytes = 8 * 1024;

// How much of a user's bad input to echo back in a message.
constexpr std::size_t kMaxEcho = 64;

constexpr std::array<std::string_view, 7> kMethods = {"GET",   "HEAD",   "POST",   "PUT",
                                                      "PATCH", "DELETE", "OPTIONS"};

// Renders user input for an error message: printable ASCII as is, every
// other byte as \xNN, so a message never carries CR/LF or NUL itself.
std::string Echo(std::string_view text) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  const std::size_t n = text.size() < kMaxEcho ? text.size() : kMaxEcho;
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 0xf];
    }
  }
  if (text.size() > kMaxEcho) out += "...";
  return out;
}


// The bytes a URL must not carry: controls, DEL and the space.
constexpr std::array<bool, 256> kUrlStop = [] {
  std::array<bool, 256> t{};
  for (int c = 0; c <= 0x20; ++c) t[c] = true;
  t[0x7f] = true;
  return t;
}();

bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

bool HasNul(std::string_view s) { return s.find('\0') != std::string_view::npos; }

// Checks an absolute URL: http(s) scheme, an authority with a host, no bytes
// that would break the request line. `what` names the URL in messages
// ("url", "base_url + url").
Status ValidateAbsoluteUrl(std::string_view url, std::string_view what) {
  if (url.size() > kMaxUrlBytes) {
    return InvalidArgument(std::string(what) + " is " + std::to_string(url.size()) +
                           " bytes, over the " + std::to_string(kMaxUrlBytes) + "-byte limit");
  }
  for (const char ch : url) {
    const auto c = static_cast<unsigned char>(ch);
    if (!kUrlStop[c]) continue;  // one lookup for the bytes a URL is made of
    if (c == '\r' || c == '\n') return InvalidArgument(std::string(what) + " contains CR/LF");
    if (c == ' ') return InvalidArgument(std::string(what) + " contains a space");
    if (c < 0x20 || c == 0x7f) {
      return InvalidArgument(std::string(what) + " contains a control character");
    }
  }

  // RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":".
  std::size_t colon = 0;
  if (!url.empty() && IsAlpha(url[0])) {
    colon = 1;
    while (colon < url.size() && (IsAlpha(url[colon]) || IsDigit(url[colon]) ||
                                  url[colon] == '+' || url[colon] == '-' || url[colon] == '.')) {
      ++colon;
    }
  }
  if (colon == 0 || colon >= url.size() || url[colon] != ':') {
    return InvalidArgument(std::string(what) +
                           " is neither an absolute http(s) URL nor a path starting with '/'");
  }
  const std::string_view scheme = url.substr(0, colon);
  if (!EqualsIgnoreCase(scheme, "http") && !EqualsIgnoreCase(scheme, "https")) {
    return InvalidArgument(std::string(what) + " scheme not allowed: '" + Echo(scheme) +
                           "' (only http and https)");
  }
  std::string_view rest = url.substr(colon + 1);
  if (rest.substr(0, 2) != "//") {
    return InvalidArgument(std::string(what) + " has no host (expected " + std::string(scheme) +
                           "://host/...)");
  }
  rest.remove_prefix(2);

  // The authority ends at the first '/', '?' or '#': one pass over it
  // (find_first_of would search the set of three once per byte).
  const auto authority_end =
      std::find_if(rest.begin(), rest.end(), [](char c) { return c == '/' || c == '?' || c == '#'; });
  const std::string_view authority = rest.substr(0, static_cast<std::size_t>(authority_end - rest.begin()));
  // Userinfo ends at the last '@' of the authority (RFC 3986 §3.2.1).
  std::string_view host_port = authority;
  if (const auto at = host_port.rfind('@'); at != std::string_view::npos) {
    host_port.remove_prefix(at + 1);
  }
  std::string_view host;
  std::string_view port;
  if (!host_port.empty() && host_port[0] == '[') {
    // IP literal (RFC 3986 §3.2.2): "[::1]" optionally followed by ":port".
    const auto close = host_port.find(']');
    if (close == std::string_view::npos) {
      return InvalidArgument(std::string(what) + " has an unterminated IPv6 host");
    }
    host = host_port.substr(1, close - 1);
    const std::string_view after = host_port.substr(close + 1);
    if (!after.empty()) {
      if (after[0] != ':') return InvalidArgument(std::string(what) + " has a malformed host");
      port = after.substr(1);
    }
  } else {
    const auto port_colon = host_port.find(':');
    host = host_port.substr(0, port_colon);
    if (port_colon != std::string_view::npos) port = host_port.substr(port_colon + 1);
  }
  if (host.empty()) return InvalidArgument(std::string(what) + " has no host");
  // An empty port ("host:/") means the default port (RFC 3986 §3.2.3).
  if (!port.empty()) {
    std::uint32_t value = 0;
    for (const char c : port) {
      if (!IsDigit(c)) {
        return InvalidArgument(std::string(what) + " has a bad port '" + Echo(port) + "'");
      }
      value = value * 10 + static_cast<std::uint32_t>(c - '0');
      if (value > 65535) break;
    }
    if (value == 0 || value > 65535) {
      return InvalidArgument(std::string(what) + " has a port out of range '" + Echo(port) + "'");
    }
  }
  return Status::Ok();
}

Status ValidateUrl(const std::string& url, const SessionSettings& settings) {
  if (url.empty()) return InvalidArgument("url is empty");
  if (url[0] == '/') {
    if (settings.base_url.empty()) {
      return InvalidArgument("url '" + Echo(url) + "' is a path but the session has no base_url");
    }
    // What goes on the wire is the concatenation, so that is what must be valid.
    return ValidateAbsoluteUrl(settings.base_url + url, "base_url + url");
  }
  return ValidateAbsoluteUrl(url, "url");
}

Status ValidateHeaders(const Headers& headers) {
  for (const auto& [name, value] : headers) {
    if (name.empty()) return InvalidArgument("header name is empty");
    if (!IsHttpFieldValue(name)) {
      return InvalidArgument("header name '" + Echo(name) + "' contains " + (HasNul(name) ? "NUL" : "CR/LF"));
    }
    if (!IsHttpToken(name)) return InvalidArgument("header name '" + Echo(name) + "' is not a token (RFC 9110)");
    // CR/LF in a value would let one header smuggle another (or a whole
    // request) into the request head.
    if (!IsHttpFieldValue(value)) {
      return InvalidArgument("header '" + name + "' value contains " + (HasNul(value) ? "NUL" : "CR/LF"));
    }
  }
  return Status::Ok();
}

}  // namespace

Status ValidateStatement(const Statement& statement, const SessionSettings& settings) {
  bool method_ok = false;
  for (const std::string_view m : kMethods) method_ok = method_ok || statement.method == m;
  if (!method_ok) {
    return InvalidArgument("method '" + Echo(statement.method) +
                           "' not allowed (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)");
  }
  if (Status s = ValidateUrl(statement.url, settings); !s.ok()) return s;
  if (Status s = ValidateHeaders(statement.headers); !s.ok()) return s;
  if (statement.body.size() > kMaxStatementBody) {
    return InvalidArgument("body is " + std::to_string(statement.body.size()) +
                           " bytes, over the " + std::to_string(kMaxStatementBody) +
                           "-byte limit");
  }
  return Status::Ok();
}

}  // namespace gatherer
