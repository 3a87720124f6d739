// gatherer-bench-server: the test HTTP server as a process, for benchmarks and
// the README's figures. Serves a ~600-byte JSON document on every path,
// optionally after a delay, on 127.0.0.1. Prints "port <n>" on stdout, then
// serves until SIGTERM or SIGINT; prints "requests <n>" on stderr at exit.
//
// GET /_stats/requests answers at once (no delay) with the number of other
// requests served so far, so a benchmark can check that each row sent exactly
// its N requests without stopping the server; those reads are not counted.
#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include <unistd.h>

#include "http_server.h"

int main(int argc, char** argv) {
  int delay_ms = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--delay-ms") == 0) delay_ms = std::atoi(argv[i + 1]);
  }
  std::string body = "{\"id\":1,\"name\":\"player\",\"matches\":[";
  while (body.size() < 580) body += "\"EUW1-0123456789\",";
  body.back() = ']';
  body += "}";
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  constexpr std::string_view kStatsPath = "/_stats/requests";
  std::atomic<std::uint64_t> served{0};
  gatherer::testing::HttpServer server([&](const gatherer::testing::HttpRequest& request) {
    gatherer::testing::HttpReply r;
    if (request.target == kStatsPath) {
      r.headers = {{"Content-Type", "text/plain"}};
      r.body = std::to_string(served.load(std::memory_order_relaxed));
      return r;
    }
    served.fetch_add(1, std::memory_order_relaxed);
    r.headers = {{"Content-Type", "application/json"}};
    r.body = body;
    r.delay = std::chrono::milliseconds(delay_ms);
    return r;
  });
  std::printf("port %u\n", server.port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  std::fprintf(stderr, "requests %llu\n", static_cast<unsigned long long>(served.load()));
  return 0;
}
