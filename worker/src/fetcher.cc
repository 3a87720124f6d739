#include "fetcher.h"

#include <curl/curl.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <climits>
#include <iterator>
#include <limits>
#include <cstring>
#include <ctime>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <tbb/concurrent_queue.h>

#include "gatherer/rate_limit.h"
#include "gatherer/strings.h"
#include "gatherer/wake_fd.h"
#include "retry_policy.h"

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

using Clock = std::chrono::steady_clock;

// Response headers beyond this fail the attempt with resource_exhausted:
// libcurl 7.88 caps one header line, not the sum, and peers are untrusted
// (errors are values inside the system).
constexpr std::size_t kMaxResponseHeaderBytes = 1 << 20;
// Easy handles kept for reuse per I/O thread; more are freed on release so a
// burst does not pin its peak memory forever.
constexpr std::size_t kMaxFreeEasyHandles = 1024;
constexpr int kMaxEpollEvents = 256;
#ifndef GATHERER_VERSION
#error "GATHERER_VERSION must be defined (worker/CMakeLists.txt)"
#endif
// Sent with every request unless the session or the statement names a
// User-Agent of its own (then libcurl sends theirs: one custom header wins).
constexpr char kUserAgentLine[] = "User-Agent: gatherer/" GATHERER_VERSION;
// libcurl adds "Content-Type: application/x-www-form-urlencoded" to every
// request whose body goes through CURLOPT_POSTFIELDS; a custom header with
// nothing after the colon removes it. A body is sent with the Content-Type
// its statement or session names, or none: the fetcher does not guess.
constexpr char kNoContentTypeLine[] = "Content-Type:";

