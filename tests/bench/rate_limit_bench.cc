// rate-limit-bench: how much of a rate limit Gatherer uses, and how many 429s
// it meets (README, "Benchmarks"), beside the simple per-process
// alternative, in one run against the example game API:
//
//   build/release/tests/bench/rate-limit-bench build/release . [LIMIT] [N]
//
// LIMIT (default 50:1) is the API's application limit, declared to Gatherer
// as is; N (default 500) requests per case. Cases:
//   gatherer, 1 worker / 2 workers: a tcp gatherer-broker and gatherer-worker
//     processes, the limit declared (PROTOCOL.md §3.8);
//   gatherer learned, 2 workers: nothing declared, limits learned from the
//     API's headers;
//   per-worker token bucket x2: two fetchers (threads, one libcurl handle
//     each) each limited to LIMIT / 2 by its own token bucket (capacity
//     count / 2, refilled over the window), retrying a 429 after Retry-After.
// Achieved rate = (admitted - 1) / (last admitted - first admitted), from the
// API's own log; allowed = count / window.
#include <curl/curl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "free_port.h"
#include "gatherer/gatherer.h"
#include "process.h"
#include "wait_for.h"

namespace {
using namespace std::chrono_literals;
using gatherer::testing::Process;
using gatherer::testing::WaitFor;

size_t Sink(char* data, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

struct Reply {
  long status = 0;
  std::string body;
  std::string retry_after;
};

Reply Fetch(CURL* easy, const std::string& url, const char* method = "GET") {
  Reply r;
  curl_easy_setopt(easy, CURLOPT_URL, url.c_str());
  curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, method);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, &Sink);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &r.body);
  curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, +[](char* data, size_t size, size_t n, void* user) -> size_t {
    std::string line(data, size * n);
    if (line.size() > 12 && (line.rfind("Retry-After:", 0) == 0 || line.rfind("retry-after:", 0) == 0)) {
      *static_cast<std::string*>(user) = line.substr(12);
    }
    return size * n;
  });
  curl_easy_setopt(easy, CURLOPT_HEADERDATA, &r.retry_after);
  if (curl_easy_perform(easy) == CURLE_OK) curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &r.status);
  return r;
}

struct Figures {
  long admitted = 0, throttled = 0;
  double span_s = 0;
};

// From /_stats: admitted requests, 429s, first to last admitted.
Figures Read(CURL* easy, const std::string& base) {
  const Reply r = Fetch(easy, base + "/_stats");
  Figures f;
  const std::string& s = r.body;
  auto number = [&](const std::string& key) {
    const auto at = s.find("\"" + key + "\":");
    return at == std::string::npos ? -1L : std::strtol(s.c_str() + at + key.size() + 3, nullptr, 10);
  };
  f.throttled = number("throttled");
  double first = -1, last = -1;
  const auto log = s.find("\"log\":[");
  const char* p = s.c_str() + log + 7;
  double ms = 0;
  int status = 0, used = 0;
  while (log != std::string::npos && std::sscanf(p, "[%lf,%d]%n", &ms, &status, &used) == 2) {
    if (status == 200) {
      ++f.admitted;
      if (first < 0) first = ms;
      last = ms;
    }
    p += used;
    if (*p == ',') ++p;
  }
  f.span_s = (last - first) / 1000.0;
  return f;
}

