// The I/O loop of one fetcher thread: epoll over the sockets of every
// session's CURLM, libcurl's socket and timer callbacks, the commands of the
// Fetcher (submit, close, reject), and each transfer's life: its attempts,
// backoff and retries, the destination checks made while libcurl connects
// and sends, and the batched delivery of results. Building a request is
// request.cc's; reading a response and judging an attempt (done, failed, or
// tried again) transfer.cc's, by the rules of retry_policy.h.
//
// Somewhat over 600 lines: it is one class (IoThread::Loop) whose parts all
// share the loop's state (sessions, backoff heap, easy-handle pool, epoll
// set); splitting it further would only pass that state around.
#include "io_thread.h"

#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <ctime>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include <tbb/concurrent_queue.h>

#include "gatherer/rate_limit.h"
#include "gatherer/strings.h"
#include "gatherer/thread_name.h"
#include "gatherer/wake_fd.h"
#include "retry_policy.h"
#include "transfer.h"

namespace gatherer::worker {
namespace {

// Easy handles kept for reuse per I/O thread; more are freed on release so a
// burst does not pin its peak memory forever.
constexpr std::size_t kMaxFreeEasyHandles = 1024;
constexpr int kMaxEpollEvents = 256;

}  // namespace

// One socket libcurl watches through a session's multi: what an epoll event
// points to. Freed only at the end of a loop iteration (graveyard), because
// the epoll event array of that iteration may still hold it.
//
// A connection's socket (opened by OpenSocketCallback, so `owned`) keeps its
// entry and its epoll registration from when libcurl stops watching it
// (CURL_POLL_REMOVE, at the end of each transfer) until CloseSocketCallback,
// which libcurl calls for every connection that got connected. A kept-alive
// connection taken up by the next transfer then costs no epoll_ctl at all,
// where removing and adding it cost two per request. An event on a socket
// libcurl does not watch (an idle connection the server closed) takes it
// out of the set then. A socket that never connected may be closed without
// the callback, so one that has not been watched for reading (`connected`)
// is taken out at once, as every other socket libcurl reports is.
struct SocketEntry {
  ThreadSession* session = nullptr;
  curl_socket_t fd = CURL_SOCKET_BAD;
  bool dead = false;
  bool owned = false;        // a connection's socket, in Loop::connections_
  bool connected = false;    // libcurl has watched it for reading
  bool watched = false;      // libcurl watches it now
  std::uint32_t events = 0;  // registered in the epoll set; 0 = not in it
};

// A session inside one I/O thread: its multi handle (connection cache), its
// transfers and the results of the current loop iteration. Owned and touched
// only by its I/O thread.
struct ThreadSession {
  std::shared_ptr<SharedSession> shared;
  IoThread::Loop* thread = nullptr;
  CURLM* multi = nullptr;
  std::optional<Clock::time_point> deadline;  // libcurl's timer for this multi
  std::unordered_map<Transfer*, std::unique_ptr<Transfer>> transfers;
  std::unordered_set<SocketEntry*> sockets;
  std::vector<FetchResult> results;
  bool touched = false;
  // Handles whose last statement was a plain GET (IsPlainGet), left with
  // the session's options: the next plain GET sets only its own
  // (ConfigureStatement), sparing curl_easy_reset and the session's options
  // at every request.
  std::vector<CURL*> configured;
};

// One I/O loop: an epoll set over the sockets of all its multis, an eventfd
// for wake-ups, a command queue. push() and stop() may be called from any
// thread; everything else runs on the loop's thread only: its own, or, when
// `driven`, whichever thread its owner drives it from (one at a time).
class IoThread::Loop {
 public:
  Loop(Context context, bool driven) : context_(context), driven_(driven), rng_(std::random_device{}()) {
    policy_.destinations = &context_.options->destinations;
    policy_.interface = context_.interface;
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd_ < 0) throw std::system_error(errno, std::generic_category(), "epoll_create1");
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.ptr = nullptr;  // the eventfd is the only registration without an entry
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, wake_.fd(), &ev) < 0) {
      const int err = errno;
      close(epoll_fd_);
      throw std::system_error(err, std::generic_category(), "epoll_ctl");
    }
  }

  ~Loop() {
    stop();
    if (thread_.joinable()) thread_.join();
    if (driven_) shutdown();  // a thread of its own does it on its way out
    close(epoll_fd_);
  }

  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  void start() {
    if (!driven_) thread_ = std::thread([this] { run(); });
  }

  // A driven loop from now on runs on a thread of its own, its sessions and
  // connections kept. Called by whoever drives it, never again after.
  void undrive() {
    if (!driven_) return;
    driven_ = false;
    thread_ = std::thread([this] { run(); });
  }

  // A driven loop's one pass: what is ready now, without waiting.
  void drive() {
    if (!stop_.load(std::memory_order_acquire)) iterate(0);
  }
  int fd() const { return epoll_fd_; }
  bool driven() const { return driven_; }
  // When libcurl's timers or a backoff want the loop to run, if ever.
  std::optional<Clock::time_point> due() const {
    std::optional<Clock::time_point> earliest;
    for (const auto& [id, session] : sessions_) {
      if (session->deadline && (!earliest || *session->deadline < *earliest)) earliest = session->deadline;
    }
    if (!backoff_.empty() && (!earliest || backoff_.front().due < *earliest)) earliest = backoff_.front().due;
    return earliest;
  }

  void push(Command&& command) {
    queue_.push(std::move(command));
    wake();
  }

  void stop() {
    stop_.store(true, std::memory_order_release);
    wake();
  }

  void join() {
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Backoff {
    Clock::time_point due;
    Transfer* transfer;
  };
  // Orders the backoff vector as a min-heap on `due`.
  static bool LaterDue(const Backoff& a, const Backoff& b) { return a.due > b.due; }

  void wake() { wake_.signal(); }

  void run() {
    NameThisThread("gatherer-io");
    while (!stop_.load(std::memory_order_acquire)) iterate(next_timeout_ms());
    shutdown();
  }

  void iterate(int timeout_ms) {
    const int n = epoll_wait(epoll_fd_, events_.data(), kMaxEpollEvents, timeout_ms);
    const int ready = n < 0 ? 0 : n;  // EINTR: just go round
    // Reset the eventfd before draining the queue: a push after the drain
    // then leaves the eventfd readable and no wake-up is lost.
    for (int i = 0; i < ready; ++i) {
      if (events_[i].data.ptr == nullptr) wake_.drain();
    }
    drain_commands();
    for (int i = 0; i < ready; ++i) {
      auto* entry = static_cast<SocketEntry*>(events_[i].data.ptr);
      if (entry == nullptr || entry->dead) continue;
      if (!entry->watched) {
        unregister(entry);  // an idle connection: libcurl sees to it when it takes it up
        continue;
      }
      const std::uint32_t ev = events_[i].events;
      int mask = 0;
      if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) mask |= CURL_CSELECT_IN;
      if (ev & (EPOLLOUT | EPOLLERR)) mask |= CURL_CSELECT_OUT;
      if (ev & EPOLLERR) mask |= CURL_CSELECT_ERR;
      ThreadSession* session = entry->session;
      int running = 0;
      curl_multi_socket_action(session->multi, entry->fd, mask, &running);
      touch(session);
    }
    run_timers();
    read_completions();
    deliver();
    free_graveyard();
  }

  int next_timeout_ms() const {
    const std::optional<Clock::time_point> earliest = due();
    if (!earliest) return -1;
    const auto now = Clock::now();
    if (*earliest <= now) return 0;
    // Rounded up: waking before the deadline would only spin.
    const auto ms = std::chrono::ceil<std::chrono::milliseconds>(*earliest - now).count();
    return static_cast<int>(std::min<std::int64_t>(ms, INT_MAX));
  }

  void touch(ThreadSession* session) {
    if (session->touched) return;
    session->touched = true;
    touched_.push_back(session);
  }

  // ---- commands ----------------------------------------------------------

  void drain_commands() {
    Command command;
    while (queue_.try_pop(command)) {
      switch (command.kind) {
        case Command::Kind::kSubmit:
          submit(command.session, std::move(command.items));
          break;
        case Command::Kind::kClose: {
          auto it = sessions_.find(command.session->id);
          if (it != sessions_.end() && it->second->shared == command.session) destroy_session(it);
          break;
        }
        case Command::Kind::kReject:
          reject(command.id, std::move(command.items), StatusCode::kFailedPrecondition, "session not open");
          break;
        case Command::Kind::kResize: {
          // Connections past a lower cap are not cut: they close as the
          // server or the idle cache lets them go, and no new one opens.
          auto it = sessions_.find(command.session->id);
          if (it != sessions_.end() && it->second->shared == command.session) {
            curl_multi_setopt(it->second->multi, CURLMOPT_MAX_HOST_CONNECTIONS, command.session->host_connections.load());
          }
          break;
        }
      }
      command = Command();  // drop the session reference now, not at the next pop
    }
  }

  void reject(const SessionId& id, std::vector<FetchItem>&& items, StatusCode code, std::string_view message) {
    std::vector<FetchResult> results;
    results.reserve(items.size());
    for (auto& item : items) {
      FetchResult& result = results.emplace_back();
      result.index = item.index;
      result.response.error = ResponseError{code, std::string(message)};
      result.response.worker = context_.options->worker_id;
    }
    rejected_.emplace_back(id, std::move(results));
  }

  ThreadSession* session_for(const std::shared_ptr<SharedSession>& shared) {
    auto it = sessions_.find(shared->id);
    if (it != sessions_.end()) return it->second.get();
    CURLM* multi = curl_multi_init();
    if (multi == nullptr) return nullptr;
    auto session = std::make_unique<ThreadSession>();
    session->shared = shared;
    session->thread = this;
    session->multi = multi;
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, &Loop::SocketCallback);
    curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, session.get());
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, &Loop::TimerCallback);
    curl_multi_setopt(multi, CURLMOPT_TIMERDATA, session.get());
    curl_multi_setopt(multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, context_.options->max_idle_connections);
    // The session's share of its window (SharedSession::host_connections):
    // a transfer past it waits for a connection of this thread to come free
    // rather than opening one more.
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, shared->host_connections.load());
    ThreadSession* raw = session.get();
    sessions_.emplace(shared->id, std::move(session));
    return raw;
  }

  void submit(const std::shared_ptr<SharedSession>& shared, std::vector<FetchItem>&& items) {
    ThreadSession* session = session_for(shared);
    if (session == nullptr) {
      reject(shared->id, std::move(items), StatusCode::kInternal, "curl_multi_init failed");
      return;
    }
    for (auto& item : items) {
      auto owned = std::make_unique<Transfer>();
      Transfer* transfer = owned.get();
      transfer->session = session;
      transfer->index = item.index;
      transfer->statement = std::move(item.statement);
      transfer->response.rate_wait_us = item.rate_wait_us;
      transfer->response.throttled = item.throttled;
      transfer->prior_attempts = item.attempts;
      transfer->idempotent = IsIdempotent(transfer->statement);
      transfer->started = Clock::now();
      session->transfers.emplace(transfer, std::move(owned));
      if (auto error = configure(transfer)) {
        finish(transfer, std::move(error));
        continue;
      }
      start_attempt(transfer);
    }
  }

  // Tears down a session in this thread without results: its transfers
  // (in flight and backing off), its multi and with it its connections.
  void destroy_session(std::unordered_map<SessionId, std::unique_ptr<ThreadSession>>::iterator it) {
    ThreadSession* session = it->second.get();
    const std::size_t dropped = session->transfers.size() + session->results.size();
    // Backoff entries first: they point at transfers freed below.
    if (std::erase_if(backoff_, [session](const Backoff& b) { return b.transfer->session == session; }) > 0) {
      std::make_heap(backoff_.begin(), backoff_.end(), &Loop::LaterDue);
    }
    for (auto& [raw, transfer] : session->transfers) {
      if (transfer->in_multi) curl_multi_remove_handle(session->multi, transfer->easy);
      transfer->in_multi = false;
      release_handles(transfer.get());
    }
    session->transfers.clear();
    for (CURL* easy : session->configured) release_easy(easy);
    session->configured.clear();
    // Closes the session's connections; libcurl reports their sockets removed.
    curl_multi_cleanup(session->multi);
    session->multi = nullptr;
    for (SocketEntry* entry : session->sockets) bury(entry);
    session->sockets.clear();
    std::erase(with_results_, session);
    std::erase(touched_, session);
    context_.in_flight->fetch_sub(dropped, std::memory_order_acq_rel);
    sessions_.erase(it);
  }

  // ---- transfers -----------------------------------------------------------

  CURL* acquire_easy() {
    if (!free_easies_.empty()) {
      CURL* easy = free_easies_.back();
      free_easies_.pop_back();
      return easy;
    }
    return curl_easy_init();
  }

  void release_easy(CURL* easy) {
    // curl_easy_reset keeps the share attached; detach it so the share can be
    // cleaned up when its session closes.
    curl_easy_setopt(easy, CURLOPT_SHARE, nullptr);
    curl_easy_reset(easy);
    if (free_easies_.size() < kMaxFreeEasyHandles) {
      free_easies_.push_back(easy);
    } else {
      curl_easy_cleanup(easy);
    }
  }

  void release_handles(Transfer* transfer) {
    if (transfer->easy != nullptr) {
      std::vector<CURL*>& configured = transfer->session->configured;
      if (transfer->plain_get && configured.size() < kMaxFreeEasyHandles) {
        configured.push_back(transfer->easy);
      } else {
        release_easy(transfer->easy);
      }
    }
    transfer->easy = nullptr;
    if (transfer->header_list != nullptr) curl_slist_free_all(transfer->header_list);
    transfer->header_list = nullptr;
  }

  // Sets every option of the transfer once (request.h); retries reuse them.
  // Returns the error that ends the statement without an attempt, if any.
  std::optional<ResponseError> configure(Transfer* transfer) {
    const SharedSession& shared = *transfer->session->shared;
    RequestPlan plan;
    if (auto error = PlanRequest(transfer->statement, shared.settings, shared.headers, context_.options->destinations,
                                 scratch_, transfer->header_list, plan)) {
      return error;
    }
    ThreadSession& session = *transfer->session;
    transfer->plain_get = IsPlainGet(transfer->statement, transfer->idempotent);
    const bool reuse = transfer->plain_get && !session.configured.empty();
    if (reuse) {
      transfer->easy = session.configured.back();
      session.configured.pop_back();
    } else {
      transfer->easy = acquire_easy();
    }
    if (transfer->easy == nullptr) return ResponseError{StatusCode::kInternal, "curl_easy_init failed"};
    RequestHooks hooks;
    hooks.data = transfer;
    hooks.thread = this;
    hooks.error_buffer = transfer->error_buffer;
    hooks.write = &Loop::WriteCallback;
    hooks.header = &HeaderCallback;
    hooks.prereq = &Loop::PrereqCallback;
    hooks.open_socket = &Loop::OpenSocketCallback;
    hooks.close_socket = &Loop::CloseSocketCallback;
    auto error = reuse ? ConfigureStatement(transfer->easy, transfer->statement, shared.settings, plan,
                                            transfer->idempotent, policy_, hooks)
                       : ConfigureRequest(transfer->easy, transfer->statement, shared.settings, plan,
                                          transfer->idempotent, shared.share, policy_, hooks);
    if (error) transfer->plain_get = false;  // half configured: reset before another use
    return error;
  }

  void start_attempt(Transfer* transfer) {
    ++transfer->attempts;
    transfer->response.status = 0;
    transfer->response.headers.clear();
    transfer->response.body.clear();
    transfer->reason.clear();
    transfer->header_bytes = 0;
    transfer->encoded = false;
    transfer->requests_sent = 0;
    transfer->redirects_at_send = 0;
    transfer->resend_refused = false;
    transfer->overflow = Transfer::Overflow::kNone;
    transfer->error_buffer[0] = '\0';
    const CURLMcode rc = curl_multi_add_handle(transfer->session->multi, transfer->easy);
    if (rc != CURLM_OK) {
      finish(transfer, ResponseError{StatusCode::kInternal,
                                     std::string("curl_multi_add_handle: ") + curl_multi_strerror(rc)});
      return;
    }
    transfer->in_multi = true;
  }

  void run_timers() {
    const auto now = Clock::now();
    for (auto& [id, session] : sessions_) {
      if (!session->deadline || *session->deadline > now) continue;
      session->deadline.reset();
      int running = 0;
      curl_multi_socket_action(session->multi, CURL_SOCKET_TIMEOUT, 0, &running);
      touch(session.get());
    }
    while (!backoff_.empty() && backoff_.front().due <= now) {
      std::pop_heap(backoff_.begin(), backoff_.end(), &Loop::LaterDue);
      Transfer* transfer = backoff_.back().transfer;
      backoff_.pop_back();
      start_attempt(transfer);
    }
  }

  void read_completions() {
    for (ThreadSession* session : touched_) {
      session->touched = false;
      int queued = 0;
      while (CURLMsg* message = curl_multi_info_read(session->multi, &queued)) {
        if (message->msg != CURLMSG_DONE) continue;
        // The message does not survive curl_multi_remove_handle.
        CURL* easy = message->easy_handle;
        const CURLcode code = message->data.result;
        char* priv = nullptr;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        auto* transfer = reinterpret_cast<Transfer*>(priv);
        curl_multi_remove_handle(session->multi, easy);
        transfer->in_multi = false;
        attempt_done(transfer, code);
      }
    }
    touched_.clear();
  }

  void attempt_done(Transfer* transfer, CURLcode code) {
    AttemptOutcome outcome =
        JudgeAttempt(transfer, code, transfer->session->shared->settings, context_.options->metrics);
    if (outcome.retry) {
      retry_later(transfer, *outcome.retry, std::move(*outcome.error));
    } else {
      finish(transfer, std::move(outcome.error));
    }
  }

  // Waits before the next attempt (BackoffDelayMs), then tries again.
  //
  // A rate-aware session's statement is not tried again here: every request
  // it makes must be granted by the broker against its keys (§3.8.6). The
  // failure goes back with the wait, and the broker queues it again.
  void retry_later(Transfer* transfer, const RetryWait& wait, ResponseError error) {
    const SessionSettings& settings = transfer->session->shared->settings;
    const std::uint64_t delay_ms =
        BackoffDelayMs(wait, transfer->prior_attempts + transfer->attempts, settings, rng_);
    if (settings.rate_aware()) {
      if (!transfer->rate) transfer->rate.emplace();
      transfer->rate->retry = true;
      transfer->rate->retry_after_ms =
          static_cast<std::uint32_t>(std::min<std::uint64_t>(delay_ms, std::numeric_limits<std::uint32_t>::max()));
      error.message += "; handed back to the broker to run again";
      finish(transfer, std::move(error));
      return;
    }
    backoff_.push_back({Clock::now() + std::chrono::milliseconds(delay_ms), transfer});
    std::push_heap(backoff_.begin(), backoff_.end(), &Loop::LaterDue);
  }

  // Ends the statement: its result joins this iteration's batch for the session.
  void finish(Transfer* transfer, std::optional<ResponseError> error) {
    ThreadSession* session = transfer->session;
    FetchResult& result = session->results.emplace_back();
    result.index = transfer->index;
    result.response = std::move(transfer->response);
    result.response.error = std::move(error);
    result.response.attempts = transfer->prior_attempts + transfer->attempts;
    result.response.elapsed_us = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - transfer->started).count());
    result.response.worker = context_.options->worker_id;
    result.rate = std::move(transfer->rate);
    if (FetchMetrics* metrics = context_.options->metrics) {
      metrics->note_finished(result.response.elapsed_us, result.response.body.size(), result.response.error.has_value());
    }
    if (session->results.size() == 1) with_results_.push_back(session);
    release_handles(transfer);
    session->transfers.erase(transfer);
  }

  void deliver() {
    const Fetcher::ResultSink& sink = *context_.sink;
    for (auto& [id, results] : rejected_) {
      context_.in_flight->fetch_sub(results.size(), std::memory_order_acq_rel);
      sink(id, std::move(results));
    }
    rejected_.clear();
    for (ThreadSession* session : with_results_) {
      std::vector<FetchResult> results = std::move(session->results);
      session->results = {};
      context_.in_flight->fetch_sub(results.size(), std::memory_order_acq_rel);
      sink(session->shared->id, std::move(results));
    }
    with_results_.clear();
  }

  // ---- sockets -------------------------------------------------------------

  void bury(SocketEntry* entry) {
    // The fd may already be closed (then epoll dropped it itself).
    unregister(entry);
    if (entry->owned) forget_connection(entry);
    entry->dead = true;
    graveyard_.push_back(entry);
  }

  void unregister(SocketEntry* entry) {
    if (entry->events == 0) return;
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, entry->fd, nullptr);
    entry->events = 0;
  }

  void free_graveyard() {
    for (SocketEntry* entry : graveyard_) delete entry;
    graveyard_.clear();
  }

  void watch(SocketEntry* entry, int what) {
    epoll_event ev{};
    ev.data.ptr = entry;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) ev.events |= EPOLLIN;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) ev.events |= EPOLLOUT;
    entry->watched = true;
    if (ev.events & EPOLLIN) entry->connected = true;
    if (ev.events == entry->events) return;  // a kept connection taken up again
    // A registration can outlive a socket libcurl closed without telling us
    // (its fd number then comes back), or be gone when we think it is there.
    if (entry->events == 0) {
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, entry->fd, &ev) < 0 && errno == EEXIST) {
        epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, entry->fd, &ev);
      }
    } else if (epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, entry->fd, &ev) < 0 && errno == ENOENT) {
      epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, entry->fd, &ev);
    }
    entry->events = ev.events;
  }

  static int SocketCallback(CURL*, curl_socket_t fd, int what, void* user, void* socket_data) {
    auto* session = static_cast<ThreadSession*>(user);
    Loop* self = session->thread;
    auto* entry = static_cast<SocketEntry*>(socket_data);
    if (what == CURL_POLL_REMOVE) {
      if (entry == nullptr) return 0;
      if (entry->owned && entry->connected) {
        entry->watched = false;  // kept registered: see SocketEntry
      } else {
        session->sockets.erase(entry);
        self->bury(entry);
      }
      return 0;
    }
    if (entry == nullptr) {
      // A connection's socket is known from its opening (and comes back
      // after each REMOVE); any other is new here.
      const auto known = self->connections_.find(fd);
      if (known != self->connections_.end() && known->second->session == session) {
        entry = known->second;
      } else {
        entry = new SocketEntry{session, fd};
        session->sockets.insert(entry);
      }
      curl_multi_assign(session->multi, fd, entry);
    }
    self->watch(entry, what);
    return 0;
  }

  void forget_connection(SocketEntry* entry) {
    const auto it = connections_.find(entry->fd);
    if (it != connections_.end() && it->second == entry) connections_.erase(it);
  }

  // A socket libcurl opened for a connection of `session`. Its fd number
  // being free again proves that an older socket under it was closed, and so
  // dropped from the epoll set: one that never connected, which libcurl 7.88
  // closes without CloseSocketCallback. libcurl may still hold that entry
  // (curl_multi_assign), so it is not freed: within the same session it
  // serves the new socket, registered afresh at its first watch().
  void opened(ThreadSession* session, curl_socket_t fd) {
    auto [it, fresh] = connections_.try_emplace(fd, nullptr);
    if (!fresh) {
      SocketEntry* stale = it->second;
      stale->events = 0;
      stale->connected = false;
      stale->watched = false;
      if (stale->session == session) return;
      stale->owned = false;  // left to its own session's REMOVE or end
    }
    auto* entry = new SocketEntry{session, fd};
    entry->owned = true;
    session->sockets.insert(entry);
    it->second = entry;
  }

  static int CloseSocketCallback(void* user, curl_socket_t fd) {
    auto* self = static_cast<Loop*>(user);
    const auto it = self->connections_.find(fd);
    if (it != self->connections_.end()) {
      SocketEntry* entry = it->second;
      entry->events = 0;  // closing the fd takes it out of the epoll set
      entry->session->sockets.erase(entry);
      self->bury(entry);
    }
    return ::close(fd);
  }

  static int TimerCallback(CURLM*, long timeout_ms, void* user) {
    auto* session = static_cast<ThreadSession*>(user);
    if (timeout_ms < 0) {
      session->deadline.reset();
    } else {
      session->deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    }
    return 0;
  }

  static size_t WriteCallback(char* data, size_t size, size_t count, void* user) {
    auto* transfer = static_cast<Transfer*>(user);
    const std::size_t bytes = size * count;
    std::string& body = transfer->response.body;
    const std::uint64_t cap = transfer->session->shared->settings.max_body_bytes;
    if (body.size() + bytes > cap) {
      transfer->overflow = Transfer::Overflow::kBody;
      return CURL_WRITEFUNC_ERROR;
    }
    if (body.empty()) {
      // One allocation for the common case of a known length.
      curl_off_t length = -1;
      if (curl_easy_getinfo(transfer->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length) == CURLE_OK &&
          length > 0 && static_cast<std::uint64_t>(length) <= cap) {
        body.reserve(static_cast<std::size_t>(length));
      }
    }
    body.append(data, bytes);
    return bytes;
  }

  static curl_socket_t OpenSocketCallback(void* user, curlsocktype, curl_sockaddr* address) {
    auto* transfer = static_cast<Transfer*>(user);
    Loop* self = transfer->session->thread;
    std::string why = RefusedAddress(&address->addr, self->context_.options->destinations);
    if (!why.empty()) {
      transfer->refused = std::move(why) + " (this worker refuses such destinations)";
      return CURL_SOCKET_BAD;
    }
    const curl_socket_t fd = ::socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
    if (fd != CURL_SOCKET_BAD) self->opened(transfer->session, fd);
    return fd;
  }

  // Set for non-idempotent statements only. libcurl calls it right before it
  // sends a request on a connection, new or reused, after any TLS handshake;
  // so an attempt that failed before it ran sent nothing. It also catches a
  // re-send of libcurl's own: when a reused keep-alive connection closes
  // before any byte of the response, libcurl sends the request again on a
  // new connection (Curl_retry_request), a POST included. A second call for
  // the same request (the redirect count unchanged) is that re-send, and is
  // refused: the server may have acted on the first.
  static int PrereqCallback(void* user, char*, char*, int, int) {
    auto* transfer = static_cast<Transfer*>(user);
    const DestinationPolicy& destinations = transfer->session->thread->context_.options->destinations;
    if (!destinations.allowed_hosts.empty()) {
      // Before each request, redirects included.
      char* effective = nullptr;
      curl_easy_getinfo(transfer->easy, CURLINFO_EFFECTIVE_URL, &effective);
      if (std::string why = RefusedHost(effective ? effective : "", destinations); !why.empty()) {
        transfer->refused = std::move(why);
        return CURL_PREREQFUNC_ABORT;
      }
    }
    if (transfer->idempotent) return CURL_PREREQFUNC_OK;
    long redirects = 0;
    curl_easy_getinfo(transfer->easy, CURLINFO_REDIRECT_COUNT, &redirects);
    if (transfer->requests_sent > 0 && redirects == transfer->redirects_at_send) {
      transfer->resend_refused = true;
      return CURL_PREREQFUNC_ABORT;
    }
    ++transfer->requests_sent;
    transfer->redirects_at_send = redirects;
    return CURL_PREREQFUNC_OK;
  }

  // ---- shutdown ------------------------------------------------------------

  void shutdown() {
    while (!sessions_.empty()) destroy_session(sessions_.begin());
    Command command;
    while (queue_.try_pop(command)) {
      context_.in_flight->fetch_sub(command.items.size(), std::memory_order_acq_rel);
    }
    for (auto& [id, results] : rejected_) context_.in_flight->fetch_sub(results.size(), std::memory_order_acq_rel);
    rejected_.clear();
    free_graveyard();
    for (CURL* easy : free_easies_) curl_easy_cleanup(easy);
    free_easies_.clear();
  }

  const Context context_;
  bool driven_;  // changed by undrive() only, before the thread starts
  int epoll_fd_ = -1;
  WakeFd wake_;
  std::atomic<bool> stop_{false};
  // std::allocator, not TBB's cache-aligned one: pages then come from
  // new/delete, which ThreadSanitizer sees, instead of libtbb's
  // uninstrumented pool (whose reuse of a page across threads TSan reports).
  tbb::concurrent_queue<Command, std::allocator<Command>> queue_;
  std::thread thread_;

  // Everything below is touched by the I/O thread only.
  std::unordered_map<SessionId, std::unique_ptr<ThreadSession>> sessions_;
  std::vector<Backoff> backoff_;  // min-heap on due (LaterDue)
  std::vector<CURL*> free_easies_;
  std::vector<ThreadSession*> touched_;       // socket_action called this iteration
  std::vector<ThreadSession*> with_results_;  // results waiting for deliver()
  std::vector<std::pair<SessionId, std::vector<FetchResult>>> rejected_;
  std::vector<SocketEntry*> graveyard_;
  std::array<epoll_event, kMaxEpollEvents> events_;
  // Connections' sockets by fd (SocketEntry): kept while libcurl holds them.
  std::unordered_map<curl_socket_t, SocketEntry*> connections_;
  std::mt19937_64 rng_;
  RequestPolicy policy_;    // from the Fetcher's options
  RequestScratch scratch_;  // reused by configure()
};

IoThread::IoThread(Context context, bool driven) : loop_(std::make_unique<Loop>(context, driven)) {}
IoThread::~IoThread() = default;  // ~Loop stops and joins
void IoThread::start() { loop_->start(); }
void IoThread::push(Command&& command) { loop_->push(std::move(command)); }
void IoThread::stop() { loop_->stop(); }
void IoThread::join() { loop_->join(); }
void IoThread::drive() { loop_->drive(); }
void IoThread::undrive() { loop_->undrive(); }
bool IoThread::driven() const { return loop_->driven(); }
int IoThread::fd() const { return loop_->fd(); }
std::optional<std::chrono::steady_clock::time_point> IoThread::due() const { return loop_->due(); }

}  // namespace gatherer::worker
