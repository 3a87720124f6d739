#pragma once
// Fetcher: the worker's HTTP engine. A few I/O threads (default one per
// core), each driving libcurl in socket-action form over one epoll set with
// thousands of concurrent transfers; never a thread per request.
//
// Per session id the fetcher keeps the *shared session*: one CURLSH sharing
// DNS and TLS sessions across all I/O threads (mutex lock callbacks), and in
// each I/O thread a CURLM of its own for that session, so keep-alive
// connections are reused within the thread and dropped when the session
// closes (libcurl cannot share a connection cache across threads).
//
// Thread-safety: open_session, submit, close_session and in_flight may be
// called from any thread (in practice the worker's socket thread); the
// ResultSink is called on I/O threads, concurrently, and must be thread-safe.

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gatherer/config.h"
#include "gatherer/destinations.h"
#include "gatherer/ids.h"
#include "fetch_metrics.h"
#include "gatherer/protocol.h"
#include "gatherer/statement.h"

namespace gatherer::worker {

// One statement of a session as dispatched (index = its position in the
// caller's sequence), and one outcome: the wire types themselves, so a
// DISPATCH's statements and a batch of results move through without copies.
using FetchItem = protocol::WireStatement;
using FetchResult = protocol::WireResult;

class Fetcher {
 public:
  // Window served by one I/O thread: a session with a window up to this
  // stays on one thread (its connections in one pool, its results in one
  // batch stream); a bigger one is spread over more. Measured on nginx, 2
  // cores: at a window of 25 one thread costs less CPU per request than two
  // (47 against 55 µs embedded); at 256 one thread is the bottleneck (0.57x
  // bare libcurl against 0.86x with two).
  static constexpr std::size_t kWindowPerThread = 128;

  struct Options {
    // I/O threads; 0 = one per core (std::thread::hardware_concurrency()).
    unsigned io_threads = 0;
    // Worker id written into Response::worker.
    std::string worker_id;
    // Idle keep-alive connections kept per session per I/O thread
    // (CURLMOPT_MAXCONNECTS). Sized for a window of ~1000 on one host, so a
    // new burst reuses the last burst's connections instead of reconnecting.
    long max_idle_connections = 1024;
    // Concurrent connections per host per session in this process, at most;
    // 0 = the session's window (SessionSettings::workers), which is also the
    // most it ever has in flight. A session is served by one I/O thread per
    // kWindowPerThread of its window (at least one, at most all), and the cap
    // is shared out between them (CURLMOPT_MAX_HOST_CONNECTIONS of each), so
    // a window of 25 opens at most 25 connections to a host, not 25 per
    // thread. A cap below the window shrinks it on HTTP/1.1.
    long max_host_connections = 0;
    // Counters for /metrics (retries by cause, 429s by host, latency and
    // body size histograms); nullptr = not counted. Outlives the Fetcher.
    FetchMetrics* metrics = nullptr;
    // Destinations refused whatever a statement asks (addresses after DNS,
    // hosts; redirects included): permission_denied, not retried.
    DestinationPolicy destinations;
    // Local address every HTTP connection leaves from (an IPv4 or IPv6
    // literal of this host, bound before connecting); empty = the system
    // chooses. A destination of the other address family cannot be reached.
    std::string source_address;
    // One more I/O loop, with no thread: the owner runs it (driven_fd,
    // driven_due, drive) beside its own loop, so a result reaches the owner
    // with no thread woken. A session that one loop serves (a window up to
    // kWindowPerThread) runs there; a bigger one on the `io_threads`
    // threads. The embedded cluster runs it on the caller's thread
    // (docs/architecture.md §4).
    bool drive_first = false;
  };

  // Results of one session, batched: called on an I/O thread with all the
  // outcomes that thread finished in one loop iteration for `session`.
  using ResultSink = std::function<void(const SessionId& session, std::vector<FetchResult>&& results)>;

  // Throws std::invalid_argument when options.source_address is not an IP
  // literal.
  Fetcher(Options options, ResultSink sink);
  // Stops the I/O threads; in-flight transfers are aborted without results.
  ~Fetcher();
  Fetcher(const Fetcher&) = delete;
  Fetcher& operator=(const Fetcher&) = delete;

  // Declares a session and its settings. Re-opening an open session keeps it
  // and its settings, but for a new `workers` (its share of the window): the
  // connections its threads may keep to one host follow it.
  void open_session(const SessionId& session, const SessionSettings& settings);

  // Queues statements of an open session; they start at once on the I/O
  // threads (spread across them). Each yields exactly one FetchResult through
  // the sink unless the session is closed first. Statements of an unknown
  // session yield results with error code failed_precondition.
  void submit(const SessionId& session, std::vector<FetchItem>&& items);

  // Aborts the session's queued, backing-off and in-flight transfers (no
  // results are delivered for them), and frees its connections, DNS and TLS
  // caches. Unknown sessions are ignored. The I/O threads act on it
  // asynchronously: results of the session finished just before may still
  // reach the sink shortly after this returns, and the caller drops them
  // (the broker does, by lease: PROTOCOL.md §4.3).
  void close_session(const SessionId& session);

  // Statements submitted and not yet reported through the sink.
  std::size_t in_flight() const;

  // Options::drive_first: the first loop's epoll descriptor (readable when
  // it has something to do; -1 without drive_first), when its timers are
  // due, and one pass of it that never waits. From one thread at a time.
  int driven_fd() const;
  std::optional<std::chrono::steady_clock::time_point> driven_due() const;
  void drive();
  // Hands the driven loop a thread of its own, sessions and connections
  // kept: driven_fd() is -1 from then on. Where it is driven, once.
  void undrive();

  // Number of sessions currently open (for tests and metrics).
  std::size_t sessions() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Maps a libcurl transfer result to a StatusCode (the one place that does).
StatusCode StatusCodeFromCurl(int curl_code);

}  // namespace gatherer::worker
