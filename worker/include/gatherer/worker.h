#pragma once
// gatherer::Worker: connects a DEALER to the broker, registers its slots,
// takes DISPATCHed statements and fetches them on the Fetcher's I/O threads,
// returning results batched per session (docs/architecture.md §3).
//
// Thread-safety: start()/stop() for the owning thread; stats() from any
// thread. The DEALER socket is owned by the worker's socket thread; the I/O
// threads hand results back through a oneTBB concurrent queue and an eventfd.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>


#include "gatherer/curve.h"
#include "gatherer/destinations.h"
#include "gatherer/status.h"

namespace spdlog {
class logger;
}
namespace zmq {
class context_t;
}

namespace gatherer {

class LoopPart;

struct WorkerOptions {
  // Broker endpoint to connect to; the broker may start later.
  std::string broker = "tcp://127.0.0.1:5555";
  // Context for the socket; required to reach an inproc:// broker.
  // nullptr = the worker creates its own.
  zmq::context_t* context = nullptr;
  // libcurl I/O threads; 0 = one per core.
  unsigned io_threads = 0;
  // Statements taken at once (the credit advertised in READY).
  // 0 = 1024 per I/O thread. More slots means more concurrent transfers.
  std::uint32_t slots = 0;
  // Heartbeat period and how many silent periods mean the broker is gone
  // (then the worker registers again: the broker may have restarted).
  std::chrono::milliseconds heartbeat_interval{1000};
  int heartbeat_liveness = 3;
  // Shown in logs and in each response's `worker`; empty = host-pid-n.
  std::string worker_id;
  // Diagnostic mode: answer every statement at once with an empty 200,
  // without HTTP, so the cost of client + broker is measured alone (the
  // routing benchmark). Never for real work.
  bool echo = false;
  // Time to finish what it holds when the broker asks it to drain
  // (gatherer-ctl drain, PROTOCOL.md §3.9.5), as drain() takes on SIGTERM.
  std::chrono::milliseconds drain_timeout{30'000};
  // Count retries by cause, 429s by host, latency and body sizes for
  // metrics_text() (gatherer-worker --metrics): a few relaxed atomic
  // increments per statement. Off: metrics_text() has WorkerStats only.
  bool metrics = false;
  // Destinations this worker refuses to fetch from, whatever a statement
  // asks (private, loopback, link-local addresses; hosts off an allow-list).
  DestinationPolicy destinations;
  // Local address every HTTP connection leaves from: an IPv4 or IPv6 literal
  // of this host ("10.0.0.5", "2001:db8::5"), bound before connecting, for a
  // host with several addresses where the outgoing one matters (a firewall
  // or a server's allow-list, a per-worker identity). Empty = the system
  // chooses. start() refuses anything else (CheckSourceAddress) before
  // connecting; a destination of the other address family cannot be reached.
  std::string source_address;
  // CURVE (PROTOCOL.md §1.7), for a broker that requires it: the broker's
  // public key (Z85) and this worker's key pair, which the broker must list
  // among its workers. Empty = plaintext.
  std::string curve_broker_key;
  CurveKeyPair curve_key;
  // Where the worker logs; nullptr = the process-wide Logger(). An embedded
  // worker logs through its Gatherer's logger, at that Gatherer's level.
  std::shared_ptr<spdlog::logger> logger;
  // Warn when a session fetches without TLS verification (tls_insecure), so
  // that a worker process's operator knows; an embedded worker's Gatherer
  // has said so already, once.
  bool warn_insecure_sessions = true;
  // False: start() starts no socket thread of its own (the I/O threads
  // still run), and the owner drives loop() (a LoopDriver: the embedded
  // cluster runs broker and worker on one, led by the client's thread).
  bool own_thread = true;
};

struct WorkerStats {
  std::atomic<std::uint64_t> received{0};   // statements dispatched to this worker
  std::atomic<std::uint64_t> completed{0};  // results sent back
  std::atomic<std::uint64_t> malformed{0};  // bad messages dropped
  std::atomic<std::uint64_t> registrations{0};
  // Statements dispatched and not yet answered or ended (gauge).
  std::atomic<std::uint64_t> in_hand{0};
};

// Checks a WorkerOptions::source_address: Ok when empty, or an IPv4 or IPv6
// literal this host can bind; else InvalidArgument saying why
// (gatherer-worker --source-address).
Status CheckSourceAddress(std::string_view address);

class Worker {
 public:
  explicit Worker(WorkerOptions options);
  ~Worker();  // stop()
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Connects and starts the socket and I/O threads.
  [[nodiscard]] Status start();
  // Graceful drain (PROTOCOL.md §3.4.7), from any thread; returns at once.
  // The worker tells the broker it takes no more work, finishes what it has
  // in hand, returns the results and says DISCONNECT; whatever is still in
  // hand when `deadline` passes is aborted and goes back to the broker.
  void drain(std::chrono::milliseconds deadline);
  // True once a drain has ended (everything answered, or the deadline passed)
  // and the broker has been told; then call stop().
  bool drained() const;
  // Stops taking work, aborts in-flight transfers, closes the socket;
  // idempotent. A driven worker's driver must have stopped first.
  void stop();
  // The socket loop, for a worker started without a thread of its own
  // (valid after start()).
  LoopPart& loop();
  const WorkerStats& stats() const;
  // Prometheus text exposition of stats() and, with WorkerOptions::metrics,
  // of retries, 429s, latency and body sizes. Any thread.
  std::string metrics_text() const;
  const std::string& id() const;
  // Sessions the worker currently holds (for tests: forgotten after close).
  std::size_t sessions() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gatherer
