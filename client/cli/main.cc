// gatherer: fetch statements read as JSON Lines (or bare URLs) and write the
// responses as JSON Lines in input order (README, "CLI").
//
//   gatherer fetch [FILE|-] [--workers N] [--broker tcp://host:port] ...
//
// Exit status: 0 every statement succeeded; 1 some failed, or the run
// stopped early (--cancel-on-raise, a broker that stopped answering, an
// input that changed); 2 usage error or invalid input (nothing fetched);
// 130 / 143 interrupted by SIGINT / SIGTERM. Reading, parsing and
// formatting live in jsonl.cc, flag checks in flags.h, the summary line in
// summary.h. Over 600 lines all the same: every flag is declared here with
// its help text and turned into Options, and the run's phases (signals,
// output, the stream, the summary) share one run's state.
//
// Big jobs run in bounded memory (docs/architecture.md §1): neither the input nor the
// output is ever held whole. A first pass reads and validates every line,
// keeping only a count, so an invalid line 900,000 still costs no request;
// a second pass over the same bytes (the file sought back, or a temporary
// copy of a pipe) feeds Gatherer::stream, and each response is written as
// soon as all earlier ones are. The window is min(--workers, statements):
// the stream's buffers scale with it, so a huge --workers on a small job
// costs nothing.
//
// Output: lines are appended to one buffer, written in 1 MiB chunks while
// responses come fast, and whenever the stream is about to wait
// (Stream::on_wait), so a slow run's lines reach the reader as they come;
// big chunks by a writer thread, beside the fetching (class Output).
//
// Signals: SIGINT and SIGTERM are blocked in every thread from the start and
// read from a signalfd by one watcher thread, which never runs in a signal
// handler. The first one cancels the run (Gatherer::cancel()); next() then
// hands out every response that was complete and throws, and the main thread
// writes them, says how far it got and exits 128 + the signal. A second one
// exits at once (even if the output is stuck).

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <deque>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "flags.h"
#include "gatherer/allocator.h"
#include "gatherer/curve.h"
#include "gatherer/gatherer.h"
#include "gatherer/log.h"
#include "gatherer/strings.h"
#include "gatherer/thread_name.h"
#include "jsonl.h"
#include "progress.h"
#include "summary.h"

namespace {

constexpr int kExitOk = 0;
constexpr int kExitFailed = 1;
constexpr int kExitUsage = 2;
// What a shell reports for a process killed by SIGPIPE: a reader that went
// away (`gatherer fetch ... | head`) ends the run quietly.
constexpr int kExitBrokenPipe = 128 + SIGPIPE;

// Output is written in chunks this big while lines come fast: one write per
// MiB keeps syscalls rare; Stream::on_wait flushes what is there whenever the
// stream would wait, so nothing sits in the buffer while nothing happens.
constexpr std::size_t kFlushBytes = 1u << 20;

// Limits of the flags that tune fetching (README "CLI").
constexpr long long kMaxRedirects = 100;
constexpr long long kMaxDelayMs = 3'600'000;  // backoff and Retry-After caps: 1 h

struct FetchFlags {
  std::string file;
  int workers = 25;
  std::string broker;
  std::string curve_broker_key;  // Z85 or a key file
  std::string curve_key;         // key pair file
  bool cancel_on_raise = false;
  std::vector<std::string> headers;
  std::string base_url;
  double timeout_s = 30;
  int retries = 3;
  // The CLI defaults to warnings only (30), unlike the library's 10: debug
  // lines on stderr would drown the progress of a long run.
  std::string log_level = "30";
  unsigned io_threads = 0;
  double broker_timeout_s = 60;
  bool quiet = false;
  // Progress bar on stderr: when stderr is a terminal that stdout is not
  // (responses written to the same terminal would tear it), or when asked.
  bool progress = false;
  long long max_redirects = 5;
  std::string max_body_bytes = "64M";
  std::string max_in_flight_bytes = "8M";
  std::string max_buffered_bytes = "64M";
  long long backoff_base_ms = 100;
  long long backoff_max_ms = 10'000;
  long long retry_after_max_ms = 60'000;
  bool backoff_bounds_given = false;  // both --backoff-base-ms and --backoff-max-ms
  std::vector<std::string> rate_limits;
  bool learn_rate_limits = false;
  std::string cacert, cert, key, proxy, no_proxy;
  bool insecure = false;
};

void PrintError(const std::string& message) { std::fprintf(stderr, "gatherer: %s\n", message.c_str()); }

const char* SignalName(int signal) {
  switch (signal) {
    case SIGINT: return "SIGINT";
    case SIGTERM: return "SIGTERM";
    default: return "a signal";
  }
}

// --- signals ------------------------------------------------------------------

// The one thread that sees SIGINT and SIGTERM. What a signal does depends on
// the phase of the run:
//   reading   (validating the input): nothing fetched yet; exit at once.
//   fetching  the run attached with attach() is cancelled; the main thread
//             reports it once Stream::next() throws.
//   closing   (everything written, the Gatherer closing its session, which
//             may wait up to 5 s for the broker): exit at once.
// A second signal in any phase exits at once.
//
// Thread-safety: every method may be called from any thread.
class SignalWatcher {
 public:
  enum class Phase { kReading, kFetching, kClosing };

