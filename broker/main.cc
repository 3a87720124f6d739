// gatherer-broker: parse flags, build BrokerOptions, run until SIGINT/SIGTERM,
// then drain: refuse new sessions and exit once the open ones have ended or
// --drain-timeout-ms passed. A second signal stops at once. Every flag can
// also be set by an environment variable (GATHERER_BIND, ...; shown in
// --help); a flag given on the command line wins.
#include <csignal>

#include <unistd.h>

#include <CLI/CLI.hpp>

#include "gatherer/allocator.h"
#include "gatherer/broker.h"
#include "gatherer/log.h"
#include "gatherer/signals.h"
#include "metrics_http.h"

int main(int argc, char** argv) {
  gatherer::TuneAllocatorForBodies();
  gatherer::BrokerOptions options;
  std::vector<std::string> binds;
  std::string log_level = "info";
  int heartbeat_ms = static_cast<int>(options.heartbeat_interval.count());
  CLI::App app{"gatherer-broker: owns Gatherer sessions and queues and dispatches statements to workers"};
  app.add_option("--bind", binds,
                 "Endpoint to bind; repeatable, or comma-separated (default tcp://127.0.0.1:5555: this machine only)")
      ->delimiter(',')
      ->envname("GATHERER_BIND");
  app.add_option("--heartbeat-ms", heartbeat_ms, "Heartbeat period in ms")
      ->check(CLI::Range(10, 60'000))
      ->envname("GATHERER_HEARTBEAT_MS");
  app.add_option("--liveness", options.heartbeat_liveness, "Missed heartbeats before a worker is presumed dead")
      ->check(CLI::Range(1, 100))
      ->envname("GATHERER_LIVENESS");
  std::string curve_key, curve_clients, curve_workers, curve_operators;
  app.add_option("--curve-key", curve_key,
                 "CURVE: this broker's key pair file (gatherer keygen); encrypts every connection and admits only "
                 "the keys listed by --curve-clients and --curve-workers")
      ->envname("GATHERER_CURVE_KEY");
  app.add_option("--curve-clients", curve_clients,
                 "CURVE: public keys of the clients to admit: a file (one key per line) or a directory of .pub files")
      ->envname("GATHERER_CURVE_CLIENTS");
  app.add_option("--curve-workers", curve_workers,
                 "CURVE: public keys of the workers to admit (they are handed users' requests)")
      ->envname("GATHERER_CURVE_WORKERS");
  app.add_option("--curve-operators", curve_operators,
                 "CURVE: public keys allowed to use gatherer-ctl (status, cancel, drain, shutdown); none = nobody")
      ->envname("GATHERER_CURVE_OPERATORS");
  int session_ttl_ms = static_cast<int>(options.session_ttl.count());
  app.add_option("--session-ttl-ms", session_ttl_ms,
                 "A session whose client is silent this long is cancelled and forgotten")
      ->check(CLI::Range(100, 86'400'000))
      ->envname("GATHERER_SESSION_TTL_MS");
  app.add_option("--max-chunk", options.max_chunk, "Statements per DISPATCH at most")
      ->check(CLI::Range(1, 65536))
      ->envname("GATHERER_MAX_CHUNK");
  app.add_option("--max-sessions", options.max_sessions, "Open sessions at most")->envname("GATHERER_MAX_SESSIONS");
  app.add_option("--max-queued", options.max_queued,
                 "Statements queued and in flight over all sessions at most (SUBMIT past it is refused)")
      ->check(CLI::Range(1ull, 1'000'000'000ull))
      ->envname("GATHERER_MAX_QUEUED");
  app.add_option("--poison-after", options.poison_after,
                 "Workers that may die running a statement alone before it fails as poison")
      ->check(CLI::Range(1, 1000))
      ->envname("GATHERER_POISON_AFTER");
  int drain_ms = 30'000;
  app.add_option("--drain-timeout-ms", drain_ms,
                 "On SIGTERM/SIGINT, time open sessions get to end before the broker exits (0 = exit at once)")
      ->check(CLI::Range(0, 86'400'000))
      ->envname("GATHERER_DRAIN_TIMEOUT_MS");
  app.add_option("--log-level", log_level, "debug, info, warning, error, critical or 10..50")
      ->envname("GATHERER_LOG_LEVEL");
  std::vector<std::string> rate_limits;
  app.add_option("--rate-limit", rate_limits,
                 "Rate limit for sessions that declare none (repeatable): 'COUNT:SECONDS,...' per destination host, "
                 "or '[NAME=][METHOD ]PATH COUNT:SECONDS,...' per endpoint (PROTOCOL.md 3.8)")
      ->envname("GATHERER_RATE_LIMIT");
  std::string metrics_address;
  app.add_option("--metrics", metrics_address,
                 "Serve Prometheus metrics at http://ADDR:PORT/metrics (ADDR:PORT, IPv4; off by default)")
      ->envname("GATHERER_METRICS");
  CLI11_PARSE(app, argc, argv);
  for (const auto& spec : rate_limits) {
    auto rule = gatherer::ParseRateRule(spec);
    if (!rule) {
      std::fprintf(stderr, "gatherer-broker: --rate-limit: malformed '%s' (e.g. 20:1,100:120)\n", spec.c_str());
      return 2;
    }
    options.rate_limits.push_back(std::move(*rule));
  }
  const auto level = gatherer::ParseLogLevel(log_level);
  if (!level) {
    std::fprintf(stderr, "gatherer-broker: --log-level: %s\n", level.error().message().c_str());
    return 2;
  }
  gatherer::SetLogLevel(*level);
  if (!binds.empty()) options.endpoints = binds;
  options.metrics = !metrics_address.empty();
  options.heartbeat_interval = std::chrono::milliseconds(heartbeat_ms);
  options.session_ttl = std::chrono::milliseconds(session_ttl_ms);
  if (!curve_key.empty() || !curve_clients.empty() || !curve_workers.empty() || !curve_operators.empty()) {
    if (curve_key.empty() || curve_clients.empty() || curve_workers.empty()) {
      std::fprintf(stderr, "gatherer-broker: CURVE needs --curve-key, --curve-clients and --curve-workers together\n");
      return 2;
    }
    auto pair = gatherer::ReadCurveKeyPair(curve_key);
    auto clients = gatherer::ReadCurveAllowList(curve_clients);
    auto workers = gatherer::ReadCurveAllowList(curve_workers);
    for (const gatherer::Status* bad : {pair ? nullptr : &pair.error(), clients ? nullptr : &clients.error(),
                                        workers ? nullptr : &workers.error()}) {
      if (bad) {
        std::fprintf(stderr, "gatherer-broker: %s\n", bad->message().c_str());
        return 2;
      }
    }
    options.curve_key = std::move(*pair);
    options.curve_clients = std::move(*clients);
    options.curve_workers = std::move(*workers);
    if (!curve_operators.empty()) {
      auto operators = gatherer::ReadCurveAllowList(curve_operators);
      if (!operators) {
        std::fprintf(stderr, "gatherer-broker: %s\n", operators.error().message().c_str());
        return 2;
      }
      options.curve_operators = std::move(*operators);
    }
  }

  // gatherer-ctl shutdown (PROTOCOL.md §3.9.6): the same drain as SIGTERM.
  options.on_shutdown = [] { ::kill(::getpid(), SIGTERM); };
  gatherer::BlockTerminationSignals();
  gatherer::Broker broker(options);
  if (gatherer::Status s = broker.start(); !s.ok()) {
    std::fprintf(stderr, "gatherer-broker: %s\n", s.ToString().c_str());
    return 1;
  }
  gatherer::MetricsHttpServer metrics([&broker] { return broker.metrics_text(); });
  if (!metrics_address.empty()) {
    if (gatherer::Status s = metrics.start(metrics_address); !s.ok()) {
      std::fprintf(stderr, "gatherer-broker: --metrics: %s\n", s.ToString().c_str());
      return 1;
    }
    gatherer::Logger().info("broker: metrics at http://{}/metrics", metrics_address);
  }
  const int sig = gatherer::WaitForTerminationSignal();
  // Drain first, then say so: once the line is out, a new session is refused.
  broker.drain();
  gatherer::Logger().info("broker: signal {}, draining: no new sessions; {} open (a second signal stops at once)", sig,
                          broker.stats().sessions.load());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(drain_ms);
  while (broker.stats().sessions.load() > 0) {
    if (std::chrono::steady_clock::now() >= deadline) {
      gatherer::Logger().warn("broker: drain deadline passed with {} sessions open", broker.stats().sessions.load());
      break;
    }
    if (const int again = gatherer::WaitForTerminationSignal(std::chrono::milliseconds(50)); again != 0) {
      gatherer::Logger().warn("broker: signal {} during drain, stopping now", again);
      break;
    }
  }
  broker.stop();
  return 0;
}
