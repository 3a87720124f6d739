// gatherer-ctl against a live gatherer-broker process with live
// gatherer-worker processes (PROTOCOL.md §3.9): status, workers, sessions,
// cancel, drain, shutdown and top; a SIGSTOPped worker is shown as
// unresponsive and busy again after SIGCONT, a SIGKILLed one disappears; a
// broker that does not answer makes gatherer-ctl fail within --timeout; a
// rate-limited session's keys in status and in the broker's /metrics.

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <future>
#include <string>
#include <vector>

#include <curl/curl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "http_get.h"
#include "free_port.h"
#include "gatherer/gatherer.h"
#include "handlers.h"
#include "http_server.h"
#include "process.h"
#include "pty_process.h"
#include "statements.h"
#include "wait_for.h"

namespace gatherer {
namespace {
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nlohmann::json;
using testing::DelayHandler;
using testing::Delayed;
using testing::ExpectAllBodies;
using testing::HttpReply;
using testing::HttpRequest;
using testing::HttpServer;
using testing::ReplyGate;
using testing::Process;
using testing::HttpGet;
using testing::WaitFor;

const std::string kBin = GATHERER_BIN_DIR;

struct CtlResult {
  int exit = -1;
  std::string out;
  std::string err;
};

// One gatherer-ctl run; a hang fails the test (the process is killed).
CtlResult Ctl(const std::string& broker, std::vector<std::string> args, std::chrono::milliseconds wait = 10s) {
  std::vector<std::string> argv = {kBin + "/ctl/gatherer-ctl", "--broker", broker};
  argv.insert(argv.end(), args.begin(), args.end());
  Process p(std::move(argv));
  const auto exit = p.wait(wait);
  EXPECT_TRUE(exit.has_value()) << "gatherer-ctl did not exit";
  return {exit.value_or(-1), p.stdout_text(), p.stderr_text()};
}

json CtlJson(const std::string& broker, const std::string& command) {
  const CtlResult r = Ctl(broker, {"--json", command});
  if (r.exit != 0) return json();
  return json::parse(r.out, nullptr, /*allow_exceptions=*/false);
}

// The state of worker `id` in `gatherer-ctl workers --json`; "" when not listed.
std::string WorkerState(const std::string& broker, const std::string& id) {
  const json rows = CtlJson(broker, "workers");
  if (!rows.is_array()) return "no answer";
  for (const auto& w : rows) {
    if (w["id"] == id) return w["state"].get<std::string>();
  }
  return "";
}

class Cluster {
 public:
  // heartbeat 200 ms; liveness 10 periods, so a stopped worker stays
  // listed (unresponsive) for 2 s before it is presumed dead.
  // `broker_args` are added to gatherer-broker's command line.
  explicit Cluster(int workers, int slots = 4, const std::string& liveness = "10",
                   const std::vector<std::string>& broker_args = {})
      : endpoint(testing::FreeTcpEndpoint()) {
    std::vector<std::string> argv = {kBin + "/broker/gatherer-broker", "--bind", endpoint, "--heartbeat-ms", "200",
                                     "--liveness", liveness, "--log-level", "error"};
    argv.insert(argv.end(), broker_args.begin(), broker_args.end());
    broker = std::make_unique<Process>(std::move(argv));
    for (int i = 1; i <= workers; ++i) {
      std::string id = std::to_string(i);
      id.insert(id.begin(), 'w');
      this->workers.push_back(std::make_unique<Process>(std::vector<std::string>{
          kBin + "/worker/gatherer-worker", "--broker", endpoint, "--id", id, "--io-threads", "1", "--slots",
          std::to_string(slots), "--heartbeat-ms", "200", "--log-level", "error"}));
    }
    ready = WaitFor(
        [&] {
          const json s = CtlJson(endpoint, "status");
          return s.is_object() && s["workers"] == workers;
        },
        10s);
  }
  std::string endpoint;
  std::unique_ptr<Process> broker;
  std::vector<std::unique_ptr<Process>> workers;
  bool ready = false;
};

// §3.9: status, workers and sessions while a job runs, as JSON and as
// aligned tables; done counts every statement once the job has ended.
TEST(ControlTest, Clause_3_9_StatusWorkersAndSessionsOfALiveCluster) {
  // The replies are held until the test has looked, so both workers are
  // busy while it does, however slowly gatherer-ctl runs.
  ReplyGate looked;
  HttpServer server([&](const HttpRequest& req) { return looked.hold(DelayHandler(req)); });
  Cluster c(2);
  ASSERT_TRUE(c.ready);
  constexpr int kCount = 48;
  {
    Gatherer g({.broker = c.endpoint, .workers = 8, .log_level = 40});
    g.statements = Delayed(server, kCount, 0);
    auto run = std::async(std::launch::async, [&] { return g.gather(); });
    // Opened on every way out of this block too: a failed ASSERT leaves no
    // run waiting on held replies.
    struct OpenOnExit {
      ReplyGate& gate;
      HttpServer& server;
      ~OpenOnExit() { gate.open(server); }
    } open_on_exit{looked, server};
    // Both workers hold statements: busy.
    EXPECT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1") == "busy" && WorkerState(c.endpoint, "w2") == "busy"; },
                        10s));
    const json workers = CtlJson(c.endpoint, "workers");
    ASSERT_TRUE(workers.is_array());
    ASSERT_EQ(workers.size(), 2u);
    for (const auto& w : workers) {
      EXPECT_EQ(w["slots"], 4);
      EXPECT_GT(w["pid"].get<int>(), 0);
      EXPECT_EQ(w["pid"].get<int>(), w["id"] == "w1" ? c.workers[0]->pid() : c.workers[1]->pid());
      EXPECT_FALSE(w["host"].get<std::string>().empty());
      EXPECT_LE(w["heartbeat_age_ms"].get<int>(), 1000);  // heartbeats every 200 ms
    }
    const json sessions = CtlJson(c.endpoint, "sessions");
    ASSERT_TRUE(sessions.is_array());
    ASSERT_EQ(sessions.size(), 1u);
    EXPECT_EQ(sessions[0]["window"], 8);
    EXPECT_EQ(sessions[0]["client"], "127.0.0.1");
    EXPECT_LE(sessions[0]["in_flight"].get<int>(), 8);
    EXPECT_EQ(sessions[0]["id"].get<std::string>().size(), 36u);
    // Tables: a header, one line per row, columns aligned.
    const CtlResult table = Ctl(c.endpoint, {"workers"});
    EXPECT_EQ(table.exit, 0);
    EXPECT_EQ(table.out.rfind("ID  HOST", 0), 0u) << table.out;
    EXPECT_NE(table.out.find("\nw1  "), std::string::npos) << table.out;
    EXPECT_NE(table.out.find("\nw2  "), std::string::npos) << table.out;
    // Aligned: each row's state starts under STATE. Which state it is depends on the moment (a
    // worker whose share of the job is done is idle again), so both words are taken.
    const auto state_col = table.out.find("STATE");
    std::size_t rows = 0;
    for (auto at = table.out.find('\n'); at != std::string::npos && at + 1 < table.out.size();
         at = table.out.find('\n', at + 1)) {
      const std::string row = table.out.substr(at + 1, table.out.find('\n', at + 1) - at - 1);
      const std::string state = row.size() > state_col ? row.substr(state_col, 4) : "";
      EXPECT_TRUE(state == "busy" || state == "idle") << "row " << rows << " not aligned:\n" << table.out;
      ++rows;
    }
    EXPECT_EQ(rows, 2u) << table.out;
    const CtlResult st = Ctl(c.endpoint, {"status"});
    EXPECT_EQ(st.exit, 0);
    EXPECT_NE(st.out.find("workers       2"), std::string::npos) << st.out;
    EXPECT_NE(st.out.find("rate 10s"), std::string::npos) << st.out;
    looked.open(server);
    ExpectAllBodies(run.get(), kCount);
  }
  EXPECT_TRUE(WaitFor([&] { return CtlJson(c.endpoint, "sessions") == json::array(); }, 5s));
  const json status = CtlJson(c.endpoint, "status");
  ASSERT_TRUE(status.is_object());
  EXPECT_EQ(status["done"], kCount);
  EXPECT_EQ(status["failed"], 0);
  EXPECT_EQ(status["queued"], 0);
  EXPECT_EQ(status["in_flight"], 0);
  EXPECT_EQ(status["sessions"], 0);
  EXPECT_EQ(status["workers"], 2);
  EXPECT_GT(status["rate_10s"].get<double>(), 0.0);
  EXPECT_GT(status["rate_1m"].get<double>(), 0.0);
  EXPECT_FALSE(status["version"].get<std::string>().empty());
  const json workers = CtlJson(c.endpoint, "workers");
  int done = 0;
  for (const auto& w : workers) {
    done += w["done"].get<int>();
    EXPECT_EQ(w["state"], "idle");
  }
  EXPECT_EQ(done, kCount);
}