  // Blocks SIGINT and SIGTERM in the calling thread and every thread it
  // starts later (the mask is inherited): call first thing in main.
  static void BlockSignals() {
    const sigset_t set = Set();
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
  }

  SignalWatcher() {
    const sigset_t set = Set();
    signal_fd_ = ::signalfd(-1, &set, SFD_CLOEXEC);
    stop_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (signal_fd_ < 0 || stop_fd_ < 0) throw std::runtime_error(std::string("signalfd: ") + std::strerror(errno));
    thread_ = std::thread([this] { Loop(); });
  }
  ~SignalWatcher() {
    const std::uint64_t one = 1;
    [[maybe_unused]] const ssize_t n = ::write(stop_fd_, &one, sizeof one);
    thread_.join();
    ::close(signal_fd_);
    ::close(stop_fd_);
  }
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

  void set_phase(Phase phase) {
    std::lock_guard lock(mu_);
    phase_ = phase;
  }

  // The run the first signal cancels; a signal that came before (while the
  // Gatherer was starting) cancels it now. `g` must stay alive until detach().
  void attach(gatherer::Gatherer* g) {
    std::lock_guard lock(mu_);
    run_ = g;
    if (first_ != 0) g->cancel();
  }
  void detach() {
    std::lock_guard lock(mu_);
    run_ = nullptr;
  }

  // The first signal received, or 0.
  int received() const {
    std::lock_guard lock(mu_);
    return first_;
  }

 private:
  static sigset_t Set() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    return set;
  }

  // Writes `text` to stderr unless that would block: a second Ctrl-C must
  // exit even when nobody reads the terminal any more.
  static void Say(const std::string& text) {
    pollfd p{STDERR_FILENO, POLLOUT, 0};
    if (::poll(&p, 1, 0) == 1 && (p.revents & POLLOUT) != 0) {
      [[maybe_unused]] const ssize_t n = ::write(STDERR_FILENO, text.data(), text.size());
    }
  }

  void Loop() {
    for (;;) {
      pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (fds[1].revents != 0) return;
      signalfd_siginfo info{};
      if (::read(signal_fd_, &info, sizeof info) != static_cast<ssize_t>(sizeof info)) continue;
      OnSignal(static_cast<int>(info.ssi_signo));
    }
  }

  void OnSignal(int signal) {
    std::lock_guard lock(mu_);
    const std::string name = SignalName(signal);
    if (first_ != 0) {
      Say("gatherer: second " + name + ": exiting at once\n");
      ::_exit(128 + signal);
    }
    first_ = signal;
    switch (phase_) {
      case Phase::kReading:
        Say("gatherer: interrupted by " + name + " while reading the input; nothing fetched\n");
        ::_exit(128 + signal);
      case Phase::kFetching:
        if (run_ != nullptr) run_->cancel();
        return;
      case Phase::kClosing:
        Say("gatherer: " + name + ": not waiting for the broker to confirm the end of the session\n");
        ::_exit(128 + signal);
    }
  }

  int signal_fd_ = -1;
  int stop_fd_ = -1;
  std::thread thread_;
  mutable std::mutex mu_;
  Phase phase_ = Phase::kReading;  // guarded by mu_
  gatherer::Gatherer* run_ = nullptr;  // guarded by mu_
  int first_ = 0;                      // guarded by mu_
};

// --- output -------------------------------------------------------------------

