#include "transfer.h"

#include <algorithm>
#include <ctime>
#include <string_view>
#include <vector>

#include "fetcher.h"
#include "gatherer/strings.h"
#include "retry_policy.h"

namespace gatherer::worker {
namespace {

// Said of a non-idempotent statement that may have been acted on.
constexpr std::string_view kOutcomeUnknown =
    "outcome unknown: the request may have reached the server, and a non-idempotent statement is not sent again";

}  // namespace

size_t HeaderCallback(char* data, size_t size, size_t count, void* user) {
  auto* transfer = static_cast<Transfer*>(user);
  const std::size_t bytes = size * count;
  transfer->header_bytes += bytes;
  if (transfer->header_bytes > kMaxResponseHeaderBytes) {
    transfer->overflow = Transfer::Overflow::kHeaders;
    return CURL_WRITEFUNC_ERROR;
  }
  std::string_view line(data, bytes);
  while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.remove_suffix(1);
  Headers& headers = transfer->response.headers;
  if (line.starts_with("HTTP/")) {
    // A new response begins (redirect, 100-continue): keep only the final one's.
    headers.clear();
    transfer->reason.clear();
    transfer->encoded = false;
    const std::size_t code_at = line.find(' ');
    if (code_at != std::string_view::npos) {
      const std::size_t reason_at = line.find(' ', code_at + 1);
      if (reason_at != std::string_view::npos) transfer->reason = std::string(Trim(line.substr(reason_at + 1)));
    }
    return bytes;
  }
  if (line.empty()) return bytes;
  if ((line.front() == ' ' || line.front() == '\t') && !headers.empty()) {
    // Obsolete line folding (RFC 9112 §5.2): a continuation of the previous value.
    headers.back().second += ' ';
    headers.back().second += Trim(line);
    return bytes;
  }
  const std::size_t colon = line.find(':');
  if (colon == std::string_view::npos || colon == 0) return bytes;  // not a header; ignored
  const std::string_view name = Trim(line.substr(0, colon));
  const std::string_view value = Trim(line.substr(colon + 1));
  if (EqualsIgnoreCase(name, "Content-Encoding") && !value.empty() && !EqualsIgnoreCase(value, "identity")) {
    transfer->encoded = true;
  }
  // One allocation for a typical response's headers rather than growing
  // through 1, 2, 4, 8 and 16 (each growth moving every string).
  if (headers.capacity() == 0) headers.reserve(16);
  headers.emplace_back(std::string(name), std::string(value));
  return bytes;
}

void DropEncodingHeaders(Transfer* transfer) {
  curl_off_t received = 0;
  curl_easy_getinfo(transfer->easy, CURLINFO_SIZE_DOWNLOAD_T, &received);
  if (received <= 0) return;
  std::erase_if(transfer->response.headers, [](const auto& h) {
    return EqualsIgnoreCase(h.first, "Content-Encoding") || EqualsIgnoreCase(h.first, "Content-Length");
  });
}

std::optional<std::uint64_t> RetryAfterMs(const Headers& headers) {
  for (const auto& [name, value] : headers) {
    if (EqualsIgnoreCase(name, "Retry-After")) return ParseRetryAfter(value, std::time(nullptr));
  }
  return std::nullopt;
}

RetryCause RetryCauseOf(long status) {
  switch (status) {
    case 408: return RetryCause::k408;
    case 429: return RetryCause::k429;
    case 500: return RetryCause::k500;
    case 502: return RetryCause::k502;
    case 503: return RetryCause::k503;
    default: return RetryCause::k504;
  }
}

std::string HostOf(CURL* easy) {
  char* url = nullptr;
  curl_easy_getinfo(easy, CURLINFO_EFFECTIVE_URL, &url);
  if (!url) return "unknown";
  std::string_view u(url);
  const auto scheme = u.find("://");
  if (scheme != std::string_view::npos) u.remove_prefix(scheme + 3);
  u = u.substr(0, u.find_first_of("/?#"));
  if (const auto at = u.rfind('@'); at != std::string_view::npos) u.remove_prefix(at + 1);
  return std::string(u);
}

AttemptOutcome JudgeAttempt(Transfer* transfer, CURLcode code, const SessionSettings& settings, FetchMetrics* metrics) {
  long status = 0;
  curl_easy_getinfo(transfer->easy, CURLINFO_RESPONSE_CODE, &status);
  transfer->response.status = static_cast<int>(status);
  if (transfer->encoded) DropEncodingHeaders(transfer);
  const std::uint32_t attempts = transfer->prior_attempts + transfer->attempts;
  const bool attempts_left = attempts < std::max<std::uint32_t>(settings.max_attempts, 1);

  if (!transfer->refused.empty()) {
    // Nothing reached the refused destination: no retry could change it.
    return AttemptOutcome{ResponseError{StatusCode::kPermissionDenied, "destination refused: " + transfer->refused}};
  }
  if (code == CURLE_OK && settings.rate_aware()) {
    // §3.8: the limits a response advertises go to the broker with the
    // result; a 429 is not retried here but handed back, so that the
    // broker pauses its key for the whole cluster and runs it again.
    transfer->rate = ParseRateHeaders(static_cast<int>(status), transfer->response.headers, std::time(nullptr));
    if (status == 429) {
      return AttemptOutcome{ResponseError{StatusCode::kHttpStatus, "HTTP 429 Too Many Requests"}};
    }
  }
  if (metrics && code == CURLE_OK && status == 429) metrics->note_429(HostOf(transfer->easy));
  if (code == CURLE_OK) {
    if (status >= settings.accept_min && status <= settings.accept_max) {
      return AttemptOutcome{std::nullopt};
    }
    // Any HTTP answer is a known outcome; retry_policy.h says which are
    // tried again.
    const auto wait = IsRetryableHttpStatus(status)
                          ? HttpRetry(status, transfer->idempotent, RetryAfterMs(transfer->response.headers), settings)
                          : std::nullopt;
    std::string message = "HTTP " + std::to_string(status);
    if (!transfer->reason.empty()) message += " " + transfer->reason;
    if (wait && attempts_left) {
      if (metrics) metrics->note_retry(RetryCauseOf(status));
      return AttemptOutcome{ResponseError{StatusCode::kHttpStatus, std::move(message)}, *wait};
    }
    if (wait) {
      message += " after " + std::to_string(attempts) + " attempts";
    } else if (IsRetryableHttpStatus(status) && attempts_left) {  // a non-idempotent statement
      message += " (not retried: a non-idempotent statement is sent again only after 429, or 503 with Retry-After)";
    }
    return AttemptOutcome{ResponseError{StatusCode::kHttpStatus, std::move(message)}};
  }

  if (transfer->overflow == Transfer::Overflow::kBody || code == CURLE_FILESIZE_EXCEEDED) {
    return AttemptOutcome{ResponseError{StatusCode::kResourceExhausted, "response body exceeds max_body_bytes (" +
                                                                            std::to_string(settings.max_body_bytes) +
                                                                            ")"}};
  }
  if (transfer->overflow == Transfer::Overflow::kHeaders) {
    return AttemptOutcome{ResponseError{
        StatusCode::kResourceExhausted, "response headers exceed " + std::to_string(kMaxResponseHeaderBytes) + " bytes"}};
  }
  if (transfer->resend_refused) {
    return AttemptOutcome{ResponseError{StatusCode::kUnknown,
                                        "the connection closed without a response after the request was sent; " +
                                            std::string(kOutcomeUnknown)}};
  }
  StatusCode status_code = StatusCodeFromCurl(code);
  std::string message = curl_easy_strerror(code);
  if (transfer->error_buffer[0] != '\0') {
    message += ": ";
    message += transfer->error_buffer;
  }
  if (IsRetryable(status_code)) {
    // A failure before any request was handed to a connection (DNS, refused
    // or timed-out connect, TLS handshake) sent nothing: even a POST is
    // tried again. After that (a timeout waiting for the answer, a
    // connection that broke) the server may have acted on it.
    if (!transfer->idempotent && transfer->requests_sent > 0) {
      status_code = StatusCode::kUnknown;
      if (status != 0) message += " (the server had begun to answer: HTTP " + std::to_string(status) + ")";
      message += "; ";
      message += kOutcomeUnknown;
    } else if (attempts_left) {
      if (metrics) metrics->note_retry(RetryCause::kTransport);
      return AttemptOutcome{ResponseError{status_code, std::move(message)},
                            RetryWait{std::nullopt, settings.backoff_base_ms}};
    } else if (attempts > 1) {
      message += " (after " + std::to_string(attempts) + " attempts)";
    }
  }
  return AttemptOutcome{ResponseError{status_code, std::move(message)}};
}

}  // namespace gatherer::worker