// §3.9.3: a SIGSTOPped worker (connection up, heartbeats late) is shown as
// unresponsive, busy again after SIGCONT; a SIGKILLed one disappears once
// presumed dead. The job still ends with every response.
TEST(ControlTest, Clause_3_9_3_StoppedWorkerIsUnresponsiveKilledWorkerDisappears) {
  HttpServer server(DelayHandler);
  Cluster c(2);
  ASSERT_TRUE(c.ready);
  // Enough that w2 alone, at its 4 slots, is still at it when w1 resumes: each look through
  // gatherer-ctl takes a good part of a second under a sanitizer, and with 80 statements w1 once
  // came back to a finished job and was never busy again.
  constexpr int kCount = 240;
  Gatherer g({.broker = c.endpoint, .workers = 8, .log_level = 40});
  g.statements = Delayed(server, kCount, 150);
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  ASSERT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1") == "busy"; }, 10s));
  c.workers[0]->kill(SIGSTOP);
  EXPECT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1") == "unresponsive"; }, 3s))
      << "a stopped worker is not shown as unresponsive";
  EXPECT_EQ(WorkerState(c.endpoint, "w2"), "busy");
  c.workers[0]->kill(SIGCONT);
  EXPECT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1") == "busy"; }, 5s))
      << "a resumed worker is not busy again";
  c.workers[0]->kill(SIGKILL);
  const auto killed = Clock::now();
  EXPECT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1").empty(); }, 5s))
      << "a killed worker is still listed";
  EXPECT_GE(Clock::now() - killed, 1s) << "removed before it was presumed dead";
  ExpectAllBodies(run.get(), kCount);
  const json workers = CtlJson(c.endpoint, "workers");
  ASSERT_EQ(workers.size(), 1u);
  EXPECT_EQ(workers[0]["id"], "w2");
}

