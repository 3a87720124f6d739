#pragma once
// RunSummary: the counts behind the line `gatherer fetch` prints on stderr at
// the end of a run, e.g.
//
//   gatherer: 1000 statements: 996 ok, 4 failed (3 http_status
//   [HTTP 404: 2, HTTP 503: 1], 1 deadline_exceeded), 12 retried; 2.35 s,
//   425.5 req/s
//
// (one line). Add() costs a few increments per response, no allocation.
// Kept out of main.cc so it can be unit-tested; header-only.
//
// Not thread-safe: owned by the thread that reads the stream.

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "gatherer/statement.h"
#include "gatherer/status.h"

namespace gatherer::cli {

class RunSummary {
 public:
  // Counts one response written to the output.
  void Add(const Response& response) {
    if (response.attempts > 1) ++retried_;
    if (response.rate_wait_us > 0) {
      ++rate_waited_;
      rate_wait_us_ += response.rate_wait_us;
    }
    throttled_ += response.throttled;
    if (response.ok()) {
      ++ok_;
      return;
    }
    ++failed_;
    ++by_code_[static_cast<std::uint8_t>(response.error->code)];
    if (response.error->code == StatusCode::kHttpStatus && response.status > 0 &&
        response.status < static_cast<int>(kStatuses)) {
      ++by_status_[static_cast<std::size_t>(response.status)];
    }
  }

  std::uint64_t written() const { return ok_ + failed_; }
  std::uint64_t failed() const { return failed_; }

  // "<statements> statements: <ok> ok, <failed> failed (<kinds>)[, <n> not
  // answered], <retried> retried; <wall> s, <rate> req/s", without
  // "gatherer: " or a newline. Kinds are the error kinds of the output
  // lines, most frequent first; HTTP statuses of http_status (a final
  // status not accepted) follow in brackets, at most kMaxStatuses of them.
  // "not answered" appears when the run stopped before every statement had
  // its line. The rate is lines written per second of `wall`.
  std::string Format(std::uint64_t statements, std::chrono::nanoseconds wall) const {
    std::string s = std::to_string(statements) + (statements == 1 ? " statement: " : " statements: ");
    s += std::to_string(ok_) + " ok, " + std::to_string(failed_) + " failed";
    if (failed_ > 0) s += " (" + Kinds() + ")";
    if (statements > written()) s += ", " + std::to_string(statements - written()) + " not answered";
    s += ", " + std::to_string(retried_) + " retried; ";
    const double seconds = std::chrono::duration<double>(wall).count();
    char tail[64];
    std::snprintf(tail, sizeof tail, "%.2f s, %.1f req/s", seconds,
                  seconds > 0 ? static_cast<double>(written()) / seconds : 0.0);
    s += tail;
    // Rate limits (PROTOCOL.md §3.8): what was declared, how many statements
    // waited for their keys and how long in all, the 429s met.
    if (!rate_limits_.empty() || rate_waited_ > 0 || throttled_ > 0) {
      s += "; rate limits";
      if (!rate_limits_.empty()) s += " " + rate_limits_;
      std::snprintf(tail, sizeof tail, ": %llu waited %.2f s in all, %llu throttled (429)",
                    static_cast<unsigned long long>(rate_waited_), static_cast<double>(rate_wait_us_) / 1e6,
                    static_cast<unsigned long long>(throttled_));
      s += tail;
    }
    return s;
  }

  // The declared limits, as the summary names them ("20:1,100:120 per host").
  void SetRateLimits(std::string text) { rate_limits_ = std::move(text); }

 private:
  static constexpr std::size_t kStatuses = 1000;
  static constexpr std::size_t kMaxStatuses = 5;

  std::string Kinds() const {
    std::vector<std::pair<std::uint64_t, std::uint8_t>> kinds;  // (count, code)
    for (std::size_t code = 0; code < by_code_.size(); ++code) {
      if (by_code_[code] > 0) kinds.emplace_back(by_code_[code], static_cast<std::uint8_t>(code));
    }
    std::sort(kinds.begin(), kinds.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first > b.first : StatusCodeName(static_cast<StatusCode>(a.second)) <
                                                          StatusCodeName(static_cast<StatusCode>(b.second));
    });
    std::string s;
    for (const auto& [count, code] : kinds) {
      if (!s.empty()) s += ", ";
      s += std::to_string(count) + " " + std::string(StatusCodeName(static_cast<StatusCode>(code)));
      if (static_cast<StatusCode>(code) == StatusCode::kHttpStatus) s += Statuses();
    }
    return s;
  }

  // " [HTTP 404: 2, HTTP 503: 1]", or "" when no status was counted.
  std::string Statuses() const {
    std::string s;
    std::size_t listed = 0;
    for (std::size_t status = 0; status < kStatuses; ++status) {
      if (by_status_[status] == 0) continue;
      if (listed == kMaxStatuses) {
        s += ", ...";
        break;
      }
      s += listed == 0 ? " [" : ", ";
      s += "HTTP " + std::to_string(status) + ": " + std::to_string(by_status_[status]);
      ++listed;
    }
    if (listed > 0) s += "]";
    return s;
  }

  std::uint64_t ok_ = 0;
  std::uint64_t failed_ = 0;
  std::uint64_t retried_ = 0;
  std::uint64_t rate_waited_ = 0;
  std::uint64_t rate_wait_us_ = 0;
  std::uint64_t throttled_ = 0;
  std::string rate_limits_;
  std::array<std::uint64_t, 256> by_code_{};
  std::array<std::uint64_t, kStatuses> by_status_{};
};

}  // namespace gatherer::cli