// The output lines, appended to one buffer and written to a file descriptor
// with write(2) (no stdio buffer in between, so what flush() wrote is out).
//
// In the embedded mode the caller's thread also runs the fetching, so what
// costs much per byte is done by a writer thread beside it: a response with
// a big body (kBigBody or more) is escaped there, and the 1 MiB chunks of
// small lines are written there. Lines of small bodies are escaped in place,
// and the remainder sent as the stream waits is written in place when the
// writer has nothing queued: neither costs a thread wake-up. Everything goes
// out in input order, and at most kQueuedBytes wait for the writer. The
// writer thread starts with the first chunk or big body it is given.
class Output {
 public:
  explicit Output(int fd) : fd_(fd) { buffer_.reserve(kFlushBytes + (kFlushBytes >> 2)); }
  ~Output() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (writer_.joinable()) writer_.join();
  }
  Output(const Output&) = delete;
  Output& operator=(const Output&) = delete;

  // Adds a response's line. False once a write failed (error() says why);
  // the rest is dropped then.
  bool add(std::uint64_t index, gatherer::Response&& response) {
    if (response.body.size() < kBigBody) {
      gatherer::cli::AppendResponseJson(buffer_, index, response);
      return buffer_.size() < kFlushBytes || queue_chunk();
    }
    if (!buffer_.empty() && !queue_chunk()) return false;
    const std::size_t bytes = response.body.size();
    return queue(Item{index, std::move(response), {}}, bytes);
  }
  // Sends what is buffered on its way, as the stream is about to wait.
  bool send() {
    if (buffer_.empty()) return error() == 0;
    {
      std::unique_lock lock(mu_);
      if (error_ != 0) return false;
      if (queued_.empty() && !busy_) {
        lock.unlock();
        const int error = WriteAll(fd_, buffer_);
        Recycle(buffer_);
        lock.lock();
        if (error != 0) error_ = error;
        return error == 0;
      }
    }
    return queue_chunk();
  }
  // Writes everything, and waits until it is out.
  bool flush() {
    if (!buffer_.empty()) queue_chunk();
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return (queued_.empty() && !busy_) || error_ != 0; });
    return error_ == 0;
  }
  int error() const {
    std::lock_guard lock(mu_);
    return error_;
  }

 private:
  static constexpr std::size_t kBigBody = 64u << 10;
  static constexpr std::size_t kQueuedBytes = 2u << 20;

  // Lines already escaped (`chunk`), or a response to escape.
  struct Item {
    std::uint64_t index = 0;
    gatherer::Response response;
    std::string chunk;
  };

  bool queue_chunk() {
    const std::size_t bytes = buffer_.size();
    Item item;
    item.chunk.swap(buffer_);
    buffer_.reserve(kFlushBytes + (kFlushBytes >> 2));
    return queue(std::move(item), bytes);
  }

  bool queue(Item&& item, std::size_t bytes) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return queued_bytes_ + bytes <= kQueuedBytes || queued_.empty() || error_ != 0; });
    if (error_ != 0) return false;
    queued_.push_back(std::move(item));
    queued_bytes_ += bytes;
    if (!writer_.joinable()) writer_ = std::thread([this] { write_queued(); });
    lock.unlock();
    cv_.notify_all();
    return true;
  }

  // 0, or the errno of the write that failed.
  static int WriteAll(int fd, const std::string& data) {
    std::size_t pos = 0;
    while (pos < data.size()) {
      const ssize_t n = ::write(fd, data.data() + pos, data.size() - pos);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {
          // A non-blocking stdout inherited from the parent: wait for room.
          pollfd p{fd, POLLOUT, 0};
          if (::poll(&p, 1, -1) >= 0 || errno == EINTR) continue;
        }
        return errno;
      }
      pos += static_cast<std::size_t>(n);
    }
    return 0;
  }
  static void Recycle(std::string& chunk) {
    chunk.clear();
    // One huge body grew the buffer: give the memory back.
    if (chunk.capacity() > 8 * kFlushBytes) {
      std::string().swap(chunk);
      chunk.reserve(kFlushBytes + (kFlushBytes >> 2));
    }
  }

  void write_queued() {
    gatherer::NameThisThread("gatherer-output");
    std::string line;  // a big body's, escaped here
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return !queued_.empty() || stop_; });
      if (queued_.empty()) return;
      Item item = std::move(queued_.front());
      queued_.pop_front();
      // As queue() counted it.
      const std::size_t bytes = item.chunk.empty() ? item.response.body.size() : item.chunk.size();
      busy_ = true;
      lock.unlock();
      int error = 0;
      if (item.chunk.empty()) {
        gatherer::cli::AppendResponseJson(line, item.index, item.response);
        item.response = {};  // its memory back before the write
        error = WriteAll(fd_, line);
        Recycle(line);
      } else {
        error = WriteAll(fd_, item.chunk);
      }
      item = {};
      lock.lock();
      busy_ = false;
      queued_bytes_ -= std::min(queued_bytes_, bytes);
      if (error != 0) {
        error_ = error;
        queued_.clear();
        queued_bytes_ = 0;
      }
      cv_.notify_all();
    }
  }

  const int fd_;
  std::string buffer_;  // the caller's thread's: lines of small bodies
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queued_;       // guarded by mu_
  std::size_t queued_bytes_ = 0;  // guarded by mu_
  bool busy_ = false;             // guarded by mu_: the writer holds an item
  bool stop_ = false;             // guarded by mu_
  int error_ = 0;                 // guarded by mu_
  std::thread writer_;
};

