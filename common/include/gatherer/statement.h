#pragma once
// Statement (one HTTP request) and Response (its outcome): the values users
// hand to and get from Gatherer, and that travel on the wire.
//
// Plain values; not synchronised. Move them between threads, do not share.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gatherer/status.h"

namespace gatherer {

// Ordered header list; names compare case-insensitively in HTTP, order is kept.
using Headers = std::vector<std::pair<std::string, std::string>>;

struct Statement {
  // HTTP method, upper case token: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS.
  std::string method = "GET";
  // Absolute http(s) URL, or a path joined to the session's base_url.
  std::string url;
  // Sent after the session's default headers; a name given here replaces the default.
  Headers headers;
  // Request body (bytes); empty means none.
  std::string body;
  // Per-attempt total timeout in milliseconds; 0 = the session's timeout.
  std::uint32_t timeout_ms = 0;
  // May this statement be sent again when an attempt's outcome is unknown?
  // Unset = by method (GET, HEAD, PUT, DELETE, OPTIONS yes; POST, PATCH no).
  std::optional<bool> idempotent;
};

// Methods that may be repeated without a second effect (RFC 9110 §9.2.2);
// unknown methods are treated as unsafe to repeat.
inline bool DefaultIdempotent(std::string_view method) {
  return method == "GET" || method == "HEAD" || method == "PUT" || method == "DELETE" ||
         method == "OPTIONS" || method == "TRACE";
}

// May `s` be sent again when an attempt's outcome is unknown?
inline bool IsIdempotent(const Statement& s) { return s.idempotent.value_or(DefaultIdempotent(s.method)); }

// Convenience: a GET of `url`.
inline Statement Get(std::string url) {
  Statement s;
  s.url = std::move(url);
  return s;
}

// How a statement failed, when it did: `code` says the class (unavailable =
// connection failed, deadline_exceeded = timed out, http_status = the
// final status was not accepted, resource_exhausted = body over the cap,
// cancelled, ...) and `message` says what happened, in words.
struct ResponseError {
  StatusCode code = StatusCode::kOk;
  std::string message;
};

struct Response {
  // Final HTTP status, 0 when no response was received.
  int status = 0;
  // Response headers of the final attempt, in the order received.
  Headers headers;
  // Response body of the final attempt.
  std::string body;
  // Set when the statement failed; unset on success.
  std::optional<ResponseError> error;
  // Number of HTTP attempts made (1 + retries).
  std::uint32_t attempts = 0;
  // Time from the first attempt's start to the final outcome, in microseconds.
  std::uint64_t elapsed_us = 0;
  // Id of the worker that produced this response.
  std::string worker;
  // Rate limits (PROTOCOL.md §3.8): time the statement waited at the broker
  // for its keys to allow it, in microseconds (not part of elapsed_us), and
  // the 429s it met and ran again after.
  std::uint64_t rate_wait_us = 0;
  std::uint32_t throttled = 0;

  bool ok() const { return !error.has_value(); }
};

}  // namespace gatherer
