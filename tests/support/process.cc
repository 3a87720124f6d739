#include "process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>

namespace gatherer::testing {
namespace {

std::runtime_error sys_error(const std::string& what) {
  return std::runtime_error("Process: " + what + ": " + std::strerror(errno));
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// A pipe whose both ends are close-on-exec, so no other child inherits it;
// dup2() onto 0/1/2 in our child clears the flag on the copy only.
void make_pipe(int fds[2]) {
  if (::pipe2(fds, O_CLOEXEC) != 0) throw sys_error("pipe2");
}

void set_nonblocking(int fd) { ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK); }

int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Child side of fork(): only async-signal-safe calls until execv, since the
// parent (gtest, curl, servers) is multi-threaded.
[[noreturn]] void exec_child(char* const* argv, int stdin_fd, int stdout_fd, int stderr_fd,
                             int error_fd, pid_t parent) {
  // Die with the parent, so a crashed test leaves no broker or worker
  // behind. Caveat: "parent" is the forking thread; see Process::Process.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) ::_exit(127);  // parent died before prctl

  // An ignored SIGPIPE and a blocked mask survive exec; give the child defaults.
  ::signal(SIGPIPE, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);

  const int targets[3] = {STDIN_FILENO, STDOUT_FILENO, STDERR_FILENO};
  const int sources[3] = {stdin_fd, stdout_fd, stderr_fd};
  for (int i = 0; i < 3; ++i) {
    if (sources[i] == targets[i]) {
      ::fcntl(targets[i], F_SETFD, 0);
    } else if (::dup2(sources[i], targets[i]) < 0) {
      const int err = errno;
      [[maybe_unused]] ssize_t n = ::write(error_fd, &err, sizeof err);
      ::_exit(127);
    }
  }
  // fds opened without O_CLOEXEC elsewhere in the test binary stay out of
  // the child. Best effort: needs Linux 5.11.
  ::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
  ::execv(argv[0], argv);
  const int err = errno;
  [[maybe_unused]] ssize_t n = ::write(error_fd, &err, sizeof err);
  ::_exit(127);
}

}  // namespace

// State of one child. pid_/status_ belong to the owner thread; the pipe fds
// to the writer and reader threads; out_/err_ are shared under mu_.
struct Process::Impl {
  void write_input();
  void read_output();
  void stop_threads();

  pid_t pid_ = -1;
  std::optional<int> status_;  // cached once reaped
  std::optional<long> max_rss_kb_;  // from wait4, once reaped by wait()
  std::string input_;
  int stdin_fd_ = -1;   // write end, owned by the writer thread once started
  int stdout_fd_ = -1;  // read ends, owned by the reader thread once started
  int stderr_fd_ = -1;
  // Readable once the child has been reaped: tells both threads to finish
  // (the reader after a last drain) even if a grandchild keeps a pipe open.
  int stop_fd_ = -1;
  std::thread writer_;
  std::thread reader_;

  mutable std::mutex mu_;
  std::string out_;  // guarded by mu_
  std::string err_;  // guarded by mu_
};

void Process::Impl::write_input() {
  // A child that exits without reading makes write() raise SIGPIPE, which
  // would kill the test binary. The signal is thread-directed; blocked here it
  // stays pending on this thread and vanishes when the thread ends.
  sigset_t pipe_set;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, nullptr);