// --- options ------------------------------------------------------------------

// Builds Options from flags; on failure prints why and returns false.
bool BuildOptions(const FetchFlags& flags, gatherer::Options& options) {
  if (!flags.broker.empty()) {
    if (gatherer::Status s = gatherer::cli::CheckBrokerEndpoint(flags.broker); !s.ok()) {
      PrintError("--broker '" + flags.broker + "': " + s.message());
      return false;
    }
  }
  auto curve = gatherer::ReadCurveClientKeys(flags.curve_broker_key, flags.curve_key);
  if (!curve) {
    PrintError(curve.error().message());
    return false;
  }
  if (!curve->broker_public_key.empty() && flags.broker.empty()) {
    PrintError("CURVE needs --broker: the embedded broker runs in this process, unencrypted");
    return false;
  }
  options.curve_broker_key = std::move(curve->broker_public_key);
  options.curve_public_key = std::move(curve->own.public_key);
  options.curve_secret_key = std::move(curve->own.secret_key);
  if (flags.timeout_s > 0 && flags.timeout_s < 0.001) {
    char value[32];
    std::snprintf(value, sizeof value, "%g", flags.timeout_s);
    PrintError(std::string("--timeout ") + value +
               ": below the 1 ms resolution (0 means no timeout; the smallest timeout is 0.001)");
    return false;
  }
  // Given alone, either bound just moves (a base above the cap: every
  // backoff is the cap); both given the wrong way round is a mistake.
  if (flags.backoff_bounds_given && flags.backoff_base_ms > flags.backoff_max_ms) {
    PrintError("--backoff-base-ms (" + std::to_string(flags.backoff_base_ms) + ") must not exceed --backoff-max-ms (" +
               std::to_string(flags.backoff_max_ms) + ")");
    return false;
  }
  auto body_cap = gatherer::cli::ParseByteSize(flags.max_body_bytes);
  if (!body_cap) {
    PrintError("--max-body-bytes " + body_cap.error().message());
    return false;
  }
  if (*body_cap < 1 || *body_cap > gatherer::kMaxResponseBody) {
    PrintError("--max-body-bytes '" + flags.max_body_bytes + "' must be from 1 to " +
               std::to_string(gatherer::kMaxResponseBody) + " (256M)");
    return false;
  }

  auto in_flight = gatherer::cli::ParseByteSize(flags.max_in_flight_bytes);
  if (!in_flight) {
    PrintError("--max-in-flight-bytes " + in_flight.error().message());
    return false;
  }
  options.max_in_flight_bytes = *in_flight;
  auto buffered = gatherer::cli::ParseByteSize(flags.max_buffered_bytes);
  if (!buffered) {
    PrintError("--max-buffered-bytes " + buffered.error().message());
    return false;
  }
  options.max_buffered_bytes = *buffered;
  options.cacert = flags.cacert;
  options.cert = flags.cert;
  options.key = flags.key;

  options.broker = flags.broker;
  options.workers = flags.workers;
  options.cancel_on_raise = flags.cancel_on_raise;
  options.embedded_io_threads = flags.io_threads;
  options.broker_timeout = std::chrono::milliseconds(std::llround(flags.broker_timeout_s * 1000));
  auto level = gatherer::ParseLogLevel(flags.log_level);
  if (!level) {
    PrintError("--log-level: " + level.error().message());
    return false;
  }
  options.log_level = *level;

  gatherer::SessionSettings& settings = options.settings;
  settings.workers = static_cast<std::uint32_t>(flags.workers);
  settings.max_attempts = static_cast<std::uint32_t>(flags.retries) + 1;
  settings.timeout_ms = static_cast<std::uint32_t>(std::llround(flags.timeout_s * 1000));
  settings.max_redirects = static_cast<std::uint32_t>(flags.max_redirects);
  settings.max_body_bytes = *body_cap;
  settings.backoff_base_ms = static_cast<std::uint32_t>(flags.backoff_base_ms);
  settings.backoff_max_ms = static_cast<std::uint32_t>(flags.backoff_max_ms);
  settings.retry_after_max_ms = static_cast<std::uint32_t>(flags.retry_after_max_ms);
  for (const std::string& arg : flags.rate_limits) {
    auto rule = gatherer::ParseRateRule(arg);
    if (!rule) {
      PrintError("--rate-limit '" + arg + "': expected COUNT:SECONDS[,...] or [NAME=][METHOD ]PATH COUNT:SECONDS[,...]");
      return false;
    }
    settings.rate_limits.push_back(std::move(*rule));
  }
  settings.learn_rate_limits = flags.learn_rate_limits;
  settings.tls_insecure = flags.insecure;
  settings.proxy = flags.proxy;
  settings.no_proxy = flags.no_proxy;
  for (const std::string& arg : flags.headers) {
    auto header = gatherer::cli::ParseHeaderArg(arg);
    if (!header) {
      PrintError("--header '" + arg + "': " + header.error().message());
      return false;
    }
    settings.headers.push_back(std::move(*header));
  }
  if (!flags.base_url.empty()) {
    if (auto s = gatherer::ValidateStatement(gatherer::Get(flags.base_url), {}); !s.ok()) {
      PrintError("--base-url: " + s.message());
      return false;
    }
    settings.base_url = flags.base_url;
  }
  return true;
}