// §3.9.4: cancel ends a running session: its client's run fails with
// cancelled, the session is gone; an unknown session is an error (exit 1).
TEST(ControlTest, Clause_3_9_4_CancelEndsASessionAndItsClientsRun) {
  HttpServer server(DelayHandler);
  Cluster c(1);
  ASSERT_TRUE(c.ready);
  Gatherer g({.broker = c.endpoint, .workers = 4, .log_level = 50});
  g.statements = Delayed(server, 400, 300);
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  json sessions;
  ASSERT_TRUE(WaitFor(
      [&] {
        sessions = CtlJson(c.endpoint, "sessions");
        return sessions.is_array() && sessions.size() == 1 && sessions[0]["in_flight"] == 4;
      },
      10s));
  const std::string id = sessions[0]["id"];
  const CtlResult cancel = Ctl(c.endpoint, {"cancel", id});
  EXPECT_EQ(cancel.exit, 0) << cancel.err;
  EXPECT_NE(cancel.out.find("cancelled"), std::string::npos) << cancel.out;
  ASSERT_EQ(run.wait_for(5s), std::future_status::ready) << "the client's run did not end";
  try {
    run.get();
    ADD_FAILURE() << "gather() returned after its session was cancelled";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), StatusCode::kCancelled) << e.what();
  }
  EXPECT_EQ(CtlJson(c.endpoint, "sessions"), json::array());
  EXPECT_TRUE(WaitFor([&] { return CtlJson(c.endpoint, "status")["in_flight"] == 0; }, 3s));
  const CtlResult again = Ctl(c.endpoint, {"cancel", id});
  EXPECT_EQ(again.exit, 1);
  EXPECT_NE(again.err.find("not_found"), std::string::npos) << again.err;
  EXPECT_EQ(Ctl(c.endpoint, {"cancel", "not-a-session"}).exit, 2);
}

// §3.9.5: drain makes the worker finish what it holds, take nothing new and
// exit 0; the job ends on the other worker; an unknown worker is an error.
TEST(ControlTest, Clause_3_9_5_DrainedWorkerFinishesAndExits) {
  HttpServer server(DelayHandler);
  Cluster c(2);
  ASSERT_TRUE(c.ready);
  constexpr int kCount = 64;
  Gatherer g({.broker = c.endpoint, .workers = 8, .log_level = 40});
  g.statements = Delayed(server, kCount, 150);
  auto run = std::async(std::launch::async, [&] { return g.gather(); });
  ASSERT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1") == "busy"; }, 10s));
  const CtlResult drain = Ctl(c.endpoint, {"drain", "w1"});
  EXPECT_EQ(drain.exit, 0) << drain.err;
  EXPECT_NE(drain.out.find("w1 draining"), std::string::npos) << drain.out;
  const std::string state = WorkerState(c.endpoint, "w1");
  EXPECT_TRUE(state == "draining" || state.empty()) << state;
  const auto exit = c.workers[0]->wait(10s);
  ASSERT_TRUE(exit.has_value()) << "the drained worker did not exit";
  EXPECT_EQ(*exit, 0);
  ExpectAllBodies(run.get(), kCount);
  EXPECT_TRUE(WaitFor([&] { return WorkerState(c.endpoint, "w1").empty(); }, 3s));
  const CtlResult unknown = Ctl(c.endpoint, {"drain", "nobody"});
  EXPECT_EQ(unknown.exit, 1);
  EXPECT_NE(unknown.err.find("no such worker"), std::string::npos) << unknown.err;
}

