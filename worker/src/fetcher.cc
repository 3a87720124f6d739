// The public Fetcher: the table of open sessions and the I/O threads it
// hands commands to. Requests are built in request.cc, responses read and
// judged in transfer.cc, and the loop itself runs in io_thread.cc.
#include "fetcher.h"

#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "io_thread.h"

// Delivery after close_session: close_session only queues a close command to
// every I/O thread and returns. A thread may be in the middle of delivering a
// batch of that session (or finish one before it reads the command), so
// results of a closed session can still reach the sink for a short time after
// close_session returns. Callers drop results of sessions they no longer know.
// What is guaranteed: once every I/O thread has processed the close command,
// nothing of the session is delivered any more, and in_flight() no longer
// counts it.

namespace gatherer::worker {
namespace {

void GlobalInit() {
  static std::once_flag once;
  // curl_global_init is not thread-safe and must run once before any handle.
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

}  // namespace

// Owns the I/O threads and the table of open sessions. The table is guarded by
// mu_; commands are pushed to the I/O threads while holding it, so every
// thread sees a session's submits before its close.
struct Fetcher::Impl {
  Impl(Options opts, ResultSink result_sink) : options(std::move(opts)), sink(std::move(result_sink)) {
    if (!options.source_address.empty()) {
      if (!IsIpLiteral(options.source_address)) {
        throw std::invalid_argument("source address '" + options.source_address +
                                    "' is not an IPv4 or IPv6 address");
      }
      interface = "host!";  // a local address to bind, never an interface name
      interface += options.source_address;
    }
  }

  long HostConnections(std::size_t window, std::size_t spread) const;
  // The k-th loop serving `shared`.
  IoThread& loop(const SharedSession& shared, std::size_t k) const {
    return *threads[shared.base + (shared.home + k) % shared.range];
  }

  const Options options;
  std::string interface;  // CURLOPT_INTERFACE for options.source_address
  const ResultSink sink;
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::size_t> next_thread{0};
  std::atomic<std::size_t> next_home{0};
  std::vector<std::unique_ptr<IoThread>> threads;
  // Loop 0, while the owner drives it (Options::drive_first, until
  // undrive()); asked where it is driven only.
  bool driven() const { return threads[0]->driven(); }

  mutable std::mutex mu;
  std::unordered_map<SessionId, std::shared_ptr<SharedSession>> sessions;  // guarded by mu
};

Fetcher::Fetcher(Options options, ResultSink sink)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(sink))) {
  GlobalInit();
  unsigned count = impl_->options.io_threads;
  if (count == 0) count = std::max(1u, std::thread::hardware_concurrency());
  if (impl_->options.drive_first) ++count;  // the driven loop, then the threads
  const Context context{&impl_->options, &impl_->sink, &impl_->in_flight,
                        impl_->interface.empty() ? nullptr : impl_->interface.c_str()};
  impl_->threads.reserve(count);
  for (unsigned i = 0; i < count; ++i) {
    impl_->threads.push_back(std::make_unique<IoThread>(context, impl_->options.drive_first && i == 0));
  }
  for (auto& thread : impl_->threads) thread->start();
}

Fetcher::~Fetcher() {
  for (auto& thread : impl_->threads) thread->stop();
  for (auto& thread : impl_->threads) thread->join();
  impl_->threads.clear();
  std::lock_guard lock(impl_->mu);
  impl_->sessions.clear();
}

// What each of a session's `spread` threads may keep open to one host: the
// window (its share of it here, §4.2), rounded down so that the threads'
// caps add up to it at most.
long Fetcher::Impl::HostConnections(std::size_t window, std::size_t spread) const {
  std::size_t cap = std::max<std::size_t>(window, 1);
  if (options.max_host_connections > 0) cap = std::min(cap, static_cast<std::size_t>(options.max_host_connections));
  return static_cast<long>(std::max<std::size_t>(cap / spread, 1));
}

void Fetcher::open_session(const SessionId& session, const SessionSettings& settings) {
  std::lock_guard lock(impl_->mu);
  if (auto it = impl_->sessions.find(session); it != impl_->sessions.end()) {
    // Opened again with another share of the window (PROTOCOL.md §3.5.4):
    // only the threads' connection caps change, on the threads themselves.
    SharedSession& shared = *it->second;
    const long cap = impl_->HostConnections(settings.workers, shared.spread);
    if (shared.host_connections.exchange(cap) == cap) return;
    for (unsigned k = 0; k < shared.spread; ++k) {
      Command command;
      command.kind = Command::Kind::kResize;
      command.session = it->second;
      impl_->loop(shared, k).push(std::move(command));
    }
    return;
  }
  // I/O threads create their part of the session when its first statements arrive.
  auto shared = std::make_shared<SharedSession>(session, settings);
  // With drive_first, loop 0 is the driven one and the threads follow it.
  const std::size_t base = impl_->options.drive_first ? 1 : 0;
  const std::size_t threads = impl_->threads.size() - base;
  const std::size_t window = std::max<std::size_t>(settings.workers, 1);
  const std::size_t spread = std::clamp<std::size_t>((window + kWindowPerThread - 1) / kWindowPerThread, 1, threads);
  shared->spread = static_cast<unsigned>(spread);
  if (base == 1 && window <= kWindowPerThread) {
    // A window one loop serves: on the driven loop, beside its owner.
    shared->base = 0;
    shared->range = 1;
  } else {
    // Sessions take turns as each other's home, so several small ones use
    // every thread.
    shared->base = static_cast<unsigned>(base);
    shared->range = static_cast<unsigned>(threads);
    shared->home = static_cast<unsigned>(impl_->next_home.fetch_add(spread) % threads);
  }
  shared->host_connections = impl_->HostConnections(window, spread);
  impl_->sessions.emplace(session, std::move(shared));
}

