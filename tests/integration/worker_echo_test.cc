// A whole pipeline in one process (LocalCluster: broker and worker
// in-process, a Gatherer over tcp) with the worker in echo mode. Here rather
// than among the worker's unit tests, which link the worker alone.
#include <gtest/gtest.h>

#include "gatherer/gatherer.h"
#include "local_cluster.h"

namespace gatherer {
namespace {

// WorkerOptions::echo answers without HTTP: the URLs point nowhere, and
// every statement still gets an empty 200, in order, exactly once.
TEST(WorkerTest, EchoModeAnswersWithoutHttp) {
  testing::LocalCluster cluster;
  WorkerOptions wo;
  wo.echo = true;
  wo.io_threads = 1;
  ASSERT_TRUE(cluster.start(1, wo));
  Worker& worker = cluster.worker(0);
  Gatherer g({.broker = cluster.endpoint(), .workers = 100, .log_level = 40});
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
