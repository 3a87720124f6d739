#pragma once
// One statement being fetched (Transfer): its state across attempts, and what
// reads and judges a response apart from the I/O loop: the header callback,
// the Content-Encoding clean-up after libcurl decoded a body, the outcome of
// an attempt (done, failed, or tried again after a wait), Retry-After, and
// the labels /metrics counts a response under.
//
// A Transfer is owned and touched by one I/O thread only (its ThreadSession's).

#include <curl/curl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "fetch_metrics.h"
#include "gatherer/rate_limit.h"
#include "gatherer/statement.h"
#include "retry_policy.h"

namespace gatherer::worker {

using Clock = std::chrono::steady_clock;

// Response headers beyond this fail the attempt with resource_exhausted:
// libcurl 7.88 caps one header line, not the sum, and peers are untrusted
// (errors are values inside the system).
inline constexpr std::size_t kMaxResponseHeaderBytes = 1 << 20;

struct ThreadSession;  // io_thread.cc

// One statement being fetched, across its attempts. Owned by its ThreadSession.
struct Transfer {
  enum class Overflow { kNone, kBody, kHeaders };

  ThreadSession* session = nullptr;
  std::uint64_t index = 0;
  // Kept here for the whole transfer: CURLOPT_POSTFIELDS points into body.
  Statement statement;
  bool idempotent = true;
  bool plain_get = false;  // IsPlainGet: its handle stays configured for the session's next
  CURL* easy = nullptr;
  curl_slist* header_list = nullptr;
  bool in_multi = false;
  std::uint32_t attempts = 0;
  // Made under earlier DISPATCHes: a rate-aware session's retries run again
  // through the broker (§3.8.6), which counts them here.
  std::uint32_t prior_attempts = 0;
  Clock::time_point started{};
  // Of the current attempt.
  Response response;
  std::string reason;  // reason phrase of the last status line
  std::size_t header_bytes = 0;
  // The final response names a Content-Encoding other than identity, so
  // libcurl decodes its body (CURLOPT_ACCEPT_ENCODING).
  bool encoded = false;
  // Non-idempotent statements only (PrereqCallback), per attempt: requests
  // handed to a connection, the redirect count at the last one, and whether
  // a re-send of libcurl's own was refused.
  std::uint32_t requests_sent = 0;
  long redirects_at_send = 0;
  bool resend_refused = false;
  // Why the worker's destination policy refused this attempt, if it did.
  std::string refused;
  Overflow overflow = Overflow::kNone;
  // What the last response said about rate limits (rate-aware sessions, §3.8).
  std::optional<RateReport> rate;
  char error_buffer[CURL_ERROR_SIZE] = {};
};

// What an ended attempt calls for: the statement ends with `error` (nullopt:
// it succeeded), or, when `retry` is set, it is tried again after that wait
// (`error` is then the failure it would have ended with).
struct AttemptOutcome {
  std::optional<ResponseError> error;
  std::optional<RetryWait> retry;
};

// Judges an attempt libcurl ended with `code`: reads the final status into
// the response, drops the encoding headers of a decoded body, and applies
// the destination refusals, the caps, the rate-aware hand-back (§3.8) and
// the retry rules (retry_policy.h). Counts 429s and retries in `metrics`
// (nullptr = not counted).
AttemptOutcome JudgeAttempt(Transfer* transfer, CURLcode code, const SessionSettings& settings, FetchMetrics* metrics);

// CURLOPT_HEADERFUNCTION, `user` the Transfer: keeps the final response's
// status reason and headers (a redirect or 100-continue starts them over),
// unfolds obsolete line folding, notes a Content-Encoding, and fails the
// attempt past kMaxResponseHeaderBytes.
size_t HeaderCallback(char* data, size_t size, size_t count, void* user);

// libcurl decodes a compressed body (CURLOPT_ACCEPT_ENCODING), after which
// the response's Content-Encoding and Content-Length describe bytes that
// are not the body returned: both are dropped, as Go's http.Transport does
// when it decompresses. Only when a body was received (CURLINFO_SIZE_DOWNLOAD
// counts bytes as they came off the wire, before decoding): the headers of
// a HEAD, 204 or 304 describe the resource and stay.
void DropEncodingHeaders(Transfer* transfer);

// Retry-After (RFC 9110 §10.2.3): delta-seconds or an HTTP-date; nullopt when
// absent or unparsable. Read only when an attempt is about to be retried.
std::optional<std::uint64_t> RetryAfterMs(const Headers& headers);

// /metrics: the cause of an HTTP retry (IsRetryableHttpStatus statuses).
RetryCause RetryCauseOf(long status);

// /metrics: the host a transfer's last request went to (only for a 429).
std::string HostOf(CURL* easy);

}  // namespace gatherer::worker
