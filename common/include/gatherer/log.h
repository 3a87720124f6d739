#pragma once
// Logging: one spdlog logger named "gatherer" writing to stderr, shared by
// client, broker and worker. Levels follow Python's logging numbers, as the
// original Pyot Gatherer's `log_level` did: 10 debug, 20 info, 30 warning,
// 40 error, 50 critical.
//
// Thread-safety: Logger() and SetLogLevel() are safe from any thread
// (spdlog's _mt sink).

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string_view>

#include <spdlog/spdlog.h>

#include "gatherer/status.h"

namespace gatherer {

// The process-wide logger (created on first use).
spdlog::logger& Logger();

// Maps a Python level (10..50) to spdlog's and applies it. Values between
// are rounded down to the nearest level; below 10 = trace, above 50 = off.
void SetLogLevel(int python_level);

// A logger of its own at `python_level`, writing where Logger() writes:
// what a Gatherer and its embedded broker and worker log through, so that
// one Gatherer's log_level never changes another's, nor the process's.
std::shared_ptr<spdlog::logger> NewLogger(int python_level);

// Parses a level for command lines: 10..50, or debug / info / warning (warn)
// / error / critical in any case. InvalidArgument otherwise.
[[nodiscard]] Result<int> ParseLogLevel(std::string_view text);

// Lets through at most one message per interval per instance, counting the
// ones held back, so a peer flooding bad frames cannot flood the log
// (docs/architecture.md §1). Thread-safe.
class RateLimitedLog {
 public:
  explicit RateLimitedLog(std::chrono::milliseconds interval = std::chrono::seconds(1))
      : interval_ns_(std::chrono::duration_cast<std::chrono::nanoseconds>(interval).count()) {}

  // True if the caller should log now; `suppressed` gets how many were held
  // back since the last message that went through.
  bool allow(std::uint64_t& suppressed);

 private:
  const std::int64_t interval_ns_;
  std::atomic<std::int64_t> next_ns_{0};
  std::atomic<std::uint64_t> suppressed_{0};
};

}  // namespace gatherer