  std::size_t pos = 0;
  while (pos < input_.size()) {
    const ssize_t n = ::write(stdin_fd_, input_.data() + pos, input_.size() - pos);
    if (n > 0) {
      pos += static_cast<std::size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {
      pollfd fds[2] = {{stdin_fd_, POLLOUT, 0}, {stop_fd_, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
      if (fds[1].revents != 0) break;
      continue;
    }
    break;  // EPIPE: the child closed stdin
  }
  close_fd(stdin_fd_);
}

void Process::Impl::read_output() {
  std::array<char, 16 * 1024> buf;
  int fds[2] = {stdout_fd_, stderr_fd_};
  std::string* sinks[2] = {&out_, &err_};
  // Reads what is available on fds[i]; false once it hit EOF or an error.
  auto drain = [&](int i) {
    for (;;) {
      const ssize_t n = ::read(fds[i], buf.data(), buf.size());
      if (n > 0) {
        std::lock_guard lock(mu_);
        sinks[i]->append(buf.data(), static_cast<std::size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      return n < 0 && errno == EAGAIN;
    }
  };
  bool stopping = false;
  while (!stopping && (fds[0] >= 0 || fds[1] >= 0)) {
    pollfd pfds[3] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (::poll(pfds, 3, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    // The child's writes all precede its exit, so one last drain after the
    // stop signal gets everything.
    stopping = pfds[2].revents != 0;
    for (int i = 0; i < 2; ++i) {
      if (fds[i] >= 0 && (stopping || pfds[i].revents != 0) && !drain(i)) close_fd(fds[i]);
    }
  }
  close_fd(fds[0]);
  close_fd(fds[1]);
}

void Process::Impl::stop_threads() {
  if (stop_fd_ >= 0) {
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(stop_fd_, &one, sizeof one);
  }
  if (writer_.joinable()) writer_.join();
  if (reader_.joinable()) reader_.join();
}

Process::Process(std::vector<std::string> argv, std::string input)
    : impl_(std::make_unique<Impl>()) {
  if (argv.empty()) throw std::runtime_error("Process: empty argv");
  std::vector<char*> args;
  args.reserve(argv.size() + 1);
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);

  Impl& d = *impl_;
  int in_pipe[2] = {-1, -1};
  int out_pipe[2] = {-1, -1};
  int err_pipe[2] = {-1, -1};
  int exec_pipe[2] = {-1, -1};
  auto close_all = [&] {
    for (int* p : {in_pipe, out_pipe, err_pipe, exec_pipe}) {
      close_fd(p[0]);
      close_fd(p[1]);
    }
    close_fd(d.stop_fd_);
  };
  try {
    if (input.empty()) {
      in_pipe[0] = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (in_pipe[0] < 0) throw sys_error("open /dev/null");
    } else {
      make_pipe(in_pipe);
    }
    make_pipe(out_pipe);
    make_pipe(err_pipe);
    make_pipe(exec_pipe);
    d.stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (d.stop_fd_ < 0) throw sys_error("eventfd");
  } catch (...) {
    close_all();
    throw;
  }

  // PR_SET_PDEATHSIG fires when the forking *thread* exits, so a Process
  // created on a short-lived thread dies with that thread: create it on the
  // test's main thread (or one that outlives it).
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const auto error = sys_error("fork");
    close_all();
    throw error;
  }
  if (pid == 0) exec_child(args.data(), in_pipe[0], out_pipe[1], err_pipe[1], exec_pipe[1], parent);

  // Parent: keep only our ends, then learn whether execv worked (EOF on the
  // close-on-exec pipe) or failed (it carries errno).
  close_fd(in_pipe[0]);
  close_fd(out_pipe[1]);
  close_fd(err_pipe[1]);
  close_fd(exec_pipe[1]);
  int child_errno = 0;
  ssize_t n;
  do {
    n = ::read(exec_pipe[0], &child_errno, sizeof child_errno);
  } while (n < 0 && errno == EINTR);
  close_fd(exec_pipe[0]);
  if (n > 0) {
    int status = 0;
    while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    close_all();
    errno = child_errno;
    throw sys_error("cannot start " + argv[0]);
  }

  d.pid_ = pid;
  d.stdout_fd_ = out_pipe[0];
  d.stderr_fd_ = err_pipe[0];
  set_nonblocking(d.stdout_fd_);
  set_nonblocking(d.stderr_fd_);
  d.reader_ = std::thread([&d] { d.read_output(); });
  if (in_pipe[1] >= 0) {
    d.stdin_fd_ = in_pipe[1];
    set_nonblocking(d.stdin_fd_);
    d.input_ = std::move(input);
    d.writer_ = std::thread([&d] { d.write_input(); });
  }
}

Process::~Process() {
  if (!impl_->status_) {
    ::kill(impl_->pid_, SIGKILL);
    int status = 0;
    while (::waitpid(impl_->pid_, &status, 0) < 0 && errno == EINTR) {
    }
    impl_->status_ = decode_status(status);
  }
  impl_->stop_threads();
  close_fd(impl_->stop_fd_);
}

int Process::pid() const { return impl_->pid_; }

void Process::kill(int signal) {
  // Once reaped the pid may belong to someone else.
  if (!impl_->status_) ::kill(impl_->pid_, signal);
}

std::optional<int> Process::wait(std::chrono::milliseconds timeout) {
  Impl& d = *impl_;
  if (d.status_) return d.status_;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto nap = std::chrono::microseconds(200);
  for (;;) {
    int status = 0;
    struct rusage usage {};
    const pid_t r = ::wait4(d.pid_, &status, WNOHANG, &usage);
    if (r == d.pid_) {
      d.status_ = decode_status(status);
      d.max_rss_kb_ = usage.ru_maxrss;
      // Output is complete now: stdout_text() after wait() sees all of it.
      d.stop_threads();
      return d.status_;
    }
    if (r < 0 && errno != EINTR) throw sys_error("waitpid");
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(nap);
    nap = std::min(nap * 2, std::chrono::microseconds(10'000));
  }
}

bool Process::running() { return !wait(std::chrono::milliseconds(0)).has_value(); }

std::optional<long> Process::max_rss_kb() const { return impl_->max_rss_kb_; }

std::string Process::stdout_text() const {
  std::lock_guard lock(impl_->mu_);
  return impl_->out_;
}

std::string Process::stderr_text() const {
  std::lock_guard lock(impl_->mu_);
  return impl_->err_;
}

}  // namespace gatherer::testing
