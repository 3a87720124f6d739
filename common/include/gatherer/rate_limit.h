#pragma once
// Rate limits (PROTOCOL.md §3.8): the windows a key allows, the rules that
// say which keys a statement counts against, and the parsers of what servers
// advertise in their response headers.
//
// Pure functions over values; safe from any thread.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gatherer/statement.h"

namespace gatherer {

// At most `count` requests in any `window_ms` milliseconds.
struct RateWindow {
  std::uint32_t count = 0;
  std::uint32_t window_ms = 0;
  bool operator==(const RateWindow&) const = default;
};
using RateWindows = std::vector<RateWindow>;

// Largest count and window accepted (a window log holds `count` send times).
inline constexpr std::uint32_t kMaxRateCount = 1'000'000;
inline constexpr std::uint32_t kMaxRateWindowMs = 86'400'000;  // one day
inline constexpr std::size_t kMaxRateWindows = 16;
inline constexpr std::size_t kMaxRateRules = 64;

// A declared limit. With an empty `path` it is a host rule: every
// destination host is its own key, with these windows. With a `path` pattern
// ("/matches/{id}", "/a/*/b": a `{...}` or `*` segment matches any one
// segment; a trailing "/**" any rest) it is a named, per-endpoint rule,
// keyed by its name and the host; `method` empty matches every method.
struct RateRule {
  std::string name;
  std::string method;
  std::string path;
  RateWindows windows;
  bool operator==(const RateRule&) const = default;
};

// "20:1,100:120": count:seconds pairs (seconds may have up to 3 decimals,
// "10:0.25"). nullopt when malformed or out of range.
std::optional<RateWindows> ParseRateWindows(std::string_view text);
// "20:1,100:120" (a host rule) or "[NAME=][METHOD ]PATH WINDOWS", e.g.
// "match=GET /matches/{id} 250:10". The name defaults to "[METHOD ]PATH".
std::optional<RateRule> ParseRateRule(std::string_view text);
// The inverse of ParseRateWindows ("20:1,100:120").
std::string FormatRateWindows(const RateWindows& windows);

// Does the URL path (no query) match a rule's pattern?
bool MatchRatePath(std::string_view pattern, std::string_view path);
// Host (lower case, with ":port" when given) and path of an absolute URL;
// false when it has no "scheme://host".
bool SplitUrl(std::string_view url, std::string_view& host, std::string_view& path);

// Which limit a 429 says was hit (X-Rate-Limit-Type).
enum class RateLimitType : std::uint8_t { kUnknown = 0, kApplication = 1, kMethod = 2, kService = 3 };

// What one response said about rate limits, as the worker reports it to the
// broker with the result (PROTOCOL.md §3.8).
struct RateReport {
  // The response was a 429: the statement is handed back to run again.
  bool throttled = false;
  // A retryable failure (5xx, a broken connection) the worker did not try
  // again itself: the broker runs the statement again after retry_after_ms,
  // so that every attempt is granted against the keys.
  bool retry = false;
  RateLimitType type = RateLimitType::kUnknown;
  // Retry-After (or a reset when nothing remains), ms from receipt; 0 = none.
  std::uint32_t retry_after_ms = 0;
  // Advertised limits of the application (the host) and of the method.
  RateWindows app;
  RateWindows method;
  bool operator==(const RateReport&) const = default;
};

// Reads Retry-After, X-App-Rate-Limit, X-Method-Rate-Limit, X-Rate-Limit-Type,
// RateLimit-Limit/-Remaining/-Reset, X-RateLimit-*, IETF RateLimit and
// RateLimit-Policy. `now_unix` resolves an HTTP-date Retry-After. nullopt
// when the response says nothing about limits and is not a 429. Allocates
// nothing for a response without such headers.
std::optional<RateReport> ParseRateHeaders(int status, const Headers& headers, std::int64_t now_unix);

// Retry-After as milliseconds from now (delta-seconds or an HTTP-date);
// nullopt when absent or unparsable.
std::optional<std::uint64_t> ParseRetryAfter(std::string_view value, std::int64_t now_unix);

}  // namespace gatherer
