// round-trip: latency one statement at a time, through a tcp broker and one
// worker process, next to a direct libcurl fetch of the same URL (a reused
// easy handle, keep-alive), alternating, on loopback (README, "Benchmarks": "one
// statement round trip via broker"). Prints p50/p99 of each and the added
// latency.
//   round-trip BUILD_DIR [count=10000]
#include <curl/curl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gatherer/gatherer.h"
#include "free_port.h"
#include "http_server.h"
#include "process.h"

namespace {

size_t Discard(char*, size_t size, size_t n, void*) { return size * n; }

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1))];
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: round-trip BUILD_DIR [count]\n");
    return 2;
  }
  const std::string build = argv[1];
  const int count = argc > 2 ? std::atoi(argv[2]) : 10'000;
  gatherer::testing::HttpServer server;
  const std::string url = server.url("/one");
  const std::string ep = gatherer::testing::FreeTcpEndpoint();
  using gatherer::testing::Process;
  Process broker({build + "/broker/gatherer-broker", "--bind", ep, "--log-level", "error"});
  Process worker({build + "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--log-level", "error"});

  curl_global_init(CURL_GLOBAL_DEFAULT);
  CURL* easy = curl_easy_init();
  curl_easy_setopt(easy, CURLOPT_URL, url.c_str());
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, Discard);
  gatherer::Gatherer g({.broker = ep, .workers = 1, .log_level = 40});
  g.statements = {gatherer::Get(url)};
  g.gather();  // warm: session opened on the worker, connection made
  curl_easy_perform(easy);

  std::vector<double> direct, via;
  direct.reserve(count);
  via.reserve(count);
  for (int i = 0; i < count; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    if (curl_easy_perform(easy) != CURLE_OK) return 1;
    auto t1 = std::chrono::steady_clock::now();
    const auto& r = g.gather();
    auto t2 = std::chrono::steady_clock::now();
    if (r.at(0).status != 200) return 1;
    direct.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    via.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  curl_easy_cleanup(easy);
  const double d50 = Percentile(direct, 0.5), d99 = Percentile(direct, 0.99);
  const double v50 = Percentile(via, 0.5), v99 = Percentile(via, 0.99);
  std::printf("%d sequential requests on loopback\n", count);
  std::printf("| path | p50 us | p99 us |\n|---|---|---|\n");
  std::printf("| direct libcurl (reused handle) | %.0f | %.0f |\n", d50, d99);
  std::printf("| gather() via tcp broker + 1 worker | %.0f | %.0f |\n", v50, v99);
  std::printf("| added by Gatherer | %.0f | %.0f | (target < 1000 at p99)\n", v50 - d50, v99 - d99);
  return 0;
}
