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

}  // namespace gatherer
