// stream-vs-gather: the same N GETs through gather() (all responses kept) and
// through an input-order stream from a lazy source (bounded memory), side by
// side in one process against the same local server, alternating.
//   stream-vs-gather [N=100000] [workers=256] [runs=3]
// Prints req/s per run and the medians; asserts nothing about speed, but
// checks every response (count, order, status, body).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "gatherer/gatherer.h"
#include "http_server.h"

namespace {
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int main(int argc, char** argv) {
  const std::uint64_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 100'000;
  const int workers = argc > 2 ? std::atoi(argv[2]) : 256;
  const int runs = argc > 3 ? std::atoi(argv[3]) : 3;
  gatherer::testing::HttpServer server;  // body "ok:<target>"
  const std::string prefix = server.url("/item/");
  gatherer::Gatherer g({.workers = workers, .log_level = 40});
  std::vector<double> gather_rates, stream_rates;
  for (int run = 0; run < runs; ++run) {
    {
      g.statements.clear();
      g.statements.reserve(n);
      for (std::uint64_t i = 0; i < n; ++i) g.statements.push_back(gatherer::Get(prefix + std::to_string(i)));
      const auto t0 = std::chrono::steady_clock::now();
      const auto& r = g.gather();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      for (std::uint64_t i = 0; i < n; ++i) {
        if (r[i].status != 200 || r[i].body != "ok:/item/" + std::to_string(i)) {
          std::fprintf(stderr, "gather: wrong response at %llu\n", static_cast<unsigned long long>(i));
          return 1;
        }
      }
      gather_rates.push_back(static_cast<double>(n) / s);
      g.statements = {};
      g.responses = {};
    }
    {
      std::uint64_t next = 0, expected = 0;
      auto source = [&](gatherer::Statement& out) {
        if (next == n) return false;
        out.url = prefix + std::to_string(next++);
        return true;
      };
      const auto t0 = std::chrono::steady_clock::now();
      for (auto& item : g.stream(source)) {
        if (item.index != expected || item.response.status != 200 ||
            item.response.body != "ok:/item/" + std::to_string(expected)) {
          std::fprintf(stderr, "stream: wrong response at %llu\n", static_cast<unsigned long long>(expected));
          return 1;
        }
        ++expected;
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (expected != n) return 1;
      stream_rates.push_back(static_cast<double>(n) / s);
    }
    std::printf("run %d: gather %.0f req/s, stream %.0f req/s\n", run, gather_rates.back(), stream_rates.back());
  }
  std::printf("N = %llu, workers = %d: gather() median %.0f req/s, stream median %.0f req/s, ratio %.2f\n",
              static_cast<unsigned long long>(n), workers, Median(gather_rates), Median(stream_rates),
              Median(stream_rates) / Median(gather_rates));
  return 0;
}
