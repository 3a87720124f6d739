#pragma once
// Small string helpers shared by the client, CLI and worker.
//
// Pure functions; safe from any thread.

#include <string_view>

namespace gatherer {

// ASCII case-insensitive equality, as HTTP header names and URL schemes
// compare (RFC 9110 §5.1, RFC 3986 §3.1). Locale-independent.
constexpr bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    char x = a[i], y = b[i];
    if (x >= 'A' && x <= 'Z') x = static_cast<char>(x - 'A' + 'a');
    if (y >= 'A' && y <= 'Z') y = static_cast<char>(y - 'A' + 'a');
    if (x != y) return false;
  }
  return true;
}

// RFC 9110 §5.6.2 tchar: what a method and a header name may contain
// (visible ASCII but the delimiters). Both reach the request head verbatim,
// so the client refuses a statement with anything else and the worker never
// sends one.
constexpr bool IsHttpTokenChar(char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
  for (const char t : std::string_view("!#$%&'*+-.^_`|~")) {
    if (c == t) return true;
  }
  return false;
}
constexpr bool IsHttpToken(std::string_view s) {
  if (s.empty()) return false;
  for (const char c : s) {
    if (!IsHttpTokenChar(c)) return false;
  }
  return true;
}

// A header value that cannot smuggle a line (or a whole request) into the
// request head: no CR, LF or NUL.
constexpr bool IsHttpFieldValue(std::string_view s) {
  return s.find_first_of(std::string_view("\r\n\0", 3)) == std::string_view::npos;
}

// `s` without leading spaces and tabs and trailing spaces, tabs, CR and LF
// (HTTP field values, RFC 9110 §5.5; lines of key files).
constexpr std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r' || s.back() == '\n')) {
    s.remove_suffix(1);
  }
  return s;
}

}  // namespace gatherer
