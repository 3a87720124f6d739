// Worker tests with a real Broker and Gatherer over tcp.
#include "gatherer/worker.h"

#include <gtest/gtest.h>

#include "gatherer/broker.h"
#include "gatherer/gatherer.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;

// WorkerOptions::echo answers without HTTP: the URLs point nowhere, and
// every statement still gets an empty 200, in order, exactly once.
TEST(WorkerTest, EchoModeAnswersWithoutHttp) {
  BrokerOptions bo;
  bo.endpoints = {"tcp://127.0.0.1:*"};
  Broker broker(bo);
  ASSERT_TRUE(broker.start().ok());
  WorkerOptions wo;
  wo.broker = broker.endpoints()[0];
  wo.echo = true;
  wo.io_threads = 1;
  Worker worker(wo);
  ASSERT_TRUE(worker.start().ok());
  Gatherer g({.broker = broker.endpoints()[0], .workers = 100, .log_level = 40});
  for (int i = 0; i < 5000; ++i) g.statements.push_back(Get("http://127.0.0.1:9/never/" + std::to_string(i)));
  const auto& r = g.gather();
  ASSERT_EQ(r.size(), 5000u);
  for (const auto& resp : r) {
    ASSERT_TRUE(resp.ok());
    ASSERT_EQ(resp.status, 200);
    ASSERT_TRUE(resp.body.empty());
    ASSERT_EQ(resp.worker, worker.id());
  }
  EXPECT_EQ(worker.stats().completed.load(), 5000u);
}

}  // namespace
}  // namespace gatherer