// §3.9.6: shutdown is confirmed and the broker exits 0 (no session open);
// afterwards gatherer-ctl fails within --timeout, as it does against a
// broker that is stopped (SIGSTOP: connection accepted, nothing answered).
TEST(ControlTest, Clause_3_9_6_ShutdownAndABrokerThatDoesNotAnswer) {
  Cluster c(0);
  ASSERT_TRUE(c.ready);
  c.broker->kill(SIGSTOP);
  auto start = Clock::now();
  const CtlResult stopped = Ctl(c.endpoint, {"--timeout", "300", "status"});
  EXPECT_EQ(stopped.exit, 1);
  EXPECT_LT(Clock::now() - start, 3s);
  EXPECT_NE(stopped.err.find("did not answer within 300 ms"), std::string::npos) << stopped.err;
  EXPECT_NE(stopped.err.find(c.endpoint), std::string::npos) << stopped.err;
  c.broker->kill(SIGCONT);
  const CtlResult shutdown = Ctl(c.endpoint, {"shutdown"});
  EXPECT_EQ(shutdown.exit, 0) << shutdown.err;
  EXPECT_NE(shutdown.out.find("shutting down"), std::string::npos) << shutdown.out;
  const auto exit = c.broker->wait(5s);
  ASSERT_TRUE(exit.has_value()) << "the broker did not exit";
  EXPECT_EQ(*exit, 0);
  start = Clock::now();
  const CtlResult gone = Ctl(c.endpoint, {"--timeout", "300", "--json", "workers"});
  EXPECT_EQ(gone.exit, 1);
  EXPECT_TRUE(gone.out.empty());
  EXPECT_LT(Clock::now() - start, 3s);
}

// The row of rate key `key` in `gatherer-ctl --json status`; null when not listed.
json RateKey(const std::string& broker, const std::string& key) {
  const json status = CtlJson(broker, "status");
  if (!status.is_object() || !status["rate_keys"].is_array()) return json();
  for (const auto& k : status["rate_keys"]) {
    if (k["key"] == key) return k;
  }
  return json();
}

