#pragma once
// Process: a child process for cross-component tests (gatherer-broker,
// gatherer-worker, the gatherer CLI). stdin optionally fed from a string,
// stdout and stderr captured to memory by a reader thread.
//
// Thread-safety: one owner thread; stdout_text()/stderr_text() may be called
// from any thread.

#include <chrono>
#include <csignal>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gatherer::testing {

class Process {
 public:
  // Starts argv[0] (a path) with the arguments; stdin gets `input` and is then
  // closed (empty input = /dev/null). Throws std::runtime_error if it cannot start.
  explicit Process(std::vector<std::string> argv, std::string input = {});
  // Kills (SIGKILL) and reaps the child if still running.
  ~Process();
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;

  int pid() const;
  void kill(int signal = SIGKILL);
  // Exit status (or 128 + signal) once the child ended within `timeout`; nullopt otherwise.
  std::optional<int> wait(std::chrono::milliseconds timeout);
  bool running();
  // Peak resident set size of the child in KiB (wait4's ru_maxrss), once
  // wait() has reaped it; nullopt before, or if it was reaped by the destructor.
  // Linux carries the forked copy's high-water mark across exec, so this is
  // max(this process's RSS at fork, the child's peak): an upper bound on the
  // child's, exact only when the child outgrows its parent.
  std::optional<long> max_rss_kb() const;

  std::string stdout_text() const;
  std::string stderr_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gatherer::testing