void Print(const char* name, double allowed, const Figures& f, double wall) {
  const double achieved = f.span_s > 0 ? static_cast<double>(f.admitted - 1) / f.span_s : 0;
  std::printf("| %-34s | %7.1f | %8.1f | %5.1f%% | %5ld | %6.2f |\n", name, allowed, achieved,
              100.0 * achieved / allowed, f.throttled, wall);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s BUILD_DIR SOURCE_DIR [LIMIT count:seconds] [N]\n", argv[0]);
    return 2;
  }
  const std::string bin = argv[1], source = argv[2];
  const std::string limit = argc > 3 ? argv[3] : "50:1";
  const int n = argc > 4 ? std::atoi(argv[4]) : 500;
  const auto windows = gatherer::ParseRateWindows(limit);
  if (!windows || windows->size() != 1) {
    std::fprintf(stderr, "LIMIT must be one count:seconds window\n");
    return 2;
  }
  const double count = (*windows)[0].count, window_s = (*windows)[0].window_ms / 1000.0;
  const double allowed = count / window_s;

  curl_global_init(CURL_GLOBAL_ALL);
  CURL* control = curl_easy_init();
  const auto port = gatherer::testing::FreeTcpPort();
  const std::string base = "http://127.0.0.1:" + std::to_string(port);
  Process api({"/usr/bin/python3", source + "/examples/api_server.py", "--port", std::to_string(port), "--app-limit",
               limit, "--default-method-limit", "1000000:1", "--latency-ms", "1", "--keep-log"});
  if (!WaitFor([&] { return Fetch(control, base + "/_stats").status == 200; }, 10s)) {
    std::fprintf(stderr, "the example API did not start: %s\n", api.stderr_text().c_str());
    return 1;
  }
  std::printf("limit %s (%.1f req/s allowed), %d requests per case\n\n", limit.c_str(), allowed, n);
  std::printf("| case | allowed req/s | achieved req/s | of allowed | 429s | wall s |\n|---|---|---|---|---|---|\n");

  auto statements = [&](int run) {
    std::vector<gatherer::Statement> out;
    for (int i = 0; i < n; ++i) {
      out.push_back(gatherer::Get(base + "/lol/summoner/v4/summoners/R" + std::to_string(run) + "-" + std::to_string(i)));
    }
    return out;
  };
  int run = 0;
  auto gatherer_case = [&](const char* name, int workers, bool declare) {
    const std::string ep = gatherer::testing::FreeTcpEndpoint();
    Process broker({bin + "/broker/gatherer-broker", "--bind", ep, "--log-level", "error"});
    std::vector<std::unique_ptr<Process>> procs;
    for (int i = 0; i < workers; ++i) {
      procs.push_back(std::make_unique<Process>(std::vector<std::string>{
          bin + "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--log-level", "error"}));
    }
    gatherer::Options o{.broker = ep, .workers = 50, .log_level = 40};
    o.settings.max_attempts = 50;
    if (declare) o.settings.rate_limits = {*gatherer::ParseRateRule(limit)};
    else o.settings.learn_rate_limits = true;
    {
      // Warm: every worker registered and connected to the API.
      gatherer::Gatherer warm({.broker = ep, .workers = 8, .log_level = 40});
      for (int i = 0; i < 8; ++i) warm.statements.push_back(gatherer::Get(base + "/players/" + std::to_string(i)));
      warm.gather();
    }
    Fetch(control, base + "/_reset", "POST");
    gatherer::Gatherer g(o);
    g.statements = statements(++run);
    const auto start = std::chrono::steady_clock::now();
    const auto& responses = g.gather();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (const auto& r : responses) {
      if (!r.ok()) std::fprintf(stderr, "%s: a statement failed: %s\n", name, r.error->message.c_str());
    }
    Print(name, allowed, Read(control, base), wall);
  };
  gatherer_case("Gatherer, 1 worker, declared", 1, true);
  gatherer_case("Gatherer, 2 workers, declared", 2, true);
  gatherer_case("Gatherer, 2 workers, learned", 2, false);

  {
    // Per-worker token buckets: each fetcher holds count / 2 per window.
    Fetch(control, base + "/_reset", "POST");
    ++run;
    std::atomic<int> next{0};
    const double share = count / 2;
    const auto start = std::chrono::steady_clock::now();
    auto fetcher = [&] {
      CURL* easy = curl_easy_init();
      double tokens = share;
      auto refilled = std::chrono::steady_clock::now();
      for (int i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        const std::string url = base + "/lol/summoner/v4/summoners/R" + std::to_string(run) + "-" + std::to_string(i);
        for (int attempt = 0; attempt < 50; ++attempt) {
          for (;;) {
            const auto now = std::chrono::steady_clock::now();
            tokens = std::min(share, tokens + std::chrono::duration<double>(now - refilled).count() * share / window_s);
            refilled = now;
            if (tokens >= 1) break;
            std::this_thread::sleep_for(std::chrono::duration<double>((1 - tokens) * window_s / share));
          }
          tokens -= 1;
          const Reply r = Fetch(easy, url);
          if (r.status != 429) break;
          std::this_thread::sleep_for(std::chrono::seconds(std::max(1, std::atoi(r.retry_after.c_str()))));
        }
      }
      curl_easy_cleanup(easy);
    };
    std::thread a(fetcher), b(fetcher);
    a.join();
    b.join();
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    Print("per-worker token bucket, 2 workers", allowed, Read(control, base), wall);
  }
  curl_easy_cleanup(control);
  curl_global_cleanup();
  return 0;
}
