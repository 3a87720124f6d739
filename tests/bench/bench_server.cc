// gatherer-bench-server: the test HTTP server as a process, for benchmarks and
// the README's figures. Serves a ~600-byte JSON document on every path,
// optionally after a delay, on 127.0.0.1 (or --bind ADDR). Prints "port <n>"
// on stdout, then serves until SIGTERM or SIGINT; prints "requests <n>" on
// stderr at exit.
//
// GET /_stats/requests answers at once (no delay) with the number of other
// requests served so far, so a benchmark can check that each row sent exactly
// its N requests without stopping the server; those reads are not counted.
//
// --bind ADDR listens on that IPv4 address instead of 127.0.0.1 (the netns
// fault test runs the server in a network namespace of its own).
// --count-paths also counts requests per method and target: then
// GET /_stats/paths answers at once with one "METHOD TARGET COUNT" line per
// pair seen, and GET /_stats/paths?min=K only with those seen K times or
// more (neither read is counted).
#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>

#include <unistd.h>

#include "http_server.h"

int main(int argc, char** argv) {
  int delay_ms = 0;
  std::string bind_address = "127.0.0.1";
  bool count_paths = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--count-paths") == 0) {
      count_paths = true;
    } else if (i + 1 < argc && std::strcmp(argv[i], "--delay-ms") == 0) {
      delay_ms = std::atoi(argv[++i]);
    } else if (i + 1 < argc && std::strcmp(argv[i], "--bind") == 0) {
      bind_address = argv[++i];
    }
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
  constexpr std::string_view kPathsPath = "/_stats/paths";
  std::atomic<std::uint64_t> served{0};
  // Only touched by the handler, which runs on the server's one thread.
  std::unordered_map<std::string, std::uint64_t> per_path;
  gatherer::testing::HttpServer server([&](const gatherer::testing::HttpRequest& request) {
    gatherer::testing::HttpReply r;
    if (request.target == kStatsPath) {
      r.headers = {{"Content-Type", "text/plain"}};
      r.body = std::to_string(served.load(std::memory_order_relaxed));
      return r;
    }
    if (count_paths && request.target.starts_with(kPathsPath)) {
      const auto min_at = request.target.find("?min=");
      const std::uint64_t min =
          min_at == std::string::npos ? 1 : std::strtoull(request.target.c_str() + min_at + 5, nullptr, 10);
      r.headers = {{"Content-Type", "text/plain"}};
      for (const auto& [key, count] : per_path) {
        if (count >= min) r.body += key + " " + std::to_string(count) + "\n";
      }
      return r;
    }
    if (count_paths) ++per_path[request.method + " " + request.target];
    served.fetch_add(1, std::memory_order_relaxed);
    r.headers = {{"Content-Type", "application/json"}};
    r.body = body;
    r.delay = std::chrono::milliseconds(delay_ms);
    return r;
  }, bind_address);
  std::printf("port %u\n", server.port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&set, &sig);
  std::fprintf(stderr, "requests %llu\n", static_cast<unsigned long long>(served.load()));
  return 0;
}