void GlobalInit() {
  static std::once_flag once;
  // curl_global_init is not thread-safe and must run once before any handle.
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// Statuses an idempotent statement is tried again after: the request timed
// out at the server, was throttled, or met a failing or overloaded server.
// /metrics: the cause of an HTTP retry (IsRetryableHttpStatus statuses).
RetryCause RetryCauseOf(long status) {
  switch (status) {
    case 408: return RetryCause::k408;
    case 429: return RetryCause::k429;
    case 500: return RetryCause::k500;
    case 502: return RetryCause::k502;
    case 503: return RetryCause::k503;
    default: return RetryCause::k504;
  }
}

// /metrics: the host a transfer's last request went to (only for a 429).
std::string HostOf(CURL* easy) {
  char* url = nullptr;
  curl_easy_getinfo(easy, CURLINFO_EFFECTIVE_URL, &url);
  if (!url) return "unknown";
  std::string_view u(url);
  const auto scheme = u.find("://");
  if (scheme != std::string_view::npos) u.remove_prefix(scheme + 3);
  u = u.substr(0, u.find_first_of("/?#"));
  if (const auto at = u.rfind('@'); at != std::string_view::npos) u.remove_prefix(at + 1);
  return std::string(u);
}

// Said of a non-idempotent statement that may have been acted on.
constexpr std::string_view kOutcomeUnknown =
    "outcome unknown: the request may have reached the server, and a non-idempotent statement is not sent again";

// Retry-After (RFC 9110 §10.2.3): delta-seconds or an HTTP-date; nullopt when
// absent or unparsable. Read only when an attempt is about to be retried.
std::optional<std::uint64_t> RetryAfterMs(const Headers& headers) {
  for (const auto& [name, value] : headers) {
    if (EqualsIgnoreCase(name, "Retry-After")) return ParseRetryAfter(value, std::time(nullptr));
  }
  return std::nullopt;
}

// Appends "name: value" to `list` through `line` (a reused buffer);
// "Name;" is libcurl's spelling of an empty header ("Name:" would delete it).
// False when out of memory (then `list` is unchanged).
bool AppendHeader(curl_slist*& list, std::string& line, std::string_view name, std::string_view value) {
  line.assign(name);
  line += value.empty() ? ";" : ": ";
  line += value;
  curl_slist* next = curl_slist_append(list, line.c_str());
  if (next == nullptr) return false;
  list = next;
  return true;
}

bool NamesHeader(const Headers& headers, std::string_view name) {
  return std::any_of(headers.begin(), headers.end(), [&](const auto& h) { return EqualsIgnoreCase(h.first, name); });
}

// The session's header list as libcurl takes it, built once per session so
// that a statement without headers of its own costs no allocation for them.
// libcurl only reads a list, so every I/O thread may hand the same one to its
// easy handles.
struct SessionHeaders {
  explicit SessionHeaders(const Headers& headers) {
    for (const auto& [name, value] : headers) {
      if (!IsHttpToken(name) || !IsHttpFieldValue(value)) {
        error = ResponseError{StatusCode::kInvalidArgument, "invalid header '" + name + "'"};
        return;
      }
    }
    names_user_agent = NamesHeader(headers, "User-Agent");
    names_content_type = NamesHeader(headers, "Content-Type");
    std::string line;
    bool ok = true;
    for (const auto& [name, value] : headers) ok = ok && AppendHeader(list, line, name, value);
    if (ok && !names_user_agent) {
      curl_slist* next = curl_slist_append(list, kUserAgentLine);
      if (next != nullptr) list = next;
      ok = next != nullptr;
    }
    if (!ok) {
      error = ResponseError{StatusCode::kInternal, "out of memory"};
      return;
    }
    // The removal of libcurl's Content-Type goes in front of the shared list
    // (order does not matter to it), so both lists share their nodes.
    no_content_type.data = const_cast<char*>(kNoContentTypeLine);
    no_content_type.next = list;
  }
  ~SessionHeaders() { curl_slist_free_all(list); }
  SessionHeaders(const SessionHeaders&) = delete;
  SessionHeaders& operator=(const SessionHeaders&) = delete;

  // For a request without a body, and for one with a body.
  const curl_slist* plain() const { return list; }
  const curl_slist* with_body() const { return names_content_type ? list : &no_content_type; }

  // Set when a session header is invalid: every statement fails with it.
  std::optional<ResponseError> error;
  bool names_user_agent = false;
  bool names_content_type = false;

 private:
  curl_slist* list = nullptr;
  curl_slist no_content_type{};  // not libcurl's: never freed with curl_slist_free_all
};

// One open session as every I/O thread sees it: immutable settings and the
// CURLSH sharing DNS and TLS sessions. libcurl serialises access to the share
// through the lock callbacks, one mutex per curl_lock_data kind so a DNS
// lookup never waits for a TLS session lookup. Shared (shared_ptr) by the
// Fetcher's table and each I/O thread using it; the share is cleaned up with
// the last owner, after every thread has cleaned up its multi and detached its
// easy handles.
struct SharedSession {
  SharedSession(const SessionId& session_id, const SessionSettings& session_settings)
      : id(session_id), settings(session_settings), headers(settings.headers), share(curl_share_init()) {
    // Without a share the session still works, only without cross-thread
    // DNS/TLS reuse, so a failed init is not fatal.
    if (share == nullptr) return;
    curl_share_setopt(share, CURLSHOPT_LOCKFUNC, &SharedSession::Lock);
    curl_share_setopt(share, CURLSHOPT_UNLOCKFUNC, &SharedSession::Unlock);
    curl_share_setopt(share, CURLSHOPT_USERDATA, this);
    curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
    curl_share_setopt(share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
  }
  ~SharedSession() {
    if (share != nullptr) curl_share_cleanup(share);
  }
  SharedSession(const SharedSession&) = delete;
  SharedSession& operator=(const SharedSession&) = delete;

  static void Lock(CURL*, curl_lock_data data, curl_lock_access, void* user) {
    if (static_cast<int>(data) < CURL_LOCK_DATA_LAST) static_cast<SharedSession*>(user)->locks[data].lock();
  }
  static void Unlock(CURL*, curl_lock_data data, void* user) {
    if (static_cast<int>(data) < CURL_LOCK_DATA_LAST) static_cast<SharedSession*>(user)->locks[data].unlock();
  }

  const SessionId id;
  const SessionSettings settings;
  const SessionHeaders headers;
  CURLSH* const share;
  // Indexed by curl_lock_data; CURL_LOCK_DATA_SHARE is used by libcurl itself
  // when handles attach and detach.
  std::array<std::mutex, CURL_LOCK_DATA_LAST> locks;
};

struct ThreadSession;
class IoThread;

// One statement being fetched, across its attempts. Owned by its ThreadSession.
struct Transfer {
  enum class Overflow { kNone, kBody, kHeaders };

  ThreadSession* session = nullptr;
  std::uint64_t index = 0;
  // Kept here for the whole transfer: CURLOPT_POSTFIELDS points into body.
  Statement statement;
  bool idempotent = true;
  CURL* easy = nullptr;
  curl_slist* header_list = nullptr;
  bool in_multi = false;
  std::uint32_t attempts = 0;
  // Made under earlier DISPATCHes: a rate-aware session's retries run again
  // through the broker (§3.8.6), which counts them here.
  std::uint32_t prior_attempts = 0;
  Clock::time_point started{};
  // Of the current attempt.
  Response response;
  std::string reason;  // reason phrase of the last status line
  std::size_t header_bytes = 0;
  // The final response names a Content-Encoding other than identity, so
  // libcurl decodes its body (CURLOPT_ACCEPT_ENCODING).
  bool encoded = false;
  // Non-idempotent statements only (PrereqCallback), per attempt: requests
  // handed to a connection, the redirect count at the last one, and whether
  // a re-send of libcurl's own was refused.
  std::uint32_t requests_sent = 0;
  long redirects_at_send = 0;
  bool resend_refused = false;
  // Why the worker's destination policy refused this attempt, if it did.
  std::string refused;
  Overflow overflow = Overflow::kNone;
  // What the last response said about rate limits (rate-aware sessions, §3.8).
  std::optional<RateReport> rate;
  char error_buffer[CURL_ERROR_SIZE] = {};
};

// libcurl's socket registration for one (multi, fd): what an epoll event
// points to. Freed only at the end of a loop iteration (graveyard), because
// the epoll event array of that iteration may still hold it.
struct SocketEntry {
  ThreadSession* session = nullptr;
  curl_socket_t fd = CURL_SOCKET_BAD;
  bool dead = false;
};

// A session inside one I/O thread: its multi handle (connection cache), its
// transfers and the results of the current loop iteration. Owned and touched
// only by its I/O thread.
struct ThreadSession {
  std::shared_ptr<SharedSession> shared;
  IoThread* thread = nullptr;
  CURLM* multi = nullptr;
  std::optional<Clock::time_point> deadline;  // libcurl's timer for this multi
  std::unordered_map<Transfer*, std::unique_ptr<Transfer>> transfers;
  std::unordered_set<SocketEntry*> sockets;
  std::vector<FetchResult> results;
  bool touched = false;
};

// What callers hand to an I/O thread.
struct Command {
  enum class Kind { kSubmit, kClose, kReject };
  Kind kind = Kind::kSubmit;
  std::shared_ptr<SharedSession> session;  // kSubmit, kClose
  SessionId id;                            // kReject
  std::vector<FetchItem> items;            // kSubmit, kReject
};

// What the I/O threads share with the Fetcher; outlives the threads.
struct Context {
  const Fetcher::Options* options = nullptr;
  const Fetcher::ResultSink* sink = nullptr;
  std::atomic<std::size_t>* in_flight = nullptr;
};

// One I/O thread: an epoll set over the sockets of all its multis, an eventfd
// for wake-ups, a command queue. push() and stop() may be called from any
// thread; everything else runs on the I/O thread only.
class IoThread {
 public:
  explicit IoThread(Context context) : context_(context), rng_(std::random_device{}()) {
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

  ~IoThread() {
    stop();
    if (thread_.joinable()) thread_.join();
    close(epoll_fd_);
  }

  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;

  void start() { thread_ = std::thread([this] { run(); }); }

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
    std::array<epoll_event, kMaxEpollEvents> events;
    while (!stop_.load(std::memory_order_acquire)) {
      const int n = epoll_wait(epoll_fd_, events.data(), kMaxEpollEvents, next_timeout_ms());
      const int ready = n < 0 ? 0 : n;  // EINTR: just go round
      // Reset the eventfd before draining the queue: a push after the drain
      // then leaves the eventfd readable and no wake-up is lost.
      for (int i = 0; i < ready; ++i) {
        if (events[i].data.ptr == nullptr) wake_.drain();
      }
      drain_commands();
      for (int i = 0; i < ready; ++i) {
        auto* entry = static_cast<SocketEntry*>(events[i].data.ptr);
        if (entry == nullptr || entry->dead) continue;
        const std::uint32_t ev = events[i].events;
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
    shutdown();
  }

  int next_timeout_ms() const {
    std::optional<Clock::time_point> earliest;
    for (const auto& [id, session] : sessions_) {
      if (session->deadline && (!earliest || *session->deadline < *earliest)) earliest = session->deadline;
    }
    if (!backoff_.empty() && (!earliest || backoff_.front().due < *earliest)) earliest = backoff_.front().due;
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
    curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, &IoThread::SocketCallback);
    curl_multi_setopt(multi, CURLMOPT_SOCKETDATA, session.get());
    curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, &IoThread::TimerCallback);
    curl_multi_setopt(multi, CURLMOPT_TIMERDATA, session.get());
    curl_multi_setopt(multi, CURLMOPT_PIPELINING, CURLPIPE_MULTIPLEX);
    curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, context_.options->max_idle_connections);
    // Without a per-host cap every queued HTTP/1.1 transfer opens its own
    // connection. In the pipeline the broker never hands over more than the
    // session's window, so the default is no cap (Options comment).
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, context_.options->max_host_connections);
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
      std::make_heap(backoff_.begin(), backoff_.end(), &IoThread::LaterDue);
    }
    for (auto& [raw, transfer] : session->transfers) {
      if (transfer->in_multi) curl_multi_remove_handle(session->multi, transfer->easy);
      transfer->in_multi = false;
      release_handles(transfer.get());
    }
    session->transfers.clear();
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
    if (transfer->easy != nullptr) release_easy(transfer->easy);
    transfer->easy = nullptr;
    if (transfer->header_list != nullptr) curl_slist_free_all(transfer->header_list);
    transfer->header_list = nullptr;
  }

  // Sets every option of the transfer once; retries reuse them. Returns the
  // error that ends the statement without an attempt, if any.
  std::optional<ResponseError> configure(Transfer* transfer) {
    const Statement& statement = transfer->statement;
    const SessionSettings& settings = transfer->session->shared->settings;

    // A path is joined to base_url; an absolute url goes to libcurl as it is
    // (libcurl copies it either way).
    const std::string* url = &statement.url;
    if (!statement.url.empty() && statement.url.front() == '/') {
      if (settings.base_url.empty()) {
        return ResponseError{StatusCode::kInvalidArgument, "url is a path and the session has no base_url"};
      }
      std::string_view base = settings.base_url;
      while (!base.empty() && base.back() == '/') base.remove_suffix(1);
      joined_url_.assign(base).append(statement.url);
      url = &joined_url_;
    }
    if (!IsHttpToken(statement.method)) {
      return ResponseError{StatusCode::kInvalidArgument, "method is not an HTTP token"};
    }
    const DestinationPolicy& destinations = context_.options->destinations;
    if (!destinations.allowed_hosts.empty()) {
      if (std::string why = RefusedHost(url->c_str(), destinations); !why.empty()) {
        return ResponseError{StatusCode::kPermissionDenied, "destination refused: " + why};
      }
    }
    const SessionHeaders& session_headers = transfer->session->shared->headers;
    if (session_headers.error) return session_headers.error;
    const std::string& method = statement.method;
    const bool has_body = !statement.body.empty();
    const bool posts = method != "HEAD" && (method == "POST" || has_body);

    // Without headers of its own a statement takes the session's list as it
    // is; otherwise it gets a list of its own: the session's defaults minus
    // those it names, then its own, then the defaults of the fetcher.
    const curl_slist* header_list = posts ? session_headers.with_body() : session_headers.plain();
    if (!statement.headers.empty()) {
      for (const auto& [name, value] : statement.headers) {
        if (!IsHttpToken(name) || !IsHttpFieldValue(value)) {
          return ResponseError{StatusCode::kInvalidArgument, "invalid header '" + name + "'"};
        }
      }
      const ResponseError out_of_memory{StatusCode::kInternal, "out of memory"};
      for (const auto& [name, value] : settings.headers) {
        if (!NamesHeader(statement.headers, name) && !AppendHeader(transfer->header_list, header_line_, name, value)) {
          return out_of_memory;
        }
      }
      for (const auto& [name, value] : statement.headers) {
        if (!AppendHeader(transfer->header_list, header_line_, name, value)) return out_of_memory;
      }
      auto append_line = [transfer](const char* line) {
        curl_slist* next = curl_slist_append(transfer->header_list, line);
        if (next != nullptr) transfer->header_list = next;
        return next != nullptr;
      };
      if (!session_headers.names_user_agent && !NamesHeader(statement.headers, "User-Agent") &&
          !append_line(kUserAgentLine)) {
        return out_of_memory;
      }
      if (posts && !session_headers.names_content_type && !NamesHeader(statement.headers, "Content-Type") &&
          !append_line(kNoContentTypeLine)) {
        return out_of_memory;
      }
      header_list = transfer->header_list;
    }

    transfer->easy = acquire_easy();
    if (transfer->easy == nullptr) return ResponseError{StatusCode::kInternal, "curl_easy_init failed"};
    CURL* easy = transfer->easy;
    CURLcode rc = CURLE_OK;
    auto set = [&](CURLoption option, auto value) {
      if (rc == CURLE_OK) rc = curl_easy_setopt(easy, option, value);
    };
    set(CURLOPT_URL, url->c_str());
    set(CURLOPT_PRIVATE, static_cast<void*>(transfer));
    set(CURLOPT_ERRORBUFFER, transfer->error_buffer);
    set(CURLOPT_NOSIGNAL, 1L);
    // Never file://, gopher://, ..., not even through a redirect.
    set(CURLOPT_PROTOCOLS_STR, "http,https");
    set(CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    if (settings.max_redirects > 0) {
      set(CURLOPT_FOLLOWLOCATION, 1L);
      set(CURLOPT_MAXREDIRS, static_cast<long>(settings.max_redirects));
    }
    const std::uint32_t timeout_ms = statement.timeout_ms != 0 ? statement.timeout_ms : settings.timeout_ms;
    set(CURLOPT_TIMEOUT_MS, static_cast<long>(timeout_ms));
    set(CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(settings.connect_timeout_ms));
    set(CURLOPT_HTTP_VERSION, static_cast<long>(CURL_HTTP_VERSION_2TLS));
    if (url->size() >= 8 && EqualsIgnoreCase(std::string_view(*url).substr(0, 8), "https://")) {
      // Wait for a connection being set up that may multiplex (h2) instead of
      // opening another; plain http never multiplexes here, so it would only
      // serialise connection set-up.
      set(CURLOPT_PIPEWAIT, 1L);
    }
    set(CURLOPT_ACCEPT_ENCODING, "");  // every encoding libcurl decodes
    set(CURLOPT_WRITEFUNCTION, &IoThread::WriteCallback);
    set(CURLOPT_WRITEDATA, static_cast<void*>(transfer));
    set(CURLOPT_HEADERFUNCTION, &IoThread::HeaderCallback);
    set(CURLOPT_HEADERDATA, static_cast<void*>(transfer));
    if (settings.max_body_bytes > 0) {
      // Refuses early when Content-Length already says too much; the write
      // callback enforces the cap on decoded bytes.
      set(CURLOPT_MAXFILESIZE_LARGE, static_cast<curl_off_t>(settings.max_body_bytes));
    }
    if (!transfer->idempotent || !destinations.allowed_hosts.empty()) {
      set(CURLOPT_PREREQFUNCTION, &IoThread::PrereqCallback);
      set(CURLOPT_PREREQDATA, static_cast<void*>(transfer));
    }
    if (destinations.refuses_addresses()) {
      // Every connection's address, after DNS and at each redirect, is
      // checked before the socket exists; a reused one was checked when made.
      set(CURLOPT_OPENSOCKETFUNCTION, &IoThread::OpenSocketCallback);
      set(CURLOPT_OPENSOCKETDATA, static_cast<void*>(transfer));
    }
    if (transfer->session->shared->share != nullptr) set(CURLOPT_SHARE, transfer->session->shared->share);
    // libcurl never writes to the list: the session's may be shared.
    if (header_list != nullptr) set(CURLOPT_HTTPHEADER, const_cast<curl_slist*>(header_list));

    if (method == "HEAD") {
      set(CURLOPT_NOBODY, 1L);
    } else if (posts) {
      set(CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(statement.body.size()));
      // Not copied: the statement lives in the transfer until it ends.
      set(CURLOPT_POSTFIELDS, statement.body.data());
      if (method != "POST") set(CURLOPT_CUSTOMREQUEST, method.c_str());
    } else if (method != "GET") {
      set(CURLOPT_CUSTOMREQUEST, method.c_str());
    }
    if (rc != CURLE_OK) {
      return ResponseError{StatusCodeFromCurl(rc), std::string("curl_easy_setopt: ") + curl_easy_strerror(rc)};
    }
    return std::nullopt;
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
      std::pop_heap(backoff_.begin(), backoff_.end(), &IoThread::LaterDue);
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
    const SessionSettings& settings = transfer->session->shared->settings;
    long status = 0;
    curl_easy_getinfo(transfer->easy, CURLINFO_RESPONSE_CODE, &status);
    transfer->response.status = static_cast<int>(status);
    if (transfer->encoded) DropEncodingHeaders(transfer);
    const std::uint32_t attempts = transfer->prior_attempts + transfer->attempts;
    const bool attempts_left = attempts < std::max<std::uint32_t>(settings.max_attempts, 1);

    if (!transfer->refused.empty()) {
      // Nothing reached the refused destination: no retry could change it.
      finish(transfer, ResponseError{StatusCode::kPermissionDenied, "destination refused: " + transfer->refused});
      return;
    }
    if (code == CURLE_OK && settings.rate_aware()) {
      // §3.8: the limits a response advertises go to the broker with the
      // result; a 429 is not retried here but handed back, so that the
      // broker pauses its key for the whole cluster and runs it again.
      transfer->rate = ParseRateHeaders(static_cast<int>(status), transfer->response.headers, std::time(nullptr));
      if (status == 429) {
        finish(transfer, ResponseError{StatusCode::kHttpStatus, "HTTP 429 Too Many Requests"});
        return;
      }
    }
    FetchMetrics* metrics = context_.options->metrics;
    if (metrics && code == CURLE_OK && status == 429) metrics->note_429(HostOf(transfer->easy));
    if (code == CURLE_OK) {
      if (status >= settings.accept_min && status <= settings.accept_max) {
        finish(transfer, std::nullopt);
        return;
      }
      // Any HTTP answer is a known outcome; retry_policy.h says which are
      // tried again.
      const auto wait = IsRetryableHttpStatus(status)
                            ? HttpRetry(status, transfer->idempotent, RetryAfterMs(transfer->response.headers), settings)
                            : std::nullopt;
      std::string message = "HTTP " + std::to_string(status);
      if (!transfer->reason.empty()) message += " " + transfer->reason;
      if (wait && attempts_left) {
        if (metrics) metrics->note_retry(RetryCauseOf(status));
        retry_later(transfer, *wait, ResponseError{StatusCode::kHttpStatus, std::move(message)});
        return;
      }
      if (wait) {
        message += " after " + std::to_string(attempts) + " attempts";
      } else if (IsRetryableHttpStatus(status) && attempts_left) {  // a non-idempotent statement
        message += " (not retried: a non-idempotent statement is sent again only after 429, or 503 with Retry-After)";
      }
      finish(transfer, ResponseError{StatusCode::kHttpStatus, std::move(message)});
      return;
    }

    if (transfer->overflow == Transfer::Overflow::kBody || code == CURLE_FILESIZE_EXCEEDED) {
      finish(transfer, ResponseError{StatusCode::kResourceExhausted,
                                     "response body exceeds max_body_bytes (" +
                                         std::to_string(settings.max_body_bytes) + ")"});
      return;
    }
    if (transfer->overflow == Transfer::Overflow::kHeaders) {
      finish(transfer, ResponseError{StatusCode::kResourceExhausted,
                                     "response headers exceed " + std::to_string(kMaxResponseHeaderBytes) +
                                         " bytes"});
      return;
    }
    if (transfer->resend_refused) {
      finish(transfer, ResponseError{StatusCode::kUnknown,
                                     "the connection closed without a response after the request was sent; " +
                                         std::string(kOutcomeUnknown)});
      return;
    }
    StatusCode status_code = StatusCodeFromCurl(code);
    std::string message = curl_easy_strerror(code);
    if (transfer->error_buffer[0] != '\0') {
      message += ": ";
      message += transfer->error_buffer;
    }
    if (IsRetryable(status_code)) {
      // A failure before any request was handed to a connection (DNS, refused
      // or timed-out connect, TLS handshake) sent nothing: even a POST is
      // tried again. After that (a timeout waiting for the answer, a
      // connection that broke) the server may have acted on it.
      if (!transfer->idempotent && transfer->requests_sent > 0) {
        status_code = StatusCode::kUnknown;
        if (status != 0) message += " (the server had begun to answer: HTTP " + std::to_string(status) + ")";
        message += "; ";
        message += kOutcomeUnknown;
      } else if (attempts_left) {
        if (metrics) metrics->note_retry(RetryCause::kTransport);
        retry_later(transfer, RetryWait{std::nullopt, settings.backoff_base_ms}, ResponseError{status_code, std::move(message)});
        return;
      } else if (attempts > 1) {
        message += " (after " + std::to_string(attempts) + " attempts)";
      }
    }
    finish(transfer, ResponseError{status_code, std::move(message)});
  }

  // libcurl decodes a compressed body (CURLOPT_ACCEPT_ENCODING), after which
  // the response's Content-Encoding and Content-Length describe bytes that
  // are not the body returned: both are dropped, as Go's http.Transport does
  // when it decompresses. Only when a body was received (CURLINFO_SIZE_DOWNLOAD
  // counts bytes as they came off the wire, before decoding): the headers of
  // a HEAD, 204 or 304 describe the resource and stay.
  static void DropEncodingHeaders(Transfer* transfer) {
    curl_off_t received = 0;
    curl_easy_getinfo(transfer->easy, CURLINFO_SIZE_DOWNLOAD_T, &received);
    if (received <= 0) return;
    std::erase_if(transfer->response.headers, [](const auto& h) {
      return EqualsIgnoreCase(h.first, "Content-Encoding") || EqualsIgnoreCase(h.first, "Content-Length");
    });
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
    std::push_heap(backoff_.begin(), backoff_.end(), &IoThread::LaterDue);
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
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, entry->fd, nullptr);
    entry->dead = true;
    graveyard_.push_back(entry);
  }

  void free_graveyard() {
    for (SocketEntry* entry : graveyard_) delete entry;
    graveyard_.clear();
  }

  void watch(SocketEntry* entry, int what, bool added) {
    epoll_event ev{};
    ev.data.ptr = entry;
    if (what == CURL_POLL_IN || what == CURL_POLL_INOUT) ev.events |= EPOLLIN;
    if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT) ev.events |= EPOLLOUT;
    // A registration can outlive a socket libcurl closed without telling us
    // (its fd number then comes back), or be gone when we think it is there.
    if (added) {
      if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, entry->fd, &ev) < 0 && errno == EEXIST) {
        epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, entry->fd, &ev);
      }
    } else if (epoll_ctl(epoll_fd_, EPOLL_CTL_MOD, entry->fd, &ev) < 0 && errno == ENOENT) {
      epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, entry->fd, &ev);
    }
  }

  static int SocketCallback(CURL*, curl_socket_t fd, int what, void* user, void* socket_data) {
    auto* session = static_cast<ThreadSession*>(user);
    IoThread* self = session->thread;
    auto* entry = static_cast<SocketEntry*>(socket_data);
    if (what == CURL_POLL_REMOVE) {
      if (entry != nullptr) {
        session->sockets.erase(entry);
        self->bury(entry);
      }
      return 0;
    }
    const bool added = entry == nullptr;
    if (added) {
      entry = new SocketEntry{session, fd, false};
      session->sockets.insert(entry);
      curl_multi_assign(session->multi, fd, entry);
    }
    self->watch(entry, what, added);
    return 0;
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

  // Set for non-idempotent statements only. libcurl calls it right before it
  // sends a request on a connection, new or reused, after any TLS handshake;
  // so an attempt that failed before it ran sent nothing. It also catches a
  // re-send of libcurl's own: when a reused keep-alive connection closes
  // before any byte of the response, libcurl sends the request again on a
  // new connection (Curl_retry_request), a POST included. A second call for
  // the same request (the redirect count unchanged) is that re-send, and is
  // refused: the server may have acted on the first.
  // The host of `url` when this worker's allow-list refuses it, else "".
  static std::string RefusedHost(const char* url, const DestinationPolicy& destinations) {
    CURLU* parsed = curl_url();
    char* host = nullptr;
    std::string why;
    if (parsed == nullptr || curl_url_set(parsed, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(parsed, CURLUPART_HOST, &host, 0) != CURLUE_OK) {
      why = "cannot tell the host of " + std::string(url) + " to check it against the allowed hosts";
    } else if (!HostAllowed(host, destinations)) {
      why = "host " + std::string(host) + " is not among this worker's allowed hosts";
    }
    curl_free(host);
    curl_url_cleanup(parsed);
    return why;
  }

  static curl_socket_t OpenSocketCallback(void* user, curlsocktype, curl_sockaddr* address) {
    auto* transfer = static_cast<Transfer*>(user);
    std::string why = RefusedAddress(&address->addr, transfer->session->thread->context_.options->destinations);
    if (!why.empty()) {
      transfer->refused = std::move(why) + " (this worker refuses such destinations)";
      return CURL_SOCKET_BAD;
    }
    return ::socket(address->family, address->socktype | SOCK_CLOEXEC, address->protocol);
  }

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

  static size_t HeaderCallback(char* data, size_t size, size_t count, void* user) {
    auto* transfer = static_cast<Transfer*>(user);
    const std::size_t bytes = size * count;
    transfer->header_bytes += bytes;
    if (transfer->header_bytes > kMaxResponseHeaderBytes) {
      transfer->overflow = Transfer::Overflow::kHeaders;
      return CURL_WRITEFUNC_ERROR;
    }
    std::string_view line(data, bytes);
    while (!line.empty() && (line.back() == '\r' || line.back() == '\n')) line.remove_suffix(1);
    Headers& headers = transfer->response.headers;
    if (line.starts_with("HTTP/")) {
      // A new response begins (redirect, 100-continue): keep only the final one's.
      headers.clear();
      transfer->reason.clear();
      transfer->encoded = false;
      const std::size_t code_at = line.find(' ');
      if (code_at != std::string_view::npos) {
        const std::size_t reason_at = line.find(' ', code_at + 1);
        if (reason_at != std::string_view::npos) transfer->reason = std::string(Trim(line.substr(reason_at + 1)));
      }
      return bytes;
    }
    if (line.empty()) return bytes;
    if ((line.front() == ' ' || line.front() == '\t') && !headers.empty()) {
      // Obsolete line folding (RFC 9112 §5.2): a continuation of the previous value.
      headers.back().second += ' ';
      headers.back().second += Trim(line);
      return bytes;
    }
    const std::size_t colon = line.find(':');
    if (colon == std::string_view::npos || colon == 0) return bytes;  // not a header; ignored
    const std::string_view name = Trim(line.substr(0, colon));
    const std::string_view value = Trim(line.substr(colon + 1));
    if (EqualsIgnoreCase(name, "Content-Encoding") && !value.empty() && !EqualsIgnoreCase(value, "identity")) {
      transfer->encoded = true;
    }
    headers.emplace_back(std::string(name), std::string(value));
    return bytes;
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
  std::mt19937_64 rng_;
  // Reused by configure() so building a request allocates only what libcurl
  // keeps (its copies of the url and header lines).
  std::string joined_url_;
  std::string header_line_;
};

}  // namespace

// Owns the I/O threads and the table of open sessions. The table is guarded by
// mu_; commands are pushed to the I/O threads while holding it, so every
// thread sees a session's submits before its close.
struct Fetcher::Impl {
  Impl(Options opts, ResultSink result_sink) : options(std::move(opts)), sink(std::move(result_sink)) {}

  const Options options;
  const ResultSink sink;
  std::atomic<std::size_t> in_flight{0};
  std::atomic<std::size_t> next_thread{0};
  std::vector<std::unique_ptr<IoThread>> threads;

  mutable std::mutex mu;
  std::unordered_map<SessionId, std::shared_ptr<SharedSession>> sessions;  // guarded by mu
};

Fetcher::Fetcher(Options options, ResultSink sink)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(sink))) {
  GlobalInit();
  unsigned count = impl_->options.io_threads;
  if (count == 0) count = std::max(1u, std::thread::hardware_concurrency());
  const Context context{&impl_->options, &impl_->sink, &impl_->in_flight};
  impl_->threads.reserve(count);
  for (unsigned i = 0; i < count; ++i) impl_->threads.push_back(std::make_unique<IoThread>(context));
  for (auto& thread : impl_->threads) thread->start();
}

Fetcher::~Fetcher() {
  for (auto& thread : impl_->threads) thread->stop();
  for (auto& thread : impl_->threads) thread->join();
  impl_->threads.clear();
  std::lock_guard lock(impl_->mu);
  impl_->sessions.clear();
}

void Fetcher::open_session(const SessionId& session, const SessionSettings& settings) {
  std::lock_guard lock(impl_->mu);
  if (impl_->sessions.contains(session)) return;
  // I/O threads create their part of the session when its first statements arrive.
  impl_->sessions.emplace(session, std::make_shared<SharedSession>(session, settings));
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
  // Contiguous slices, the first thread rotating between calls so that small
  // submits spread too.
  const std::size_t slices = std::min(total, threads.size());
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
    threads[(first + k) % threads.size()]->push(std::move(command));
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
