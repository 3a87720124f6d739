#pragma once
// A whole cluster in one process: a Broker on tcp loopback and in-process
// Workers, for tests of a whole pipeline without the binaries.
// Header-only: a test that includes it links gatherer::broker and
// gatherer::worker, which the test support library itself does not.
//
// Thread-safety: a LocalCluster belongs to the test thread; the Broker and
// Workers it hands out are as thread-safe as their headers say.

#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "gatherer/broker.h"
#include "gatherer/worker.h"
#include "wait_for.h"

namespace gatherer::testing {

// A Broker on tcp loopback and in-process Workers connected to it, as one
// process runs a whole pipeline (gatherer::Gatherer included) without the
// binaries:
//
//   LocalCluster cluster;
//   ASSERT_TRUE(cluster.start(2, options));
//   Gatherer g({.broker = cluster.endpoint()});
class LocalCluster {
 public:
  // By default the broker binds tcp://127.0.0.1:*, a free port: BrokerOptions'
  // own default is a fixed port, which tests run side by side would fight
  // over (one failed to start its cluster that way). `broker_options` with no
  // endpoints binds a free port too.
  explicit LocalCluster(BrokerOptions broker_options = OnFreePort()) {
    if (broker_options.endpoints.empty()) broker_options.endpoints = OnFreePort().endpoints;
    broker_ = std::make_unique<Broker>(std::move(broker_options));
  }
  static BrokerOptions OnFreePort() {
    BrokerOptions o;
    o.endpoints = {"tcp://127.0.0.1:*"};
    return o;
  }
  // Starts the broker, then `workers` Workers made from `worker_options`
  // with the broker's endpoint; the first that fails to start fails it.
  ::testing::AssertionResult start(int workers, WorkerOptions worker_options = {}) {
    if (auto s = broker_->start(); !s.ok()) return ::testing::AssertionFailure() << "broker: " << s.ToString();
    worker_options.broker = endpoint();
    for (int i = 0; i < workers; ++i) {
      workers_.push_back(std::make_unique<Worker>(worker_options));
      if (auto s = workers_.back()->start(); !s.ok()) {
        return ::testing::AssertionFailure() << "worker " << i << ": " << s.ToString();
      }
    }
    return ::testing::AssertionSuccess();
  }
  // start(), then waits until the broker has registered every worker: the
  // work of a job that starts now is shared between all of them.
  ::testing::AssertionResult start_registered(int workers, WorkerOptions worker_options = {}) {
    if (auto started = start(workers, std::move(worker_options)); !started) return started;
    const auto want = static_cast<std::uint64_t>(workers);
    if (!WaitFor([&] { return broker_->stats().workers.load() == want; })) {
      return ::testing::AssertionFailure() << "the broker registered " << broker_->stats().workers.load() << " of "
                                           << workers << " workers";
    }
    return ::testing::AssertionSuccess();
  }
  const std::string& endpoint() const { return broker_->endpoints().at(0); }
  Broker& broker() { return *broker_; }
  Worker& worker(std::size_t i) { return *workers_.at(i); }

 private:
  // Workers go first: each says goodbye to a broker still there.
  std::unique_ptr<Broker> broker_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace gatherer::testing
