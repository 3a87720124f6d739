#pragma once
// What the fault and integration tests start: a broker in-process on tcp
// loopback or as a gatherer-broker process, and gatherer-worker processes
// (real processes, to be SIGKILLed or SIGTERMed), with one heartbeat period
// for broker and workers (PROTOCOL.md §3.4.6); a whole cluster in-process is
// local_cluster.h. Header-only: a test that includes it links
// gatherer::broker, which the test support library itself does not; the
// process starters need GATHERER_BIN_DIR (the build tree) defined by the
// test target.

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/broker.h"
#include "process.h"

namespace gatherer::testing {

inline std::unique_ptr<Broker> StartLoopbackBroker(std::chrono::milliseconds heartbeat) {
  BrokerOptions o;
  o.endpoints = {"tcp://127.0.0.1:*"};
  o.heartbeat_interval = heartbeat;
  auto broker = std::make_unique<Broker>(o);
  EXPECT_TRUE(broker->start().ok());
  return broker;
}

// `binary` (a path below the build tree) run with `args`, then `extra`.
inline std::unique_ptr<Process> StartBinary(const std::string& binary, std::vector<std::string> args,
                                            const std::vector<std::string>& extra) {
  std::string path = GATHERER_BIN_DIR;
  path += '/';
  path += binary;
  args.insert(args.begin(), std::move(path));
  args.insert(args.end(), extra.begin(), extra.end());
  return std::make_unique<Process>(std::move(args));
}

// gatherer-broker bound at `endpoint`, logging errors only; `extra` flags
// appended.
inline std::unique_ptr<Process> StartBrokerProcess(const std::string& endpoint, std::chrono::milliseconds heartbeat,
                                                   const std::vector<std::string>& extra = {}) {
  return StartBinary("broker/gatherer-broker",
                     {"--bind", endpoint, "--heartbeat-ms", std::to_string(heartbeat.count()), "--log-level", "error"},
                     extra);
}

// gatherer-worker on `broker` with one I/O thread, logging errors only;
// `extra` flags appended.
inline std::unique_ptr<Process> StartWorkerProcess(const std::string& broker, std::chrono::milliseconds heartbeat,
                                                   const std::vector<std::string>& extra = {}) {
  return StartBinary("worker/gatherer-worker",
                     {"--broker", broker, "--io-threads", "1", "--heartbeat-ms", std::to_string(heartbeat.count()),
                      "--log-level", "error"},
                     extra);
}

}  // namespace gatherer::testing