bool HasHeader(const gatherer::Headers& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(),
                     [name](const auto& h) { return gatherer::EqualsIgnoreCase(h.first, name); });
}

// Thrown from the statement source when the second pass cannot read what the
// first one validated. It leaves through Stream::next(), and destroying the
// unfinished stream cancels what was already sent.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// --- the run ------------------------------------------------------------------

// stdout and stderr are one terminal: a progress bar would tear the
// responses written there.
bool SameTerminal() {
  struct stat out {}, err {};
  return ::isatty(STDOUT_FILENO) && ::fstat(STDOUT_FILENO, &out) == 0 && ::fstat(STDERR_FILENO, &err) == 0 &&
         out.st_rdev == err.st_rdev;
}

int RunFetch(const FetchFlags& flags, SignalWatcher& watcher) {
  gatherer::Options options;
  if (!BuildOptions(flags, options)) return kExitUsage;

  const bool from_stdin = flags.file.empty() || flags.file == "-";
  const std::string input_name = from_stdin ? "<stdin>" : flags.file;
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> owned(nullptr, &std::fclose);
  std::FILE* in = stdin;
  if (!from_stdin) {
    owned.reset(std::fopen(flags.file.c_str(), "r"));
    if (!owned) {
      PrintError("cannot open '" + flags.file + "': " + std::strerror(errno));
      return kExitUsage;
    }
    in = owned.get();
  }
  // fopen() opens a directory for reading; only the first read fails.
  struct stat st {};
  if (::fstat(::fileno(in), &st) == 0 && S_ISDIR(st.st_mode)) {
    PrintError(input_name + " is a directory; give a file of statements, '-' or nothing for stdin");
    return kExitUsage;
  }
  auto input = gatherer::cli::TwoPassInput::Open(in);
  if (!input) {
    PrintError(input.error().message());
    return kExitFailed;
  }

  // A Content-Type set with --header is the user's for every statement; a
  // JSON body must not replace it with its own.
  gatherer::cli::ParseOptions parse;
  parse.json_content_type = !HasHeader(options.settings.headers, "Content-Type");

  // Pass 1, before a Gatherer exists: a bad line costs no request and no session.
  auto count = gatherer::cli::CountValidStatements((*input)->reader(), options.settings, parse);
  if (!count) {
    PrintError(input_name + ": " + count.error().message());
    return count.error().code() == gatherer::StatusCode::kInvalidArgument ? kExitUsage : kExitFailed;
  }
  const std::uint64_t statements = *count;
  gatherer::cli::RunSummary summary;
  {
    std::string rules;
    for (const auto& r : options.settings.rate_limits) {
      if (!rules.empty()) rules += "; ";
      rules += r.path.empty() ? gatherer::FormatRateWindows(r.windows) + " per host"
                              : r.name + " " + gatherer::FormatRateWindows(r.windows);
    }
    if (rules.empty() && options.settings.learn_rate_limits) rules = "learned";
    summary.SetRateLimits(std::move(rules));
  }
  if (statements == 0) {
    if (!flags.quiet) PrintError(summary.Format(0, std::chrono::nanoseconds(0)));
    return kExitOk;
  }
  if (gatherer::Status s = (*input)->rewind(); !s.ok()) {
    PrintError(input_name + ": " + s.message());
    return kExitFailed;
  }

  // The stream's buffers (reorder ring, held statements, prefetch) scale with
  // the window: a window wider than the job only costs memory.
  const int window = static_cast<int>(std::min<std::uint64_t>(static_cast<std::uint64_t>(flags.workers), statements));
  options.workers = window;
  options.settings.workers = static_cast<std::uint32_t>(window);

  // Pass 2. Lines appended to a file since pass 1 were never validated, so
  // the source stops at the count; fewer lines means the input changed.
  std::uint64_t fed = 0;
  gatherer::cli::LineReader& reader = (*input)->reader();
  auto source = [&](gatherer::Statement& out) {
    if (fed == statements) return false;
    auto got = gatherer::cli::ReadStatement(reader, out, parse);
    if (!got) throw InputError(input_name + " changed after validation: " + got.error().message());
    if (!*got) throw InputError(input_name + " changed after validation: " + std::to_string(statements) +
                                " statements validated, " + std::to_string(fed) + " read back");
    ++fed;
    return true;
  };

  Output out(STDOUT_FILENO);
  std::optional<std::string> stopped;  // why the run ended before its last response
  std::optional<gatherer::StatusCode> stop_code;
  bool started = false;
  const auto start = std::chrono::steady_clock::now();
  watcher.set_phase(SignalWatcher::Phase::kFetching);
  // Declared before the stream's scope and destroyed last, after the
  // summary: closing the session may wait for the broker.
  std::optional<gatherer::Gatherer> gatherer;
  // Drawn while the stream runs; erased before anything else is said.
  const bool show_progress = !flags.quiet && (flags.progress || (::isatty(STDERR_FILENO) && !SameTerminal()));
  std::optional<gatherer::cli::ProgressBar> bar;
  try {
    gatherer.emplace(std::move(options));
    gatherer::Stream stream = gatherer->stream(source, gatherer::Order::kInput);
    started = true;
    stream.on_wait([&out] { out.send(); });
    watcher.attach(&*gatherer);
    if (show_progress) bar.emplace(*gatherer, statements);
    while (std::optional<gatherer::Indexed> item = stream.next()) {
      summary.Add(item->response);
      // A failed write (also one from on_wait) ends the run: destroying the
      // stream cancels the rest.
      if (!out.add(item->index, std::move(item->response))) break;
    }
  } catch (const gatherer::Error& e) {
    stopped = e.what();
    stop_code = e.code();
  } catch (const std::exception& e) {
    stopped = e.what();
  }
  if (bar) bar->stop();
  watcher.detach();
  const auto wall = std::chrono::steady_clock::now() - start;

  int exit_code = kExitOk;
  if (!started) {
    // The Gatherer or its stream refused to start: nothing was fetched.
    PrintError(stopped.value_or("the run did not start"));
    exit_code = stop_code == gatherer::StatusCode::kInvalidArgument ? kExitUsage : kExitFailed;
  } else {
    out.flush();
    if (out.error() == EPIPE) {
      watcher.set_phase(SignalWatcher::Phase::kClosing);
      return kExitBrokenPipe;
    }
    const int signal = watcher.received();
    const std::uint64_t written = summary.written();
    const std::string counts = "; " + std::to_string(written) + (written == 1 ? " response" : " responses") +
                               " written, " + std::to_string(statements - written) + " statements not answered";
    if (out.error() != 0) {
      PrintError(std::string("writing stdout: ") + std::strerror(out.error()) + counts);
      exit_code = kExitFailed;
    } else if (stopped && signal != 0 && stop_code == gatherer::StatusCode::kCancelled) {
      PrintError(std::string("interrupted by ") + SignalName(signal) + counts);
    } else if (stopped) {
      PrintError("stopped: " + *stopped + counts);
      exit_code = kExitFailed;
    } else if (summary.failed() > 0) {
      exit_code = kExitFailed;
    }
    if (!flags.quiet) PrintError(summary.Format(statements, wall));
    if (signal != 0) exit_code = 128 + signal;
  }
  watcher.set_phase(SignalWatcher::Phase::kClosing);
  gatherer.reset();
  return exit_code;
}

