// broker-routing: statements per second through client + broker alone
// (README, "Benchmarks"). Starts gatherer-broker and K
// `gatherer-worker --echo` processes on tcp loopback, then streams N
// statements from a lazy source through one Gatherer (completion order) and
// prints the rate; repeats `runs` times and prints the median.
//   broker-routing BUILD_DIR [N=1000000] [window=4096] [workers=1] [runs=3] [metrics=off|on|both]
// metrics=on starts broker and workers with --metrics and scrapes both
// /metrics every 200 ms while it runs; metrics=both runs two clusters, one
// without metrics and one with, alternating runs, and prints the ratio of
// the medians (the cost of metrics, measured in one run).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <curl/curl.h>

#include "gatherer/gatherer.h"
#include "free_port.h"
#include "process.h"

namespace {

using gatherer::testing::Process;

struct Cluster {
  std::string endpoint;
  std::unique_ptr<Process> broker;
  std::vector<std::unique_ptr<Process>> workers;
  std::vector<std::string> metrics_urls;
  std::unique_ptr<gatherer::Gatherer> gatherer;
  std::vector<double> rates;
  std::uint64_t scrapes = 0;
};

std::unique_ptr<Cluster> Start(const std::string& build, int worker_count, int window, bool metrics) {
  auto c = std::make_unique<Cluster>();
  c->endpoint = gatherer::testing::FreeTcpEndpoint();
  std::vector<std::string> argv = {build + "/broker/gatherer-broker", "--bind", c->endpoint, "--log-level", "error"};
  const auto with_metrics = [&](std::vector<std::string>& args) {
    if (!metrics) return;
    const std::string address = "127.0.0.1:" + std::to_string(gatherer::testing::FreeTcpPort());
    args.push_back("--metrics");
    args.push_back(address);
    c->metrics_urls.push_back("http://" + address + "/metrics");
  };
  with_metrics(argv);
  c->broker = std::make_unique<Process>(argv);
  for (int i = 0; i < worker_count; ++i) {
    std::vector<std::string> w = {build + "/worker/gatherer-worker", "--broker", c->endpoint, "--echo",
                                  "--io-threads", "1", "--log-level", "error"};
    with_metrics(w);
    c->workers.push_back(std::make_unique<Process>(w));
  }
  c->gatherer = std::make_unique<gatherer::Gatherer>(gatherer::Options{.broker = c->endpoint, .workers = window, .log_level = 40});
  return c;
}

// One run of n statements; 0 on failure.
double Run(Cluster& c, std::uint64_t n) {
  std::atomic<bool> over{false};
  std::thread scraper([&] {
    if (c.metrics_urls.empty()) return;
    CURL* easy = curl_easy_init();
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, +[](char*, size_t size, size_t k, void*) { return size * k; });
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, 1000L);
    while (!over.load()) {
      for (const auto& url : c.metrics_urls) {
        curl_easy_setopt(easy, CURLOPT_URL, url.c_str());
        if (curl_easy_perform(easy) == CURLE_OK) ++c.scrapes;
      }
      for (int i = 0; i < 20 && !over.load(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    curl_easy_cleanup(easy);
  });
  std::uint64_t next = 0, got = 0;
  auto source = [&](gatherer::Statement& out) {
    if (next == n) return false;
    ++next;
    out.url = "http://127.0.0.1:9/echo";  // reuses the slot's capacity after the first round
    return true;
  };
  bool ok = true;
  const auto t0 = std::chrono::steady_clock::now();
  for (auto& item : c.gatherer->stream(source, gatherer::Order::kCompletion)) {
    if (item.response.status != 200) {
      std::fprintf(stderr, "statement %llu failed\n", static_cast<unsigned long long>(item.index));
      ok = false;
      break;
    }
    ++got;
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  over.store(true);
  scraper.join();
  if (!ok || got != n) return 0;
  return static_cast<double>(n) / s;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: broker-routing BUILD_DIR [N] [window] [workers] [runs] [metrics=off|on|both]\n");
    return 2;
  }
  const std::string build = argv[1];
  const std::uint64_t n = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1'000'000;
  const int window = argc > 3 ? std::atoi(argv[3]) : 4096;
  const int worker_count = argc > 4 ? std::atoi(argv[4]) : 1;
  const int runs = argc > 5 ? std::atoi(argv[5]) : 3;
  const std::string metrics = argc > 6 ? argv[6] : "off";
  if (metrics != "off" && metrics != "on" && metrics != "both") {
    std::fprintf(stderr, "metrics must be off, on or both\n");
    return 2;
  }
  curl_global_init(CURL_GLOBAL_DEFAULT);
  std::vector<std::unique_ptr<Cluster>> clusters;
  std::vector<const char*> names;
  if (metrics != "on") {
    clusters.push_back(Start(build, worker_count, window, false));
    names.push_back("metrics off");
  }
  if (metrics != "off") {
    clusters.push_back(Start(build, worker_count, window, true));
    names.push_back("metrics on");
  }
  for (int run = 0; run < runs; ++run) {
    for (std::size_t i = 0; i < clusters.size(); ++i) {
      const double rate = Run(*clusters[i], n);
      if (rate == 0) return 1;
      clusters[i]->rates.push_back(rate);
      std::printf("run %d (%s): %llu statements = %.0f statements/s\n", run, names[i],
                  static_cast<unsigned long long>(n), rate);
    }
  }
  for (std::size_t i = 0; i < clusters.size(); ++i) {
    std::printf("broker routing, window %d, %d echo worker(s), %s: median %.0f statements/s (target >= 1,000,000)%s\n",
                window, worker_count, names[i], Median(clusters[i]->rates),
                clusters[i]->metrics_urls.empty()
                    ? ""
                    : (", " + std::to_string(clusters[i]->scrapes) + " scrapes of /metrics during the runs").c_str());
  }
  if (clusters.size() == 2) {
    std::printf("metrics on / off: %.3f\n", Median(clusters[1]->rates) / Median(clusters[0]->rates));
  }
  return 0;
}
