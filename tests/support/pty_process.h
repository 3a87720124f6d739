#pragma once
// PtyProcess: a child process whose stdin, stdout and stderr are a
// pseudo-terminal (forkpty), for tests of what a user sees at a terminal:
// output arriving line by line, Ctrl-C typed at the keyboard (the terminal
// driver sends SIGINT to the foreground process group), a terminal that
// stops being read (writes block, as at a paused terminal).
//
// Header-only. Nothing reads the terminal behind the test's back: output is
// taken only by read_for()/read_until(), so a test that stops reading blocks
// the child's writes once the terminal's buffer is full.
//
// The terminal has the default settings of a new pty (echo, ICANON, ISIG,
// ONLCR: the child's "\n" arrives as "\r\n"; text() removes the '\r's).
//
// Thread-safety: one owner thread.

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace gatherer::testing {

class PtyProcess {
 public:
  // Starts argv[0] (a path) with the arguments on a new pseudo-terminal, as
  // the session leader and foreground process group of that terminal.
  // Throws std::runtime_error if it cannot start.
  explicit PtyProcess(std::vector<std::string> argv) {
    if (argv.empty()) throw std::runtime_error("PtyProcess: empty argv");
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    winsize size{};
    size.ws_row = 50;
    size.ws_col = 200;
    const pid_t parent = ::getpid();
    const pid_t pid = ::forkpty(&master_, nullptr, nullptr, &size);
    if (pid < 0) throw std::runtime_error(std::string("PtyProcess: forkpty: ") + std::strerror(errno));
    if (pid == 0) {
      // Async-signal-safe calls only until execv: the parent is threaded.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::signal(SIGPIPE, SIG_DFL);
      ::signal(SIGINT, SIG_DFL);
      ::signal(SIGTERM, SIG_DFL);
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    pid_ = pid;
    ::fcntl(master_, F_SETFD, FD_CLOEXEC);
    ::fcntl(master_, F_SETFL, ::fcntl(master_, F_GETFL) | O_NONBLOCK);
  }

  ~PtyProcess() {
    if (!status_) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
    }
    if (master_ >= 0) ::close(master_);
  }
  PtyProcess(const PtyProcess&) = delete;
  PtyProcess& operator=(const PtyProcess&) = delete;

  int pid() const { return pid_; }

  // True once the child reads `signal` from a signalfd (a "sigmask:" line of
  // /proc/<pid>/fdinfo). A program that takes its signals that way handles
  // them from then on; before, the default action may end it. The signal
  // blocked in /proc/<pid>/status is no such sign: a sanitizer's runtime
  // blocks every signal for a moment while it starts its own thread.
  bool reads_from_signalfd(int signal) const {
    try {
      for (const auto& fd : std::filesystem::directory_iterator("/proc/" + std::to_string(pid_) + "/fdinfo")) {
        std::ifstream info(fd.path());
        std::string line;
        while (std::getline(info, line)) {
          if (line.rfind("sigmask:", 0) != 0) continue;
          if (((std::stoull(line.substr(8), nullptr, 16) >> (signal - 1)) & 1U) != 0) return true;
        }
      }
    } catch (const std::exception&) {
      // The child is gone, or a descriptor closed while it was read: not yet.
    }
    return false;
  }

  // Sends `signal` to the child (not after it was reaped: the pid may be reused).
  void kill(int signal) {
    if (!status_) ::kill(pid_, signal);
  }

  // Types `keys` at the terminal ("\x03" is Ctrl-C, "\x04" Ctrl-D).
  void type(std::string_view keys) {
    while (!keys.empty()) {
      const ssize_t n = ::write(master_, keys.data(), keys.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw std::runtime_error(std::string("PtyProcess: write: ") + std::strerror(errno));
      keys.remove_prefix(static_cast<std::size_t>(n));
    }
  }

  // Reads what the terminal shows for `duration` (less if it closes).
  void read_for(std::chrono::milliseconds duration) {
    const auto deadline = std::chrono::steady_clock::now() + duration;
    while (read_some(deadline)) {
    }
  }

  // Reads until text() contains `part` or `timeout` passes; true if it does.
  bool read_until(std::string_view part, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      if (text().find(part) != std::string::npos) return true;
      if (!read_some(deadline)) return text().find(part) != std::string::npos;
    }
  }

  // Everything read from the terminal so far, '\r' removed.
  std::string text() const {
    std::string t;
    t.reserve(raw_.size());
    for (char c : raw_) {
      if (c != '\r') t += c;
    }
    return t;
  }

  // Exit status (or 128 + signal) once the child ended within `timeout`,
  // reading the terminal meanwhile so the child never blocks on it; nullopt
  // otherwise.
  std::optional<int> wait(std::chrono::milliseconds timeout, bool keep_reading = true) {
    if (status_) return status_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      int status = 0;
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        status_ = WIFEXITED(status) ? WEXITSTATUS(status) : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
        // What the child wrote before exiting is still in the terminal.
        read_for(std::chrono::milliseconds(50));
        return status_;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      if (keep_reading) {
        read_some(std::min(deadline, std::chrono::steady_clock::now() + std::chrono::milliseconds(20)));
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
    }
  }

 private:
  // Waits until `deadline` for output and appends it; false on timeout or
  // when the terminal closed (EIO once every slave fd is closed).
  bool read_some(std::chrono::steady_clock::time_point deadline) {
    char buf[4096];
    for (;;) {
      const ssize_t n = ::read(master_, buf, sizeof buf);
      if (n > 0) {
        raw_.append(buf, static_cast<std::size_t>(n));
        return true;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n == 0 || errno != EAGAIN) return false;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd p{master_, POLLIN, 0};
      const int r = ::poll(&p, 1, static_cast<int>(left.count()));
      if (r < 0 && errno != EINTR) return false;
      if (r == 0) return false;
    }
  }

  pid_t pid_ = -1;
  int master_ = -1;
  std::optional<int> status_;
  std::string raw_;
};

}  // namespace gatherer::testing
