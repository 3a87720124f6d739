#pragma once
// Status and Result: how fallible calls inside Gatherer report failure.
//
// Codes are a subset of absl::StatusCode and keep its retry semantics:
// kUnavailable and kDeadlineExceeded are transient (retry with backoff),
// kInvalidArgument never succeeds on retry. `IsRetryable` is the one place
// that decides whether a failed attempt may be tried again.
//
// Thread-safety: const methods are safe to call concurrently; a Status is a
// value and is copied between threads, never shared mutably.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include <tl/expected.hpp>

namespace gatherer {

// The numbers are wire values (PROTOCOL.md §3.1) and never change. 1-15 are
// absl's; 6 (already_exists), 7 (permission_denied), 11 (out_of_range) and
// 12 (unimplemented) are not used by Gatherer and read as kInternal, as does
// any value past the last one. docs/errors.md says when each code happens.
enum class StatusCode : std::uint8_t {
  kOk = 0,
  kCancelled = 1,
  // The outcome is not known: a non-idempotent statement may or may not have
  // reached the server, and is not sent again (docs/architecture.md §1).
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  // CURVE: the peer's key may not do this (PROTOCOL.md §1.7).
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  // Given up on purpose: a poison statement that workers died running.
  kAborted = 10,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  // Gatherer's own: the server answered, with a final HTTP status outside the
  // session's accepted range [accept_min, accept_max] (after any retries).
  // The response's status, headers and body are those of that answer.
  kHttpStatus = 16,
};

// Stable lower-case name of a code ("unavailable"), used in logs, JSON output
// and error messages. Unknown values map to "unknown".
std::string_view StatusCodeName(StatusCode code);

// Parses a wire value; unknown values become kInternal so that a newer peer's
// code never crashes an older one.
StatusCode StatusCodeFromWire(std::uint8_t value);

// True for codes whose failed attempt may succeed when tried again later.
bool IsRetryable(StatusCode code);

class [[nodiscard]] Status {
 public:
  // OK stores nothing: creating and copying an OK status costs a null pointer.
  Status() noexcept = default;
  Status(StatusCode code, std::string_view message);

  static Status Ok() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  // Empty for OK.
  const std::string& message() const;
  // "invalid_argument: message", or "ok".
  std::string ToString() const;

  bool operator==(const Status& other) const {
    return code() == other.code() && message() == other.message();
  }

 private:
  struct Rep {
    StatusCode code;
    std::string message;
  };
  std::shared_ptr<const Rep> rep_;
};

inline Status InvalidArgument(std::string_view m) { return {StatusCode::kInvalidArgument, m}; }
inline Status NotFound(std::string_view m) { return {StatusCode::kNotFound, m}; }
inline Status DeadlineExceeded(std::string_view m) { return {StatusCode::kDeadlineExceeded, m}; }
inline Status ResourceExhausted(std::string_view m) { return {StatusCode::kResourceExhausted, m}; }
inline Status Unavailable(std::string_view m) { return {StatusCode::kUnavailable, m}; }
inline Status Cancelled(std::string_view m) { return {StatusCode::kCancelled, m}; }
inline Status FailedPrecondition(std::string_view m) { return {StatusCode::kFailedPrecondition, m}; }
inline Status PermissionDenied(std::string_view m) { return {StatusCode::kPermissionDenied, m}; }
inline Status DataLoss(std::string_view m) { return {StatusCode::kDataLoss, m}; }
inline Status Internal(std::string_view m) { return {StatusCode::kInternal, m}; }

template <typename T>
using Result = tl::expected<T, Status>;

inline tl::unexpected<Status> Unexpected(Status s) { return tl::unexpected<Status>(std::move(s)); }

}  // namespace gatherer
