#pragma once
// ProgressBar: the line `gatherer fetch` redraws on stderr while it runs,
//
//   [##########..........]  5120/10000  51%  3 failed  842.1 req/s  ETA 0:05
//
// from Gatherer::progress() snapshots, on a thread of its own (every
// `interval`), so a run that waits on the broker still shows its pace.
// stop() erases the line, leaving the terminal as it was for the summary.
// Format() is pure, for tests. Header-only.
//
// Thread-safety: construct, stop() and destroy on one thread; the drawing
// thread only reads Gatherer::progress() (any thread may).

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

#include "gatherer/gatherer.h"

namespace gatherer::cli {

class ProgressBar {
 public:
  // `total` overrides the library's (the CLI counted its input); 0 = unknown.
  ProgressBar(const Gatherer& gatherer, std::uint64_t total, int fd = STDERR_FILENO,
              std::chrono::milliseconds interval = std::chrono::milliseconds(200))
      : gatherer_(gatherer), total_(total), fd_(fd), interval_(interval), thread_([this] { loop(); }) {}
  ~ProgressBar() { stop(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Stops drawing and erases the bar; idempotent.
  void stop() {
    {
      std::lock_guard lock(mutex_);
      if (stopped_) return;
      stopped_ = true;
    }
    wake_.notify_all();
    thread_.join();
    if (drawn_) Write("\r\x1b[K");
  }

  static std::string Duration(double seconds) {
    const auto s = static_cast<std::uint64_t>(seconds + 0.5);
    char buf[32];
    if (s >= 3600) {
      std::snprintf(buf, sizeof buf, "%llu:%02llu:%02llu", static_cast<unsigned long long>(s / 3600),
                    static_cast<unsigned long long>(s / 60 % 60), static_cast<unsigned long long>(s % 60));
    } else {
      std::snprintf(buf, sizeof buf, "%llu:%02llu", static_cast<unsigned long long>(s / 60),
                    static_cast<unsigned long long>(s % 60));
    }
    return buf;
  }

  // One line, without "\r" or a newline.
  static std::string Format(const Progress& p, std::uint64_t total) {
    if (total == 0) total = p.total;
    char buf[160];
    std::string line;
    if (total > 0) {
      constexpr int kWidth = 20;
      const double fraction = std::min(1.0, static_cast<double>(p.done) / static_cast<double>(total));
      const int filled = static_cast<int>(fraction * kWidth);
      line = "[" + std::string(static_cast<std::size_t>(filled), '#') +
             std::string(static_cast<std::size_t>(kWidth - filled), '.') + "]";
      std::snprintf(buf, sizeof buf, "  %llu/%llu  %d%%", static_cast<unsigned long long>(p.done),
                    static_cast<unsigned long long>(total), static_cast<int>(fraction * 100));
      line += buf;
    } else {
      std::snprintf(buf, sizeof buf, "%llu done", static_cast<unsigned long long>(p.done));
      line += buf;
    }
    std::snprintf(buf, sizeof buf, "  %llu failed  %.1f req/s", static_cast<unsigned long long>(p.failed), p.rate);
    line += buf;
    if (total > 0 && p.rate > 0 && p.done <= total) {
      line += "  ETA " + Duration(static_cast<double>(total - p.done) / p.rate);
    }
    return line;
  }

 private:
  void loop() {
    std::unique_lock lock(mutex_);
    while (!stopped_) {
      wake_.wait_for(lock, interval_, [this] { return stopped_; });
      if (stopped_) break;
      Write("\r" + Format(gatherer_.progress(), total_) + "\x1b[K");
      drawn_ = true;
    }
  }
  void Write(const std::string& s) const {
    std::size_t off = 0;
    while (off < s.size()) {
      const ssize_t n = ::write(fd_, s.data() + off, s.size() - off);
      if (n <= 0) return;  // a terminal gone: nothing to draw on
      off += static_cast<std::size_t>(n);
    }
  }

  const Gatherer& gatherer_;
  const std::uint64_t total_;
  const int fd_;
  const std::chrono::milliseconds interval_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool stopped_ = false;
  bool drawn_ = false;  // written by the drawing thread, read after join()
  std::thread thread_;
};

}  // namespace gatherer::cli