void Fetcher::submit(const SessionId& session, std::vector<FetchItem>&& items) {
  if (items.empty()) return;
  const std::size_t total = items.size();
  // Counted before any thread can report them, so in_flight never underflows.
  impl_->in_flight.fetch_add(total, std::memory_order_acq_rel);
  auto& threads = impl_->threads;
  std::lock_guard lock(impl_->mu);
  auto it = impl_->sessions.find(session);
  if (it == impl_->sessions.end()) {
    Command command;
    command.kind = Command::Kind::kReject;
    command.id = session;
    command.items = std::move(items);
    threads[impl_->next_thread.fetch_add(1) % threads.size()]->push(std::move(command));
    return;
  }
  // Contiguous slices over the session's threads, the first rotating
  // between calls so that small submits spread too.
  const SharedSession& shared = *it->second;
  const std::size_t slices = std::min<std::size_t>(total, shared.spread);
  const std::size_t first = impl_->next_thread.fetch_add(slices);
  for (std::size_t k = slices; k-- > 0;) {
    const std::size_t begin = k * total / slices;
    const std::size_t end = (k + 1) * total / slices;
    Command command;
    command.kind = Command::Kind::kSubmit;
    command.session = it->second;
    if (k == 0) {
      command.items = std::move(items);  // what is left is slice 0
    } else {
      command.items.reserve(end - begin);
      std::move(items.begin() + static_cast<std::ptrdiff_t>(begin), items.begin() + static_cast<std::ptrdiff_t>(end),
                std::back_inserter(command.items));
      items.resize(begin);
    }
    impl_->loop(shared, (first + k) % shared.spread).push(std::move(command));
  }
}

void Fetcher::close_session(const SessionId& session) {
  std::lock_guard lock(impl_->mu);
  auto it = impl_->sessions.find(session);
  if (it == impl_->sessions.end()) return;
  for (auto& thread : impl_->threads) {
    Command command;
    command.kind = Command::Kind::kClose;
    command.session = it->second;
    thread->push(std::move(command));
  }
  impl_->sessions.erase(it);
}

std::size_t Fetcher::in_flight() const { return impl_->in_flight.load(std::memory_order_acquire); }

int Fetcher::driven_fd() const { return impl_->driven() ? impl_->threads[0]->fd() : -1; }

std::optional<std::chrono::steady_clock::time_point> Fetcher::driven_due() const {
  if (!impl_->driven()) return std::nullopt;
  return impl_->threads[0]->due();
}

void Fetcher::drive() {
  if (impl_->driven()) impl_->threads[0]->drive();
}

void Fetcher::undrive() { impl_->threads[0]->undrive(); }

std::size_t Fetcher::sessions() const {
  std::lock_guard lock(impl_->mu);
  return impl_->sessions.size();
}

StatusCode StatusCodeFromCurl(int curl_code) {
  switch (static_cast<CURLcode>(curl_code)) {
    case CURLE_OK:
      return StatusCode::kOk;
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
    case CURLE_SSL_CONNECT_ERROR:
      return StatusCode::kUnavailable;
    case CURLE_OPERATION_TIMEDOUT:
      return StatusCode::kDeadlineExceeded;
    case CURLE_URL_MALFORMAT:
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_BAD_FUNCTION_ARGUMENT:
      return StatusCode::kInvalidArgument;
    case CURLE_FILESIZE_EXCEEDED:
    // Our write and header callbacks fail only when a cap is exceeded.
    case CURLE_WRITE_ERROR:
      return StatusCode::kResourceExhausted;
    case CURLE_TOO_MANY_REDIRECTS:
    case CURLE_PEER_FAILED_VERIFICATION:  // also CURLE_SSL_CACERT
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
      return StatusCode::kFailedPrecondition;
    case CURLE_ABORTED_BY_CALLBACK:
      return StatusCode::kCancelled;
    default:
      return StatusCode::kInternal;
  }
}

}  // namespace gatherer::worker
