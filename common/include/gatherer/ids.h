#pragma once
// Identifiers: session ids are uuid4 (16 random bytes, RFC 4122 version 4),
// carried on the wire as 16 raw bytes and shown as the canonical 36-character
// lower-case text.
//
// Plain values; thread-safe to copy. NewSessionId() may be called from any thread.

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>

#include "gatherer/status.h"

namespace gatherer {

struct SessionId {
  std::array<std::uint8_t, 16> bytes{};

  std::string ToString() const;  // "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx"
  std::string_view raw() const {
    return {reinterpret_cast<const char*>(bytes.data()), bytes.size()};
  }
  bool operator==(const SessionId&) const = default;
  auto operator<=>(const SessionId&) const = default;
};

// A fresh uuid4 from libuuid's random generator.
SessionId NewSessionId();

// Parses the 36-character text form.
Result<SessionId> ParseSessionId(std::string_view text);

// From 16 raw bytes (the wire form); InvalidArgument on any other length.
Result<SessionId> SessionIdFromRaw(std::string_view raw);

// "<hostname>-<pid>-<n>": unique per process instance, readable in logs.
std::string NewWorkerId();

}  // namespace gatherer

template <>
struct std::hash<gatherer::SessionId> {
  std::size_t operator()(const gatherer::SessionId& id) const noexcept {
    std::uint64_t a, b;
    std::memcpy(&a, id.bytes.data(), 8);
    std::memcpy(&b, id.bytes.data() + 8, 8);
    return static_cast<std::size_t>(a ^ (b * 0x9E3779B97F4A7C15ull));
  }
};