constexpr char kFetchFooter[] = R"(Input: one statement per line, a bare URL or a JSON object
  {"url": ..., "method": "GET", "headers": {"Name": "value"} or [["Name", "value"], ...],
   "body": "text" or a JSON object or array, "timeout_ms": N, "idempotent": true|false}.
  A body given as a JSON object or array is sent as its JSON text with
  Content-Type: application/json (unless the line or a --header sets Content-Type).
  Blank lines (empty or only whitespace) are skipped: "index" counts statements,
  not lines.
Output: one JSON object per statement, in input order, written as soon as it is next:
  {"index", "status", "headers", "body" | "body_base64", "error": null | {"kind", "message"},
   "attempts", "elapsed_ms", "worker"}. A header received more than once has the list of
  its values ("Set-Cookie": ["a=1", "b=2"]), any other its value as a string.
Stderr: one summary line at the end (statements, ok, failed by kind, retried, time, req/s)
  unless --quiet; a run that stops early also says how many responses were written.
Exit status: 0 all statements succeeded, 1 some failed or the run stopped early,
  2 usage error or invalid input (nothing fetched), 130 SIGINT, 143 SIGTERM
  (responses already complete are written first; a second signal exits at once).)";

}  // namespace

int main(int argc, char** argv) {
  gatherer::TuneAllocatorForBodies();
  // Before any thread exists (the library's, spdlog's): every thread inherits
  // the mask, so SIGINT and SIGTERM reach only the watcher's signalfd.
  SignalWatcher::BlockSignals();

  // stdout carries the JSON Lines; every log line must go to stderr.
  spdlog::set_default_logger(
      std::make_shared<spdlog::logger>("gatherer-cli", std::make_shared<spdlog::sinks::stderr_color_sink_mt>()));

  CLI::App app{"gatherer: fetch many HTTP requests through a Gatherer cluster"};
  app.set_version_flag("--version", "gatherer " GATHERER_VERSION);
  app.require_subcommand(1);

  FetchFlags flags;
  CLI::App* fetch = app.add_subcommand(
      "fetch", "Read statements (JSON Lines or bare URLs) from FILE or stdin, write responses "
               "as JSON Lines to stdout in input order");
  fetch->footer(kFetchFooter);
  fetch->add_option("FILE", flags.file, "Input file; '-' or none = stdin");
  fetch->add_option("--workers", flags.workers,
                    "Statements in flight across the cluster (capped at the number of statements)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  fetch->add_option("--broker", flags.broker, "Broker endpoint tcp://HOST:PORT or ipc://PATH; none = embedded")
      ->envname("GATHERER_BROKER");
  fetch->add_option("--curve-broker-key", flags.curve_broker_key,
                    "CURVE: the broker's public key (40 Z85 characters or a .pub file); needs --curve-key")
      ->envname("GATHERER_CURVE_BROKER_KEY");
  fetch->add_option("--curve-key", flags.curve_key, "CURVE: this client's key pair file (gatherer keygen)")
      ->envname("GATHERER_CURVE_KEY");
  fetch->add_flag("--cancel-on-raise", flags.cancel_on_raise,
                  "Stop at the first failed statement and exit 1 naming it (earlier responses are written)");
  // allow_extra_args(false): one value per --header, so a following FILE is
  // not swallowed as another header.
  fetch->add_option("--header", flags.headers, "Default header 'Name: value' (repeatable)")
      ->allow_extra_args(false);
  fetch->add_option("--base-url", flags.base_url, "Prefix for statements whose url is a path");
  fetch->add_option("--timeout", flags.timeout_s, "Per-attempt timeout in seconds, at least 0.001 (0 = none)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 4294967.0));
  fetch->add_option("--retries", flags.retries, "Retries per statement (attempts = retries + 1)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1000));
  fetch->add_option("--max-redirects", flags.max_redirects, "Redirects followed per attempt, 0..100 (0 = none)")
      ->capture_default_str()
      ->check(CLI::Range(0LL, kMaxRedirects));
  fetch->add_option("--max-in-flight-bytes", flags.max_in_flight_bytes,
                    "Statement bodies sent and not yet answered, at most (K, M, G = powers of 1024; 0 = no "
                    "limit); bounds what big POST bodies cost on every hop")
      ->capture_default_str();
  fetch->add_option("--max-buffered-bytes", flags.max_buffered_bytes,
                    "Response bodies held while waiting for an earlier statement or the output, plus those "
                    "expected of the statements in flight, at most (K, M, G = powers of 1024; 0 = no limit): "
                    "past it no new statement is sent until the output catches up")
      ->capture_default_str();
  fetch->add_option("--max-body-bytes", flags.max_body_bytes,
                    "Largest response body, 1 .. 256M (K, M, G = powers of 1024); a bigger one fails "
                    "with resource_exhausted")
      ->capture_default_str();
  CLI::Option* backoff_base = fetch->add_option("--backoff-base-ms", flags.backoff_base_ms,
                    "Backoff before retry n: random up to base * 2^(n-1) ms, 0..3600000")
      ->capture_default_str()
      ->check(CLI::Range(0LL, kMaxDelayMs));
  CLI::Option* backoff_max = fetch->add_option("--backoff-max-ms", flags.backoff_max_ms,
                                               "Cap of the backoff, ms, 0..3600000 (not below an explicit --backoff-base-ms)")
      ->capture_default_str()
      ->check(CLI::Range(0LL, kMaxDelayMs));
  fetch->add_option("--retry-after-max-ms", flags.retry_after_max_ms,
                    "Longest Retry-After (429/503) waited before a retry, ms, 0..3600000")
      ->capture_default_str()
      ->check(CLI::Range(0LL, kMaxDelayMs));
  fetch->add_option("--rate-limit", flags.rate_limits,
                    "Rate limit held across the cluster (repeatable): 'COUNT:SECONDS,...' per destination host "
                    "(e.g. 20:1,100:120), or '[NAME=][METHOD ]PATH COUNT:SECONDS,...' per endpoint "
                    "(e.g. 'match=GET /matches/{id} 250:10'); learns limits from responses too");
  fetch->add_flag("--learn-rate-limits", flags.learn_rate_limits,
                  "Learn rate limits from responses (Retry-After, X-App-Rate-Limit, RateLimit, ...): a 429 "
                  "pauses its key for the whole cluster and the statement runs again");
  fetch->add_option("--cacert", flags.cacert,
                    "Trusted CA certificates for https, a PEM file or a directory of them, in place of the "
                    "system's (sent to every worker)");
  fetch->add_option("--cert", flags.cert, "Client certificate (PEM) for https servers that ask for one; needs --key");
  fetch->add_option("--key", flags.key, "Private key (PEM) of --cert");
  fetch->add_flag("--insecure", flags.insecure,
                  "Do not verify https servers' certificates or names (testing only; logged as a warning)");
  fetch->add_option("--proxy", flags.proxy,
                    "Proxy for every statement: http://, https://, socks4://, socks4a://, socks5:// or socks5h:// "
                    "HOST:PORT (default: the workers' http_proxy, https_proxy, all_proxy)")
      ->envname("GATHERER_PROXY");
  fetch->add_option("--noproxy", flags.no_proxy,
                    "Hosts reached without the proxy, comma-separated ('*' = all; default: the workers' no_proxy)");
  fetch->add_flag("-q,--quiet", flags.quiet, "No summary line or progress bar on stderr (errors are still printed)");
  fetch->add_flag("--progress", flags.progress,
                  "Progress bar on stderr even when it is not a terminal (default: only on a terminal that stdout "
                  "is not)");
  fetch->add_option("--log-level", flags.log_level,
                    "10..50 or debug, info, warning, error, critical")
      ->capture_default_str();
  fetch->add_option("--broker-timeout", flags.broker_timeout_s,
                    "Seconds without a word from the broker before the run fails; dropped "
                    "connections in between are recovered")
      ->capture_default_str()
      ->check(CLI::Range(1.0, 86400.0));
  fetch->add_option("--io-threads", flags.io_threads,
                    "I/O threads of the embedded worker (0 = one per core)")
      ->capture_default_str();

  std::string keygen_prefix;
  CLI::App* keygen = app.add_subcommand(
      "keygen", "Write a new CURVE key pair: PREFIX.key (the pair, mode 0600: keep it secret) and PREFIX.pub "
                "(the public key, for the peers that must trust it)");
  keygen->add_option("PREFIX", keygen_prefix, "Path and name of the two files, e.g. /etc/gatherer/broker")
      ->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version are "errors" with exit code 0 in CLI11.
    return app.exit(e) == 0 ? kExitOk : kExitUsage;
  }
  if (keygen->parsed()) {
    auto pair = gatherer::GenerateCurveKeyPair();
    gatherer::Status written = pair ? gatherer::WriteCurveKeyFiles(keygen_prefix, *pair) : pair.error();
    if (!written.ok()) {
      PrintError(written.message());
      return kExitFailed;
    }
    std::printf("%s\n", pair->public_key.c_str());
    return kExitOk;
  }
  flags.backoff_bounds_given = backoff_base->count() > 0 && backoff_max->count() > 0;
  try {
    SignalWatcher watcher;
    return RunFetch(flags, watcher);
  } catch (const std::exception& e) {
    PrintError(e.what());
    return kExitFailed;
  }
}
