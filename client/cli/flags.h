#pragma once
// Checks of `gatherer fetch` flag values that CLI11's validators do not
// express: the broker endpoint and a byte size with a unit. Kept out of
// main.cc so they can be unit-tested (jsonl_test.cc); header-only.
//
// Thread-safety: pure functions.

#include <charconv>
#include <cstdint>
#include <string>
#include <string_view>

#include "gatherer/status.h"

namespace gatherer::cli {

// OK for "tcp://HOST:PORT" (HOST a DNS name, an IPv4 address or an IPv6
// address in brackets; PORT a number 1..65535) and "ipc://PATH" (PATH not
// empty). Anything else, "localhost:5555", "tcp://host", "http://x",
// "tcp://host:0", is InvalidArgument saying what is wrong.
inline Status CheckBrokerEndpoint(std::string_view endpoint) {
  constexpr std::string_view kShape = "must be tcp://HOST:PORT or ipc://PATH";
  if (endpoint.starts_with("ipc://")) {
    if (endpoint.size() == 6) return InvalidArgument(std::string(kShape) + ": the ipc path is empty");
    return Status::Ok();
  }
  if (!endpoint.starts_with("tcp://")) return InvalidArgument(std::string(kShape));
  const std::string_view rest = endpoint.substr(6);
  const auto colon = rest.rfind(':');
  if (colon == std::string_view::npos) {
    return InvalidArgument(std::string(kShape) + ": no port (tcp://HOST:PORT)");
  }
  const std::string_view host = rest.substr(0, colon);
  const std::string_view port = rest.substr(colon + 1);
  if (host.empty()) return InvalidArgument(std::string(kShape) + ": no host (tcp://HOST:PORT)");
  if (host.front() == '[') {
    // An IPv6 address: hex digits, ':' and '.' (an embedded IPv4) inside [].
    if (host.size() < 3 || host.back() != ']') return InvalidArgument("bad IPv6 host '" + std::string(host) + "'");
    for (char c : host.substr(1, host.size() - 2)) {
      const bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F') || c == ':' ||
                      c == '.';
      if (!ok) return InvalidArgument("bad IPv6 host '" + std::string(host) + "'");
    }
  } else {
    for (char c : host) {
      const bool ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '-' ||
                      c == '.' || c == '_';
      if (!ok) return InvalidArgument("bad host '" + std::string(host) + "' (a name or an address; IPv6 in [])");
    }
  }
  unsigned value = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value < 1 || value > 65535) {
    return InvalidArgument("port '" + std::string(port) + "' must be a number from 1 to 65535");
  }
  return Status::Ok();
}

// A byte count: digits, optionally followed by a binary unit K, M or G
// (also written KiB, MiB, GiB, or KB, MB, GB, all meaning powers of 1024;
// case-insensitive) or B. InvalidArgument for anything else or an overflow.
inline Result<std::uint64_t> ParseByteSize(std::string_view text) {
  std::uint64_t value = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data()) {
    return Unexpected(InvalidArgument("'" + std::string(text) + "' is not a byte count (e.g. 1048576, 512K, 64M, 1G)"));
  }
  std::string unit(end, text.data() + text.size());
  for (char& c : unit) c = static_cast<char>(c >= 'a' && c <= 'z' ? c - 'a' + 'A' : c);
  int shift = -1;
  if (unit.empty() || unit == "B") shift = 0;
  else if (unit == "K" || unit == "KB" || unit == "KIB") shift = 10;
  else if (unit == "M" || unit == "MB" || unit == "MIB") shift = 20;
  else if (unit == "G" || unit == "GB" || unit == "GIB") shift = 30;
  if (shift < 0) {
    return Unexpected(InvalidArgument("'" + std::string(text) + "': unknown unit (K, M or G, powers of 1024)"));
  }
  if (value > (UINT64_MAX >> shift)) return Unexpected(InvalidArgument("'" + std::string(text) + "' is too big"));
  return value << shift;
}

}  // namespace gatherer::cli
