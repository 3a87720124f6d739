// gatherer-worker: parse flags, build WorkerOptions, run until SIGINT/SIGTERM,
// then drain: finish what is in hand (up to --drain-timeout-ms), return it,
// exit 0. A second signal stops at once. Every flag can also be set by an
// environment variable (GATHERER_BROKER, ...; shown in --help); a flag given
// on the command line wins.
#include <CLI/CLI.hpp>

#include "gatherer/allocator.h"
#include "gatherer/log.h"
#include "gatherer/signals.h"
#include "gatherer/worker.h"
#include "metrics_http.h"

int main(int argc, char** argv) {
  gatherer::TuneAllocatorForBodies();
  gatherer::WorkerOptions options;
  std::string log_level = "info";
  int heartbeat_ms = static_cast<int>(options.heartbeat_interval.count());
  CLI::App app{"gatherer-worker: fetches the statements a Gatherer broker dispatches, with libcurl"};
  app.add_option("--broker", options.broker, "Broker endpoint (default tcp://127.0.0.1:5555)")
      ->envname("GATHERER_BROKER");
  app.add_option("--io-threads", options.io_threads, "libcurl I/O threads (0 = one per core)")
      ->check(CLI::Range(0, 256))
      ->envname("GATHERER_IO_THREADS");
  app.add_option("--slots", options.slots, "Statements taken at once (0 = 1024 per I/O thread)")
      ->envname("GATHERER_SLOTS");
  app.add_option("--heartbeat-ms", heartbeat_ms, "Heartbeat period in ms")
      ->check(CLI::Range(10, 60'000))
      ->envname("GATHERER_HEARTBEAT_MS");
  app.add_option("--id", options.worker_id, "Worker id shown in logs and responses (default host-pid-n)")
      ->envname("GATHERER_WORKER_ID");
  std::string refuse;
  app.add_option("--refuse-destinations", refuse,
                 "Never fetch from these addresses, checked after DNS and at every redirect: comma-separated "
                 "loopback, private, link-local, or all (against requests aimed at cloud metadata services such as "
                 "169.254.169.254 or at the worker's own network)")
      ->envname("GATHERER_REFUSE_DESTINATIONS");
  app.add_option("--allow-hosts", options.destinations.allowed_hosts,
                 "Fetch only from these hosts (comma-separated; *.example.com allows its subdomains), checked at "
                 "every redirect too; default: any host")
      ->delimiter(',')
      ->envname("GATHERER_ALLOW_HOSTS");
  app.add_option("--source-address", options.source_address,
                 "Local address every HTTP connection leaves from: an IPv4 or IPv6 address of this host (default: "
                 "the system chooses)")
      ->envname("GATHERER_SOURCE_ADDRESS");
  std::string curve_broker_key, curve_key;
  app.add_option("--curve-broker-key", curve_broker_key,
                 "CURVE: the broker's public key (40 Z85 characters or a .pub file); needs --curve-key")
      ->envname("GATHERER_CURVE_BROKER_KEY");
  app.add_option("--curve-key", curve_key,
                 "CURVE: this worker's key pair file (gatherer keygen); the broker must list its public key")
      ->envname("GATHERER_CURVE_KEY");
  app.add_flag("--echo", options.echo,
               "Diagnostic: answer every statement with an empty 200 without HTTP (measures client + broker alone)");
  int drain_ms = 30'000;
  app.add_option("--drain-timeout-ms", drain_ms,
                 "On SIGTERM/SIGINT, time to finish statements in hand before aborting them (0 = abort at once)")
      ->check(CLI::Range(0, 86'400'000))
      ->envname("GATHERER_DRAIN_TIMEOUT_MS");
  app.add_option("--log-level", log_level, "debug, info, warning, error, critical or 10..50")
      ->envname("GATHERER_LOG_LEVEL");
  std::string metrics_address;
  app.add_option("--metrics", metrics_address,
                 "Serve Prometheus metrics at http://ADDR:PORT/metrics (ADDR:PORT, IPv4; off by default)")
      ->envname("GATHERER_METRICS");
  CLI11_PARSE(app, argc, argv);
  const auto level = gatherer::ParseLogLevel(log_level);
  if (!level) {
    std::fprintf(stderr, "gatherer-worker: --log-level: %s\n", level.error().message().c_str());
    return 2;
  }
  gatherer::SetLogLevel(*level);
  options.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  options.drain_timeout = std::chrono::milliseconds(drain_ms);
  options.metrics = !metrics_address.empty();
  if (gatherer::Status s = gatherer::ParseRefusedDestinations(refuse, options.destinations); !s.ok()) {
    std::fprintf(stderr, "gatherer-worker: --refuse-destinations: %s\n", s.message().c_str());
    return 2;
  }
  if (gatherer::Status s = gatherer::CheckSourceAddress(options.source_address); !s.ok()) {
    std::fprintf(stderr, "gatherer-worker: --source-address: %s\n", s.message().c_str());
    return 2;
  }
  auto curve = gatherer::ReadCurveClientKeys(curve_broker_key, curve_key);
  if (!curve) {
    std::fprintf(stderr, "gatherer-worker: %s\n", curve.error().message().c_str());
    return 2;
  }
  options.curve_broker_key = std::move(curve->broker_public_key);
  options.curve_key = std::move(curve->own);

  gatherer::BlockTerminationSignals();
  gatherer::Worker worker(options);
  if (gatherer::Status s = worker.start(); !s.ok()) {
    std::fprintf(stderr, "gatherer-worker: %s\n", s.ToString().c_str());
    return 1;
  }
  gatherer::MetricsHttpServer metrics([&worker] { return worker.metrics_text(); });
  if (!metrics_address.empty()) {
    if (gatherer::Status s = metrics.start(metrics_address); !s.ok()) {
      std::fprintf(stderr, "gatherer-worker: --metrics: %s\n", s.ToString().c_str());
      worker.stop();
      return 1;
    }
    gatherer::Logger().info("worker {}: metrics at http://{}/metrics", worker.id(), metrics_address);
  }
  // Until a signal, or until the broker asked this worker to drain
  // (gatherer-ctl drain, PROTOCOL.md §3.9.5) and it has.
  bool signalled = false;
  while (!worker.drained()) {
    const int sig = gatherer::WaitForTerminationSignal(std::chrono::milliseconds(50));
    if (sig == 0) continue;
    if (signalled) {
      gatherer::Logger().warn("worker {}: signal {} during drain, stopping now", worker.id(), sig);
      break;
    }
    signalled = true;
    gatherer::Logger().info("worker {}: signal {}, draining (a second signal stops at once)", worker.id(), sig);
    worker.drain(std::chrono::milliseconds(drain_ms));
  }
  worker.stop();
  return 0;
}
