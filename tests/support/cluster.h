#pragma once
// What the fault and integration tests start: an in-process broker on tcp
// loopback and gatherer-worker processes (real processes, to be SIGKILLed or
// SIGTERMed), with one heartbeat period for both (PROTOCOL.md §3.4.6); a
// whole cluster in-process is local_cluster.h. Header-only: a test that
// includes it links gatherer::broker, which the test support library itself
// does not; StartWorkerProcess needs GATHERER_BIN_DIR (the build tree)
// defined by the test target.

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

// gatherer-worker on `broker` with one I/O thread; `extra` flags appended.
inline std::unique_ptr<Process> StartWorkerProcess(const std::string& broker, std::chrono::milliseconds heartbeat,
                                                   const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv = {std::string(GATHERER_BIN_DIR) + "/worker/gatherer-worker",
                                   "--broker",
                                   broker,
                                   "--io-threads",
                                   "1",
                                   "--heartbeat-ms",
                                   std::to_string(heartbeat.count()),
                                   "--log-level",
                                   "error"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return std::make_unique<Process>(std::move(argv));
}

}  // namespace gatherer::testing
