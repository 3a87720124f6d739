#include "gatherer/log.h"

#include <charconv>
#include <memory>
#include <utility>

#include <spdlog/sinks/stdout_color_sinks.h>

#include "gatherer/strings.h"

namespace gatherer {

spdlog::logger& Logger() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    auto existing = spdlog::get("gatherer");
    if (existing) return existing;
    auto l = spdlog::stderr_color_mt("gatherer");
    l->set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [%n] %v");
    l->set_level(spdlog::level::debug);
    return l;
  }();
  return *logger;
}

namespace {
spdlog::level::level_enum LevelFor(int python_level) {
  if (python_level < 10) return spdlog::level::trace;
  if (python_level < 20) return spdlog::level::debug;
  if (python_level < 30) return spdlog::level::info;
  if (python_level < 40) return spdlog::level::warn;
  if (python_level < 50) return spdlog::level::err;
  if (python_level == 50) return spdlog::level::critical;
  return spdlog::level::off;
}
}  // namespace

void SetLogLevel(int python_level) { Logger().set_level(LevelFor(python_level)); }

std::shared_ptr<spdlog::logger> NewLogger(int python_level) {
  // The sinks (stderr, and their format) are Logger()'s; only the level is
  // this logger's own.
  const auto& sinks = Logger().sinks();
  auto logger = std::make_shared<spdlog::logger>("gatherer", sinks.begin(), sinks.end());
  logger->set_level(LevelFor(python_level));
  return logger;
}

Result<int> ParseLogLevel(std::string_view text) {
  int level = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), level);
  if (ec == std::errc() && ptr == text.data() + text.size()) {
    if (level < 10 || level > 50) return Unexpected(InvalidArgument("log level must be 10..50"));
    return level;
  }
  static constexpr std::pair<std::string_view, int> kNames[] = {
      {"debug", 10}, {"info", 20}, {"warning", 30}, {"warn", 30}, {"error", 40}, {"critical", 50}};
  for (const auto& [name, value] : kNames) {
    if (EqualsIgnoreCase(text, name)) return value;
  }
  return Unexpected(InvalidArgument("log level must be 10..50 or debug, info, warning, error, critical"));
}

bool RateLimitedLog::allow(std::uint64_t& suppressed) {
  const std::int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::steady_clock::now().time_since_epoch())
                               .count();
  std::int64_t next = next_ns_.load(std::memory_order_relaxed);
  if (now >= next && next_ns_.compare_exchange_strong(next, now + interval_ns_)) {
    suppressed = suppressed_.exchange(0);
    return true;
  }
  suppressed_.fetch_add(1, std::memory_order_relaxed);
  return false;
}

}  // namespace gatherer
