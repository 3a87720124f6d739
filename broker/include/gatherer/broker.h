#pragma once
// gatherer::Broker: the ZeroMQ ROUTER that owns sessions, their queues, the
// leases of dispatched statements and the worker registry (docs/architecture.md §3).
// Clients and workers connect DEALER sockets to it; the embedded mode runs
// it inside the client process over inproc://.
//
// Thread-safety: start(), stop() and endpoints() are for the owning thread;
// stats() may be called from any thread. All broker state is owned by the
// broker's loop thread, which alone touches the ROUTER socket.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <unordered_set>


#include "gatherer/curve.h"
#include "gatherer/rate_limit.h"
#include "gatherer/status.h"

namespace spdlog {
class logger;
}
namespace zmq {
class context_t;
}

namespace gatherer {

class LoopPart;

struct BrokerOptions {
  // Endpoints to bind. Binds 127.0.0.1 unless told otherwise.
  std::vector<std::string> endpoints = {"tcp://127.0.0.1:5555"};
  // Context to create the socket in; required for inproc:// endpoints shared
  // with a client. nullptr = the broker creates its own.
  zmq::context_t* context = nullptr;
  // Heartbeat period; a worker silent for heartbeat_liveness periods is
  // presumed dead: its non-idempotent statements fail as "outcome unknown"
  // and the others run again in quarantine (PROTOCOL.md §4.5).
  std::chrono::milliseconds heartbeat_interval{1000};
  int heartbeat_liveness = 3;
  // A session whose client has sent nothing (not even a HEARTBEAT naming it)
  // for this long is cancelled everywhere and forgotten (docs/architecture.md §1). A
  // live client that was idle re-opens it on its next run (PROTOCOL §3.2.8).
  std::chrono::milliseconds session_ttl{10'000};
  // Statements per DISPATCH message at most (PROTOCOL.md §5). Bigger chunks
  // cost fewer messages; smaller spread work more evenly across workers.
  std::uint32_t max_chunk = 512;
  // Open sessions at most; OPEN beyond it is refused with resource_exhausted.
  std::size_t max_sessions = 10'000;
  // Statements a session may have queued plus in flight beyond window +
  // prefetch, as slack for clients; a SUBMIT past the cap is refused
  // (resource_exhausted) so broker memory stays bounded by the windows.
  std::uint32_t queue_slack = 1024;
  // Statements queued and in flight over all sessions at most; a SUBMIT past
  // it is refused (resource_exhausted) whatever its session's own cap.
  std::uint64_t max_queued = 1'000'000;
  // A statement that this many workers died running alone fails as poison
  // (error code aborted) instead of killing more (PROTOCOL.md §4.5).
  std::uint32_t poison_after = 3;
  // CURVE (PROTOCOL.md §1.7), on when curve_key is set: every connection is
  // encrypted and must present a listed public key; a client key may open
  // sessions (each then belongs to that key alone), a worker key may
  // register as a worker. Both lists are required with a key.
  CurveKeyPair curve_key;
  std::unordered_set<std::string> curve_clients;
  std::unordered_set<std::string> curve_workers;
  // Keys allowed to send control requests (gatherer-ctl, PROTOCOL.md §3.9).
  // With CURVE and none listed, control is refused to every key.
  std::unordered_set<std::string> curve_operators;
  // Where the broker logs; nullptr = the process-wide Logger(). An embedded
  // broker logs through its Gatherer's logger, at that Gatherer's level.
  std::shared_ptr<spdlog::logger> logger;
  // Rate limits for every session that declares none (PROTOCOL.md §3.8):
  // host rules ("20:1,100:120" per destination host) and named rules.
  std::vector<RateRule> rate_limits;
  // Called on the loop thread when an operator asks for a shutdown
  // (gatherer-ctl shutdown, PROTOCOL.md §3.9.6); gatherer-broker raises its
  // own SIGTERM there. Unset: the broker drains (drain()).
  std::function<void()> on_shutdown;
  // Publish per-worker and per-session figures for metrics_text(), once per
  // heartbeat period (gatherer-broker --metrics). Off: metrics_text() has
  // the broker-wide counters only.
  bool metrics = false;
  // False: start() starts no thread of its own, and the owner drives
  // loop() (a LoopDriver; the embedded cluster runs broker and worker on
  // one, led by the client's thread during a run).
  bool own_thread = true;
};

// Counters, readable from any thread (relaxed; for tests and metrics).
struct BrokerStats {
  std::atomic<std::uint64_t> sessions{0};
  std::atomic<std::uint64_t> workers{0};
  std::atomic<std::uint64_t> queued{0};
  std::atomic<std::uint64_t> in_flight{0};
  std::atomic<std::uint64_t> dispatched{0};
  std::atomic<std::uint64_t> results{0};
  std::atomic<std::uint64_t> duplicates_dropped{0};
  std::atomic<std::uint64_t> requeued{0};      // of workers that left
  std::atomic<std::uint64_t> quarantined{0};   // of workers that died
  std::atomic<std::uint64_t> outcome_unknown{0};
  std::atomic<std::uint64_t> poisoned{0};
  std::atomic<std::uint64_t> malformed{0};
  std::atomic<std::uint64_t> sessions_expired{0};
  // Statements answered to clients (forwarded results and the broker's own
  // failures), of them with an error, and attempts beyond the first that
  // workers reported (PROTOCOL.md §3.9.2).
  std::atomic<std::uint64_t> done{0};
  std::atomic<std::uint64_t> failed{0};
  std::atomic<std::uint64_t> retried{0};
  std::atomic<std::uint64_t> sessions_cancelled{0};  // by an operator
  // CURVE: messages refused because their key may not send them (a client
  // key acting as a worker, another key naming a session).
  std::atomic<std::uint64_t> denied{0};
  std::atomic<std::uint64_t> throttled{0};  // 429s reported by workers (§3.8)
};

class Broker {
 public:
  explicit Broker(BrokerOptions options);
  // Stops the loop if running.
  ~Broker();
  Broker(const Broker&) = delete;
  Broker& operator=(const Broker&) = delete;

  // Binds every endpoint and starts the loop thread. Unavailable if an
  // endpoint cannot be bound (the message names it).
  [[nodiscard]] Status start();
  // Graceful drain (PROTOCOL.md §4.7): from now on OPEN of a new session is
  // refused (unavailable); open sessions are served to their end. The owner
  // stops the broker once stats().sessions is 0 or its deadline passed.
  // Callable from any thread.
  void drain();
  // Stops the loop and closes the socket; idempotent. A driven broker's
  // driver must have stopped first.
  void stop();
  // The loop, for a broker started without a thread of its own (valid after
  // start()).
  LoopPart& loop();
  // The bound endpoints with wildcards resolved (tcp://127.0.0.1:41234).
  const std::vector<std::string>& endpoints() const;
  const BrokerStats& stats() const;
  // Prometheus text exposition of stats() and, with BrokerOptions::metrics,
  // of each worker and session as of the last heartbeat. Any thread.
  std::string metrics_text() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gatherer