// §3.9.7: a rate-limited session's keys — its host's and a named rule's
// whose name needs escaping in a label — with their windows and the
// requests granted under them, in `gatherer-ctl status` (a "rate limits"
// section, there only once the broker has keys; and JSON) and in the
// broker's /metrics, which promtool accepts.
TEST(ControlTest, Clause_3_9_7_RateKeysInStatusAndMetrics) {
  HttpServer server(DelayHandler);
  const std::uint16_t metrics_port = testing::FreeTcpPort();
  Cluster c(1, 4, "10", {"--metrics", "127.0.0.1:" + std::to_string(metrics_port)});
  ASSERT_TRUE(c.ready);
  const CtlResult before = Ctl(c.endpoint, {"status"});
  EXPECT_EQ(before.exit, 0) << before.err;
  EXPECT_EQ(before.out.find("rate limits"), std::string::npos) << "a broker without keys lists none:\n" << before.out;

  const std::string port = std::to_string(server.port());
  std::string host_key = "host 127.0.0.1:";
  host_key += port;
  std::string rule_key = "rule q\"b\\s 127.0.0.1:";
  rule_key += port;
  constexpr int kCount = 20;
  {
    Options o{.broker = c.endpoint, .workers = 4, .log_level = 40};
    o.settings.rate_limits = {*ParseRateRule("50:1,400:60"), RateRule{"q\"b\\s", "GET", "/d/**", {{100, 1000}}}};
    Gatherer g(o);
    g.statements = Delayed(server, kCount, 0);
    ExpectAllBodies(g.gather(), kCount);
  }
  // Keys outlive their session (§3.8.2): the figures are there after the job.
  json key;
  ASSERT_TRUE(WaitFor([&] { return (key = RateKey(c.endpoint, host_key)).is_object(); }, 5s))
      << CtlJson(c.endpoint, "status").dump();
  EXPECT_EQ(key["windows"], "50:1,400:60");
  EXPECT_EQ(key["used"], kCount);  // one grant per statement, at dispatch
  EXPECT_EQ(key["throttled"], 0);
  EXPECT_EQ(key["paused_ms"], 0);
  const json rule = RateKey(c.endpoint, rule_key);
  ASSERT_TRUE(rule.is_object()) << CtlJson(c.endpoint, "status").dump();
  EXPECT_EQ(rule["windows"], "100:1");
  EXPECT_EQ(rule["used"], kCount);

  const CtlResult st = Ctl(c.endpoint, {"status"});
  EXPECT_EQ(st.exit, 0) << st.err;
  const auto section = st.out.find("\nrate limits\nKEY ");
  ASSERT_NE(section, std::string::npos) << st.out;
  const auto row = st.out.find("\n" + host_key + " ", section);
  ASSERT_NE(row, std::string::npos) << st.out;
  const std::string line = st.out.substr(row + 1, st.out.find('\n', row + 1) - row - 1);
  EXPECT_NE(line.find(" 50:1,400:60 "), std::string::npos) << line;
  EXPECT_NE(line.find(" 20 "), std::string::npos) << line;

  // /metrics: rendered once per heartbeat (200 ms) by the broker's loop.
  const std::string url = "http://127.0.0.1:" + std::to_string(metrics_port) + "/metrics";
  std::string requests = "gatherer_broker_rate_requests_total{key=\"";
  requests += host_key;
  requests += "\"} 20\n";
  std::string text;
  ASSERT_TRUE(WaitFor([&] { return (text = HttpGet(url)).find(requests) != std::string::npos; }, 5s)) << text;
  std::string escaped_rule = "gatherer_broker_rate_requests_total{key=\"rule q\\\"b\\\\s 127.0.0.1:";
  escaped_rule += port;
  escaped_rule += "\"} 20\n";
  for (const std::string& expected :
       {escaped_rule, "gatherer_broker_rate_throttled_total{key=\"" + host_key + "\"} 0\n",
        "gatherer_broker_rate_paused_seconds{key=\"" + host_key + "\"} 0.000\n",
        "gatherer_broker_rate_limit{key=\"" + host_key + "\",window_seconds=\"1\"} 50\n",
        "gatherer_broker_rate_limit{key=\"" + host_key + "\",window_seconds=\"60\"} 400\n",
        std::string("# TYPE gatherer_broker_rate_requests_total counter\n"),
        std::string("# TYPE gatherer_broker_rate_limit gauge\n")}) {
    EXPECT_NE(text.find(expected), std::string::npos) << expected << "\nnot in:\n" << text;
  }
  if (::access("/usr/bin/promtool", X_OK) == 0) {
    Process check({"/usr/bin/promtool", "check", "metrics"}, text);
    const auto exit = check.wait(30s);  // promtool has stalled for over 10 s beside the sanitizer builds
    ASSERT_TRUE(exit.has_value());
    EXPECT_EQ(*exit, 0) << check.stdout_text() << check.stderr_text();
  }
}

// top: a live view in a terminal, refreshed, quitting on q and on Ctrl-C.
TEST(ControlTest, TopShowsWorkersAndQuitsOnQOrCtrlC) {
  Cluster c(1);
  ASSERT_TRUE(c.ready);
  for (const std::string key : {"q", "\x03"}) {
    testing::PtyProcess top({kBin + "/ctl/gatherer-ctl", "--broker", c.endpoint, "top", "--interval", "100"});
    ASSERT_TRUE(top.read_until("STATE", 5s)) << top.text();
    ASSERT_TRUE(top.read_until("idle", 5s)) << top.text();
    // Refreshing: a second screen comes.
    const auto screens = [&] {
      std::size_t n = 0;
      for (auto p = top.text().find("gatherer-ctl top"); p != std::string::npos; p = top.text().find("gatherer-ctl top", p + 1)) ++n;
      return n;
    };
    ASSERT_TRUE(WaitFor([&] { top.read_for(50ms); return screens() >= 2; }, 5s)) << top.text();
    EXPECT_NE(top.text().find("w1"), std::string::npos);
    top.type(key);
    const auto exit = top.wait(3s);
    ASSERT_TRUE(exit.has_value()) << "top did not quit on " << (key == "q" ? "q" : "Ctrl-C");
    EXPECT_EQ(*exit, 0);
  }
}

}  // namespace
}  // namespace gatherer
