// /metrics of gatherer-broker and gatherer-worker scraped by a real
// Prometheus (Debian's prometheus package): a job runs through a live
// broker and worker on loopback, and Prometheus' query API must report the
// broker's done counter equal to the job's statements, the worker's 429s by
// host, retries by cause and histogram counts; `promtool check metrics`
// accepts both endpoints. Skipped, saying so, when prometheus or promtool
// is not installed.

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <curl/curl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "http_get.h"
#include "free_port.h"
#include "gatherer/gatherer.h"
#include "http_server.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using nlohmann::json;
using testing::HttpReply;
using testing::HttpRequest;
using testing::HttpServer;
using testing::Process;
using testing::HttpGet;
using testing::WaitFor;

const std::string kBin = GATHERER_BIN_DIR;
constexpr const char* kPrometheus = "/usr/bin/prometheus";
constexpr const char* kPromtool = "/usr/bin/promtool";

std::string UrlEncode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '_' || c == '-' || c == '.') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// The value of a PromQL instant query with one result; -1 when none (yet).
double Query(std::uint16_t port, const std::string& promql) {
  const std::string text =
      HttpGet("http://127.0.0.1:" + std::to_string(port) + "/api/v1/query?query=" + UrlEncode(promql));
  const json j = json::parse(text, nullptr, false);
  if (!j.is_object() || j.value("status", "") != "success") return -1;
  const auto& result = j["data"]["result"];
  if (!result.is_array() || result.size() != 1) return -1;
  return std::stod(result[0]["value"][1].get<std::string>());
}

HttpReply Handler(const HttpRequest& req) {
  HttpReply r;
  if (req.target.rfind("/throttle", 0) == 0) {
    r.status = 429;
    r.headers = {{"Retry-After", "0"}};
  } else {
    r.body = std::string(100, 'x');
  }
  return r;
}

TEST(MetricsTest, PrometheusScrapesBrokerAndWorker) {
  if (::access(kPrometheus, X_OK) != 0 || ::access(kPromtool, X_OK) != 0) {
    GTEST_SKIP() << "prometheus or promtool not installed (Debian package prometheus); not tested";
  }
  HttpServer server(Handler);
  const std::string ep = testing::FreeTcpEndpoint();
  const std::uint16_t broker_port = testing::FreeTcpPort();
  const std::uint16_t worker_port = testing::FreeTcpPort();
  const std::uint16_t prom_port = testing::FreeTcpPort();
  Process broker({kBin + "/broker/gatherer-broker", "--bind", ep, "--heartbeat-ms", "200", "--metrics",
                  "127.0.0.1:" + std::to_string(broker_port), "--log-level", "error"});
  Process worker({kBin + "/worker/gatherer-worker", "--broker", ep, "--heartbeat-ms", "200", "--io-threads", "1",
                  "--id", "mw1", "--metrics", "127.0.0.1:" + std::to_string(worker_port), "--log-level", "error"});

  const auto dir = std::filesystem::temp_directory_path() / ("gatherer-prom-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  {
    std::ofstream config(dir / "prometheus.yml");
    config << "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n"
           << "scrape_configs:\n"
           << "  - job_name: broker\n    static_configs:\n      - targets: ['127.0.0.1:" << broker_port << "']\n"
           << "  - job_name: worker\n    static_configs:\n      - targets: ['127.0.0.1:" << worker_port << "']\n";
  }
  Process prometheus({kPrometheus, "--config.file=" + (dir / "prometheus.yml").string(),
                      "--storage.tsdb.path=" + (dir / "data").string(),
                      "--web.listen-address=127.0.0.1:" + std::to_string(prom_port), "--log.level=error"});

  constexpr int kOk = 300, kThrottled = 10;
  {
    Options o{.broker = ep, .workers = 50, .log_level = 50};
    o.settings.max_attempts = 2;
    Gatherer g(o);
    for (int i = 0; i < kOk; ++i) g.statements.push_back(Get(server.url("/ok/" + std::to_string(i))));
    for (int i = 0; i < kThrottled; ++i) g.statements.push_back(Get(server.url("/throttle/" + std::to_string(i))));
    const auto& responses = g.gather();
    ASSERT_EQ(responses.size(), static_cast<std::size_t>(kOk + kThrottled));
    int failed = 0;
    for (const auto& r : responses) failed += r.ok() ? 0 : 1;
    ASSERT_EQ(failed, kThrottled);
  }

  // Prometheus has scraped both after the job: its numbers are the job's.
  const int total = kOk + kThrottled;
  // Deadlines generous for Prometheus' Go tools, which have stalled for over
  // 10 s starting beside the sanitizer builds' tests on two cores.
  EXPECT_TRUE(WaitFor([&] { return Query(prom_port, "gatherer_broker_statements_done_total") == total; }, 45s))
      << "done as Prometheus sees it: " << Query(prom_port, "gatherer_broker_statements_done_total")
      << "; prometheus stderr: " << prometheus.stderr_text();
  EXPECT_TRUE(WaitFor([&] { return Query(prom_port, "gatherer_worker_statements_done_total") == total; }, 5s));
  EXPECT_EQ(Query(prom_port, "gatherer_broker_statements_failed_total"), kThrottled);
  EXPECT_EQ(Query(prom_port, "sum(up)"), 2);
  EXPECT_EQ(Query(prom_port, "gatherer_worker_request_duration_seconds_count"), total);
  EXPECT_EQ(Query(prom_port, "gatherer_worker_response_body_bytes_count"), total);
  EXPECT_EQ(Query(prom_port, "gatherer_worker_retries_total{cause=\"http_429\"}"), kThrottled);
  EXPECT_EQ(Query(prom_port, "gatherer_worker_http_429_total{host=\"127.0.0.1:" + std::to_string(server.port()) + "\"}"),
            2 * kThrottled);
  EXPECT_EQ(Query(prom_port, "gatherer_broker_worker_done_total{worker=\"mw1\"}"), total);
  EXPECT_EQ(Query(prom_port, "gatherer_broker_worker_state{worker=\"mw1\",state=\"idle\"}"), 1);

  // promtool accepts both expositions as they are.
  for (const std::uint16_t port : {broker_port, worker_port}) {
    const std::string text = HttpGet("http://127.0.0.1:" + std::to_string(port) + "/metrics");
    ASSERT_FALSE(text.empty()) << port;
    Process check({kPromtool, "check", "metrics"}, text);
    const auto exit = check.wait(30s);
    ASSERT_TRUE(exit.has_value());
    EXPECT_EQ(*exit, 0) << check.stdout_text() << check.stderr_text();
  }
  prometheus.kill(SIGTERM);
  prometheus.wait(5s);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace gatherer
