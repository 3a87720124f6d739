#pragma once
// The fetcher's I/O threads and what they share with the Fetcher facade: the
// shared part of an open session (settings, header list, CURLSH), the
// commands callers hand to a thread, and the Context every thread reads.
// Each IoThread drives one epoll set and, per session, one CURLM in
// socket-action form; io_thread.cc holds the loop, the transfers' life cycle
// (attempts, retries, results) and the libcurl callbacks tied to the loop.

#include <curl/curl.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "fetcher.h"
#include "request.h"

namespace gatherer::worker {

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
  // The I/O threads serving the session (Fetcher::open_session): `spread` of
  // them from `home` on, each keeping at most `host_connections` connections
  // to any one host, so the session's connections to a destination stay
  // within its window however many threads serve it.
  // Changed when the broker gives the session another share of its window
  // (Fetcher::open_session), then applied by each thread (Command::kResize).
  unsigned home = 0;
  unsigned spread = 1;
  // The loops it is spread over: `spread` of [base, base + range), from
  // base + home on (Fetcher::Impl::loop).
  unsigned base = 0;
  unsigned range = 1;
  std::atomic<long> host_connections{0};
  // Indexed by curl_lock_data; CURL_LOCK_DATA_SHARE is used by libcurl itself
  // when handles attach and detach.
  std::array<std::mutex, CURL_LOCK_DATA_LAST> locks;
};

// What callers hand to an I/O thread.
struct Command {
  enum class Kind { kSubmit, kClose, kReject, kResize };
  Kind kind = Kind::kSubmit;
  std::shared_ptr<SharedSession> session;  // kSubmit, kClose, kResize
  SessionId id;                            // kReject
  std::vector<FetchItem> items;            // kSubmit, kReject
};

// What the I/O threads share with the Fetcher; outlives the threads.
struct Context {
  const Fetcher::Options* options = nullptr;
  const Fetcher::ResultSink* sink = nullptr;
  std::atomic<std::size_t>* in_flight = nullptr;
  // CURLOPT_INTERFACE for Options::source_address, or nullptr.
  const char* interface = nullptr;
};

// One I/O loop: an epoll set over the sockets of all its multis, an eventfd
// for wake-ups, a command queue. push() and stop() may be called from any
// thread; everything else runs on the loop's thread only. A `driven` loop
// has no thread of its own: its owner waits for fd() to be readable or for
// due(), then calls drive(), from one thread at a time.
class IoThread {
 public:
  explicit IoThread(Context context, bool driven = false);
  // Stops the thread and joins it; in-flight transfers end without results.
  ~IoThread();
  IoThread(const IoThread&) = delete;
  IoThread& operator=(const IoThread&) = delete;

  void start();
  void push(Command&& command);
  void stop();
  void join();

  // A driven loop's: one pass over what is ready, never waiting; the epoll
  // descriptor, readable when there is something; when its timers are due.
  void drive();
  // The driven loop runs on a thread of its own from now on (its sessions
  // and connections stay); called where it is driven.
  void undrive();
  bool driven() const;  // until undrive()
  int fd() const;
  std::optional<std::chrono::steady_clock::time_point> due() const;

  // What runs on the thread (io_thread.cc). Named here so that the loop's
  // per-session state can point back at it.
  class Loop;

 private:
  std::unique_ptr<Loop> loop_;
};

}  // namespace gatherer::worker
