// broker-routing: statements per second through client + broker alone
// (README, "Benchmarks"). Starts gatherer-broker and K
// `gatherer-worker --echo` processes on tcp loopback, then streams N
// statements from a lazy source through one Gatherer (completion order) and
// prints the rate; repeats `runs` times and prints the median.
//   broker-routing BUILD_DIR [N=1000000] [window=4096] [workers=1] [runs=3]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "gatherer/gatherer.h"
#include "free_port.h"
#include "process.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: broker-routing BUILD_DIR [N] [window] [workers] [runs]\n");
    return 2;
  }
  const std::string build = argv[1];
  const std::uint64_t n = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1'000'000;
  const int window = argc > 3 ? std::atoi(argv[3]) : 4096;
  const int worker_count = argc > 4 ? std::atoi(argv[4]) : 1;
  const int runs = argc > 5 ? std::atoi(argv[5]) : 3;
  const std::string ep = gatherer::testing::FreeTcpEndpoint();
  using gatherer::testing::Process;
  Process broker({build + "/broker/gatherer-broker", "--bind", ep, "--log-level", "error"});
  std::vector<std::unique_ptr<Process>> workers;
  for (int i = 0; i < worker_count; ++i) {
    workers.push_back(std::make_unique<Process>(std::vector<std::string>{
        build + "/worker/gatherer-worker", "--broker", ep, "--echo", "--io-threads", "1", "--log-level", "error"}));
  }
  std::vector<double> rates;
  gatherer::Gatherer g({.broker = ep, .workers = window, .log_level = 40});
  for (int run = 0; run < runs; ++run) {
    std::uint64_t next = 0, got = 0;
    auto source = [&](gatherer::Statement& out) {
      if (next == n) return false;
      ++next;
      out.url = "http://127.0.0.1:9/echo";  // reuses the slot's capacity after the first round
      return true;
    };
    const auto t0 = std::chrono::steady_clock::now();
    for (auto& item : g.stream(source, gatherer::Order::kCompletion)) {
      if (item.response.status != 200) {
        std::fprintf(stderr, "statement %llu failed\n", static_cast<unsigned long long>(item.index));
        return 1;
      }
      ++got;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (got != n) return 1;
    rates.push_back(static_cast<double>(n) / s);
    std::printf("run %d: %llu statements in %.2f s = %.0f statements/s\n", run, static_cast<unsigned long long>(n), s,
                rates.back());
  }
  std::sort(rates.begin(), rates.end());
  std::printf("broker routing, window %d, %d echo worker(s): median %.0f statements/s (target >= 1,000,000)\n",
              window, worker_count, rates[rates.size() / 2]);
  return 0;
}
