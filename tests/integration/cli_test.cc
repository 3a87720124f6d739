// End-to-end tests of the `gatherer` CLI binary (README, "CLI"): it runs as
// a subprocess against a real local HTTP server, and the tests check what a
// user would: exit status, the JSON Lines on stdout, the message on stderr,
// and what the server received.

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "free_port.h"
#include "handlers.h"
#include "http_server.h"
#include "process.h"
#include "pty_process.h"
#include "wait_for.h"

namespace gatherer::testing {
namespace {

using namespace std::chrono_literals;

constexpr auto kRunTimeout = std::chrono::seconds(90);
const std::string kGatherer = GATHERER_BIN_DIR "/client/gatherer";

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  std::optional<long> max_rss_kb;  // peak RSS of the CLI process
};

CliResult RunCli(std::vector<std::string> args, std::string input = {}) {
  args.insert(args.begin(), kGatherer);
  Process process(std::move(args), std::move(input));
  CliResult result;
  const auto code = process.wait(kRunTimeout);
  if (!code) {
    process.kill();
    ADD_FAILURE() << "gatherer did not exit within the timeout";
  } else {
    result.exit_code = *code;
    result.max_rss_kb = process.max_rss_kb();
  }
  result.out = process.stdout_text();
  result.err = process.stderr_text();
  return result;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    lines.push_back(text.substr(start, end - start));
    start = end + 1;
  }
  return lines;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

std::size_t CountLines(const std::string& text) {
  return static_cast<std::size_t>(std::count(text.begin(), text.end(), '\n'));
}

// Occurrences of `part` in `s`.
std::size_t Count(const std::string& s, const std::string& part) {
  std::size_t n = 0;
  for (auto pos = s.find(part); pos != std::string::npos; pos = s.find(part, pos + part.size())) ++n;
  return n;
}

// The number after "key": in a JSON line (keys are unique and never nested
// in the CLI's output, except inside strings, which tests avoid).
double NumberAfter(const std::string& line, const std::string& key) {
  const auto at = line.find("\"" + key + "\":");
  if (at == std::string::npos) return -1;
  return std::strtod(line.c_str() + at + key.size() + 3, nullptr);
}

// The CLI writes the keys in a fixed order starting with index and status
// (jsonl.h), so a prefix check pins both without a JSON parser here.
std::string LinePrefix(std::size_t index, int status) {
  return "{\"index\":" + std::to_string(index) + ",\"status\":" + std::to_string(status) + ",";
}

TEST(CliTest, VersionAndHelpExitZero) {
  const CliResult version = RunCli({"--version"});
  EXPECT_EQ(version.exit_code, 0);
  EXPECT_TRUE(Contains(version.out, "gatherer")) << version.out;
  EXPECT_EQ(RunCli({"--help"}).exit_code, 0);
  EXPECT_EQ(RunCli({"fetch", "--help"}).exit_code, 0);
}

TEST(CliTest, UsageErrorsExitTwo) {
  EXPECT_EQ(RunCli({}).exit_code, 2);  // no subcommand
  EXPECT_EQ(RunCli({"fetch", "--no-such-flag"}).exit_code, 2);
  EXPECT_EQ(RunCli({"fetch", "--workers", "zero"}).exit_code, 2);
  EXPECT_EQ(RunCli({"fetch", "--log-level", "loud"}).exit_code, 2);
  EXPECT_EQ(RunCli({"fetch", "/nonexistent/statements.jsonl"}).exit_code, 2);
  const CliResult bad_header = RunCli({"fetch", "--header", "no colon here"}, "http://127.0.0.1:1/\n");
  EXPECT_EQ(bad_header.exit_code, 2);
  EXPECT_TRUE(Contains(bad_header.err, "--header")) << bad_header.err;
}

TEST(CliTest, ThousandUrlsInInputOrder) {
  HttpServer server;
  constexpr int kCount = 1000;
  std::string input;
  for (int i = 0; i < kCount; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";

  const CliResult r = RunCli({"fetch", "--workers", "50"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), static_cast<std::size_t>(kCount));
  for (int i = 0; i < kCount; ++i) {
    const std::string& line = lines[static_cast<std::size_t>(i)];
    EXPECT_TRUE(StartsWith(line, LinePrefix(static_cast<std::size_t>(i), 200))) << line;
    EXPECT_TRUE(Contains(line, "\"body\":\"ok:/n/" + std::to_string(i) + "\",")) << line;
    EXPECT_TRUE(Contains(line, "\"error\":null,")) << line;
  }
  EXPECT_EQ(server.requests(), static_cast<std::uint64_t>(kCount));
}

// Lines of big bodies are escaped and written by the CLI's writer thread,
// those of small ones in place: mixed, every line still comes out whole and
// in input order.
TEST(CliTest, BigAndSmallBodiesMixedComeOutWholeAndInOrder) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    const std::size_t i = std::stoul(req.target.substr(3));  // "/m/<i>"
    // Every third body is 300 KiB of one letter and a quote to escape.
    reply.body = i % 3 == 0 ? std::string(300 << 10, static_cast<char>('a' + i % 26)) + "\"" : "small:" + req.target;
    return reply;
  });
  constexpr std::size_t kCount = 90;
  std::string input;
  for (std::size_t i = 0; i < kCount; ++i) input += server.url("/m/" + std::to_string(i)) + "\n";
  const CliResult r = RunCli({"fetch", "--workers", "8"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), kCount);
  for (std::size_t i = 0; i < kCount; ++i) {
    const std::string& line = lines[i];
    ASSERT_TRUE(StartsWith(line, LinePrefix(i, 200))) << line.substr(0, 80);
    const std::string body = i % 3 == 0 ? std::string(300 << 10, static_cast<char>('a' + i % 26)) + "\\\""
                                        : "small:/m/" + std::to_string(i);
    EXPECT_TRUE(Contains(line, "\"body\":\"" + body + "\",")) << i;
  }
}

TEST(CliTest, ReadsFromAFileArgument) {
  HttpServer server;
  const std::string path = ::testing::TempDir() + "gatherer_cli_test_input.jsonl";
  {
    std::FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    const std::string input = server.url("/f/0") + "\n\n" + server.url("/f/1") + "\n";
    std::fwrite(input.data(), 1, input.size(), f);
    std::fclose(f);
  }
  const CliResult r = RunCli({"fetch", path});
  std::remove(path.c_str());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(Contains(lines[0], "\"body\":\"ok:/f/0\"")) << lines[0];
  EXPECT_TRUE(Contains(lines[1], "\"body\":\"ok:/f/1\"")) << lines[1];
}

TEST(CliTest, InvalidLineEightFetchesNothing) {
  for (const std::string bad : {"ftp://x", "http://"}) {
    HttpServer server;
    std::string input;
    for (int i = 1; i <= 7; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";
    input += bad + "\n";
    input += server.url("/n/9") + "\n";

    const CliResult r = RunCli({"fetch"}, input);
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_TRUE(Contains(r.err, "line 8")) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_EQ(server.requests(), 0u) << bad;
  }
}

// A file in the test's temp dir holding `text`, removed with the object.
class TempFile {
 public:
  TempFile(const std::string& name, const std::string& text) : path_(::testing::TempDir() + name) {
    std::FILE* f = std::fopen(path_.c_str(), "w");
    EXPECT_NE(f, nullptr) << path_;
    if (f == nullptr) return;
    EXPECT_EQ(std::fwrite(text.data(), 1, text.size(), f), text.size());
    std::fclose(f);
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The input is validated in a first pass over the whole file (or a
// temporary copy of stdin) before the first request: a streaming CLI must not
// have fetched lines 1-7 by the time it reads line 8.
TEST(CliTest, InvalidLineEightInAFileFetchesNothing) {
  for (const std::string bad : {"ftp://x", "http://", R"({"url":"http://h/","heders":{}})"}) {
    HttpServer server;
    std::string input;
    for (int i = 1; i <= 7; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";
    input += bad + "\n";
    input += server.url("/n/9") + "\n";
    const TempFile file("gatherer_cli_test_bad_line.txt", input);

    const CliResult r = RunCli({"fetch", file.path()});
    EXPECT_EQ(r.exit_code, 2) << bad;
    EXPECT_TRUE(Contains(r.err, "line 8")) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_EQ(server.requests(), 0u) << bad;
  }
}

TEST(CliTest, InvalidLineAfterManyGoodOnesInAPipeFetchesNothing) {
  HttpServer server;
  constexpr int kGood = 20'000;
  std::string input;
  const std::string url = server.url("/n");
  for (int i = 0; i < kGood; ++i) input += url + "\n";
  input += "\nhttp://\n" + url + "\n";

  const CliResult r = RunCli({"fetch", "--workers", "256"}, input);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_TRUE(Contains(r.err, "line " + std::to_string(kGood + 2) + ":")) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out.substr(0, 500);
  EXPECT_EQ(server.requests(), 0u);
}

HttpReply NotFoundAt(const std::string& target, const HttpRequest& request) {
  HttpReply reply;
  if (request.target == target) {
    reply.status = 404;
    reply.body = "nope";
  } else {
    reply.body = "ok:" + request.target;
  }
  return reply;
}

TEST(CliTest, OneNotFoundFailsOnlyItsLineAndExitsOne) {
  HttpServer server([](const HttpRequest& request) { return NotFoundAt("/n/3", request); });
  constexpr int kCount = 10;
  std::string input;
  for (int i = 0; i < kCount; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";

  const CliResult r = RunCli({"fetch", "--retries", "0"}, input);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), static_cast<std::size_t>(kCount)) << r.out;
  for (int i = 0; i < kCount; ++i) {
    const std::string& line = lines[static_cast<std::size_t>(i)];
    if (i == 3) {
      EXPECT_TRUE(StartsWith(line, LinePrefix(3, 404))) << line;
      EXPECT_TRUE(Contains(line, "\"error\":{\"kind\":\"http_status\"")) << line;
    } else {
      EXPECT_TRUE(StartsWith(line, LinePrefix(static_cast<std::size_t>(i), 200))) << line;
      EXPECT_TRUE(Contains(line, "\"error\":null,")) << line;
    }
  }
}

// Statement 17 fails after 500 ms, by when 0..16 (and a few after it) are
// done: all 17 are written, then the error, and stderr counts both sides.
TEST(CliTest, CancelOnRaiseWritesEveryEarlierResponseThenTheError) {
  HttpServer server([](const HttpRequest& request) {
    HttpReply reply = NotFoundAt("/n/17", request);
    if (reply.status == 404) reply.delay = 500ms;
    return reply;
  });
  std::string input;
  for (int i = 0; i < 40; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";

  const CliResult r = RunCli({"fetch", "--cancel-on-raise", "--retries", "0", "--workers", "4"}, input);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 17u) << r.out;
  for (std::size_t i = 0; i < lines.size(); ++i) {
    EXPECT_TRUE(StartsWith(lines[i], LinePrefix(i, 200))) << lines[i];
  }
  EXPECT_TRUE(Contains(r.err, "gatherer: stopped: statement 17 failed: http_status: HTTP 404")) << r.err;
  EXPECT_TRUE(Contains(r.err, "; 17 responses written, 23 statements not answered\n")) << r.err;
}

struct Seen {
  std::mutex mu;
  std::vector<HttpRequest> requests;
};

TEST(CliTest, JsonStatementPostsItsBodyAndHeaders) {
  Seen seen;
  HttpServer server([&seen](const HttpRequest& request) {
    std::lock_guard<std::mutex> lock(seen.mu);
    seen.requests.push_back(request);
    HttpReply reply;
    reply.status = 201;
    reply.body = "got";
    return reply;
  });
  const std::string input = R"({"url":")" + server.url("/items") +
                            R"(","method":"POST","headers":{"Content-Type":"text/plain","X-Test":"1"},)"
                            R"("body":"hello \"world\""})" "\n";

  const CliResult r = RunCli({"fetch", "--header", "X-Default: d"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(StartsWith(lines[0], LinePrefix(0, 201))) << lines[0];
  EXPECT_TRUE(Contains(lines[0], "\"body\":\"got\"")) << lines[0];

  std::lock_guard<std::mutex> lock(seen.mu);
  ASSERT_EQ(seen.requests.size(), 1u);
  const HttpRequest& request = seen.requests[0];
  EXPECT_EQ(request.method, "POST");
  EXPECT_EQ(request.target, "/items");
  EXPECT_EQ(request.body, "hello \"world\"");
  EXPECT_EQ(request.header("X-Test"), "1");
  EXPECT_EQ(request.header("Content-Type"), "text/plain");
  EXPECT_EQ(request.header("X-Default"), "d");
}

TEST(CliTest, BaseUrlJoinsPaths) {
  HttpServer server;
  const std::string base = server.url("");
  const CliResult r = RunCli({"fetch", "--base-url", base}, "/a\n/b?x=1\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(Contains(lines[0], "\"body\":\"ok:/a\"")) << lines[0];
  EXPECT_TRUE(Contains(lines[1], "\"body\":\"ok:/b?x=1\"")) << lines[1];
}

// Sanitizers slow the CLI several-fold (CI runs them on 2 cores) and ASan's
// shadow memory inflates RSS, so under them the job is a tenth as big and the
// memory bound is not checked.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr std::size_t kBigJob = 20'000;
constexpr bool kCheckRss = false;
#else
constexpr std::size_t kBigJob = 200'000;
constexpr bool kCheckRss = true;
#endif
// Peak RSS of the streaming CLI (release, forked from a small parent, see
// Process::max_rss_kb): ~27 MB at 20k statements, ~31 MB at 200k. The CLI
// that held every statement and response took ~51 MB at 20k, so about ten
// times that at 200k: this bound fails if memory grows with N again.
constexpr long kPeakRssBoundKb = 80 * 1024;

TEST(CliTest, TwoHundredThousandStatementsInBoundedMemory) {
  HttpServer server;
  const std::string url = server.url("/s/");
  std::string input;
  input.reserve(kBigJob * (url.size() + 8));
  for (std::size_t i = 0; i < kBigJob; ++i) input.append(url).append(std::to_string(i)).append("\n");

  const CliResult r = RunCli({"fetch", "--workers", "256"}, std::move(input));
  ASSERT_EQ(r.exit_code, 0) << r.err.substr(0, 2000);
  // One pass over ~50 MB of output, no vector of lines: the prefix pins the
  // index (= position) and the status; every 1000th line its body too.
  std::size_t lines = 0;
  for (std::size_t pos = 0; pos < r.out.size(); ++lines) {
    const std::string prefix = LinePrefix(lines, 200);
    if (r.out.compare(pos, prefix.size(), prefix) != 0) {
      ADD_FAILURE() << "line " << lines << ": " << r.out.substr(pos, 200);
      break;
    }
    const std::size_t end = r.out.find('\n', pos);
    if (end == std::string::npos) {
      ADD_FAILURE() << "last line has no newline";
      break;
    }
    if (lines % 1000 == 0) {
      const std::string body = "\"body\":\"ok:/s/" + std::to_string(lines) + "\",";
      EXPECT_NE(r.out.substr(pos, end - pos).find(body), std::string::npos) << r.out.substr(pos, 300);
    }
    pos = end + 1;
  }
  EXPECT_EQ(lines, kBigJob);
  EXPECT_EQ(server.requests(), kBigJob);

  ASSERT_TRUE(r.max_rss_kb.has_value());
  RecordProperty("cli_peak_rss_kb", static_cast<int>(*r.max_rss_kb));
  std::printf("gatherer fetch of %zu statements: peak RSS %.1f MB\n", kBigJob,
              static_cast<double>(*r.max_rss_kb) / 1024.0);
  if (kCheckRss) {
    EXPECT_LT(*r.max_rss_kb, kPeakRssBoundKb);
  }
}


// --- streaming --------------------------------------------------------------

// Statements "/d/<i>/<delay_ms(i)>" for DelayHandler, one per line.
template <typename DelayOf>
std::string DelayInput(const HttpServer& server, int count, DelayOf delay_of) {
  std::string input;
  for (int i = 0; i < count; ++i) {
    input += server.url("/d/" + std::to_string(i) + "/" + std::to_string(delay_of(i))) + "\n";
  }
  return input;
}

// DelayHandler's statements 0..kCount-1 (input() gives their lines), where
// every one but 0 is held until open() (ReplyGate): a test sees what the run
// wrote while it could not have ended, whatever the machine's speed.
class NextInOrderServer {
 public:
  static constexpr int kCount = 10;
  NextInOrderServer()
      : server_([this](const HttpRequest& req) {
          HttpReply r = DelayHandler(req);
          return req.target.rfind("/d/0/", 0) == 0 ? r : gate_.hold(std::move(r));
        }) {}
  std::string input() const { return DelayInput(server_, kCount, [](int) { return 0; }); }
  void open() { gate_.open(server_); }

 private:
  ReplyGate gate_;
  HttpServer server_;
};

void ExpectDelayLines(const std::string& out, std::size_t count) {
  const auto lines = Lines(out);
  ASSERT_EQ(lines.size(), count) << out;
  for (std::size_t i = 0; i < count; ++i) {
    EXPECT_TRUE(StartsWith(lines[i], LinePrefix(i, 200))) << lines[i];
    EXPECT_TRUE(Contains(lines[i], "\"body\":\"body-" + std::to_string(i) + "\",")) << lines[i];
  }
}

// One statement at a time: a reader of the pipe sees each line as soon as
// it is next in order, not everything at the end.
TEST(CliTest, EachLineReachesAPipeAsSoonAsItIsNextInOrder) {
  NextInOrderServer server;
  Process cli({kGatherer, "fetch", "--workers", "1"}, server.input());
  // Statement 1 is held until line 0 is seen: a line that waited for the run
  // (or a full buffer) would never come.
  EXPECT_TRUE(WaitFor([&] { return CountLines(cli.stdout_text()) >= 1; }, 15s))
      << "line 0 not written while statement 1 is unanswered; stderr: " << cli.stderr_text();
  EXPECT_EQ(CountLines(cli.stdout_text()), 1u);
  server.open();
  ASSERT_EQ(cli.wait(30s), std::optional<int>(0)) << cli.stderr_text();
  ExpectDelayLines(cli.stdout_text(), NextInOrderServer::kCount);
}

// A file of statements written to a terminal: the same, as a user sees it.
TEST(CliTest, EachLineReachesATerminalAsSoonAsItIsNextInOrder) {
  NextInOrderServer server;
  const TempFile file("gatherer_cli_test_tty.txt", server.input());
  PtyProcess tty({kGatherer, "fetch", "--workers", "1", file.path()});
  EXPECT_TRUE(tty.read_until("{\"index\":0,", 15s)) << tty.text();
  EXPECT_EQ(Count(tty.text(), "{\"index\":"), 1u) << tty.text();
  server.open();
  ASSERT_EQ(tty.wait(30s), std::optional<int>(0)) << tty.text();
  EXPECT_EQ(Count(tty.text(), "{\"index\":"), std::size_t{NextInOrderServer::kCount}) << tty.text();
}

// --- stops: nothing finished is lost -----------------------------------------

// A broker killed mid-run: what was done is written, then the error, and the
// run ends after --broker-timeout instead of waiting for ever.
TEST(CliTest, BrokerLostMidRunWritesWhatWasDoneThenTheError) {
  HttpServer server(DelayHandler);
  const std::string ep = FreeTcpEndpoint();
  // The CLI gives a silent broker 1 s. So the broker heartbeats every 200 ms
  // (the client heartbeats at the broker's period, and hears it answer), and
  // the CLI starts once the broker listens and has its worker: a live broker
  // slow to answer or to start (a loaded machine, a sanitizer) would
  // otherwise end the run before the kill this test is about.
  Process broker(
      {GATHERER_BIN_DIR "/broker/gatherer-broker", "--bind", ep, "--heartbeat-ms", "200", "--log-level", "info"});
  Process worker({GATHERER_BIN_DIR "/worker/gatherer-worker", "--broker", ep, "--io-threads", "1", "--heartbeat-ms",
                  "200", "--log-level", "warning"});
  ASSERT_TRUE(WaitFor([&] { return Contains(broker.stderr_text(), " joined: ready"); }, 20s)) << broker.stderr_text();
  const std::string input = DelayInput(server, 20, [](int i) { return i < 10 ? 0 : 60'000; });
  Process cli({kGatherer, "fetch", "--broker", ep, "--workers", "20", "--broker-timeout", "1"}, input);
  ASSERT_TRUE(WaitFor([&] { return CountLines(cli.stdout_text()) >= 10; }, 20s))
      << cli.stdout_text() << cli.stderr_text();
  broker.kill(SIGKILL);
  ASSERT_TRUE(broker.wait(5s).has_value());

  const auto code = cli.wait(30s);
  ASSERT_TRUE(code.has_value()) << "still running 30 s after its broker died";
  EXPECT_EQ(*code, 1);
  const std::string err = cli.stderr_text();
  ExpectDelayLines(cli.stdout_text(), 10);
  EXPECT_TRUE(Contains(err, "gatherer: stopped: broker " + ep + " unreachable")) << err;
  EXPECT_TRUE(Contains(err, "; 10 responses written, 10 statements not answered\n")) << err;
}

// Five statements answered at once, fifteen after a minute: `signal` sent
// once the five are written stops the run with them written.
void ExpectSignalStopsTheRun(int signal, const std::string& name) {
  HttpServer server(DelayHandler);
  const std::string input = DelayInput(server, 20, [](int i) { return i < 5 ? 0 : 60'000; });
  Process cli({kGatherer, "fetch", "--workers", "20"}, input);
  ASSERT_TRUE(WaitFor([&] { return CountLines(cli.stdout_text()) >= 5; }, 20s))
      << cli.stdout_text() << cli.stderr_text();
  cli.kill(signal);
  const auto code = cli.wait(10s);
  ASSERT_TRUE(code.has_value()) << "still running 10 s after " << name;
  EXPECT_EQ(*code, 128 + signal);
  const std::string err = cli.stderr_text();
  ExpectDelayLines(cli.stdout_text(), 5);
  EXPECT_TRUE(Contains(err, "gatherer: interrupted by " + name + "; 5 responses written, 15 statements not answered\n"))
      << err;
  EXPECT_EQ(Count(err, "interrupted"), 1u) << err;
  EXPECT_TRUE(Contains(err, "gatherer: 20 statements: 5 ok, 0 failed, 15 not answered, 0 retried; ")) << err;
}

TEST(CliTest, SigintWritesWhatWasDoneAndExits130) { ExpectSignalStopsTheRun(SIGINT, "SIGINT"); }

TEST(CliTest, SigtermWritesWhatWasDoneAndExits143) { ExpectSignalStopsTheRun(SIGTERM, "SIGTERM"); }

// Ctrl-C typed at the terminal the CLI writes to.
TEST(CliTest, CtrlCAtATerminalWritesWhatWasDoneAndExits130) {
  HttpServer server(DelayHandler);
  const TempFile file("gatherer_cli_test_ctrl_c.txt", DelayInput(server, 10, [](int i) { return i < 3 ? 0 : 60'000; }));
  PtyProcess tty({kGatherer, "fetch", "--workers", "10", file.path()});
  ASSERT_TRUE(tty.read_until("{\"index\":2,", 20s)) << tty.text();
  tty.read_for(100ms);
  tty.type("\x03");
  EXPECT_EQ(tty.wait(10s), std::optional<int>(130)) << tty.text();
  EXPECT_EQ(Count(tty.text(), "{\"index\":"), 3u) << tty.text();
  EXPECT_TRUE(Contains(tty.text(), "gatherer: interrupted by SIGINT; 3 responses written, 7 statements not answered\n"))
      << tty.text();
}

// Ctrl-C while the statements are still being typed: nothing was fetched.
TEST(CliTest, CtrlCWhileReadingStatementsFromATerminalExits130) {
  PtyProcess tty({kGatherer, "fetch"});
  // Before the CLI takes SIGINT over (slow under a sanitizer) Ctrl-C would
  // end it by the default action, without a word.
  ASSERT_TRUE(WaitFor([&] { return tty.reads_from_signalfd(SIGINT); }, 10s)) << tty.text();
  tty.type("http://127.0.0.1:1/a\n");
  ASSERT_TRUE(tty.read_until("http://127.0.0.1:1/a\n", 5s)) << tty.text();
  tty.type("\x03");
  EXPECT_EQ(tty.wait(10s), std::optional<int>(130)) << tty.text();
  EXPECT_TRUE(Contains(tty.text(), "gatherer: interrupted by SIGINT while reading the input; nothing fetched\n"))
      << tty.text();
}

// The output stuck (a terminal nobody reads: the CLI's write blocks) leaves
// the first SIGINT unable to finish the run; a second one exits at once.
TEST(CliTest, SecondSigintExitsAtOnce) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.body = std::string(16 * 1024, 'x');
    return reply;
  });
  std::string input;
  for (int i = 0; i < 200; ++i) input += server.url(std::string(1, '/').append(std::to_string(i))) + "\n";
  const TempFile file("gatherer_cli_test_second_sigint.txt", input);
  PtyProcess tty({kGatherer, "fetch", "--workers", "4", file.path()});
  // Not read: the terminal's buffer fills and the CLI blocks writing to it.
  ASSERT_TRUE(WaitFor([&] { return server.requests() >= 8; }, 20s));
  std::this_thread::sleep_for(500ms);
  ASSERT_FALSE(tty.wait(0ms, /*keep_reading=*/false).has_value()) << "the run finished with its output unread";
  tty.kill(SIGINT);
  EXPECT_FALSE(tty.wait(500ms, /*keep_reading=*/false).has_value()) << "exited with its output stuck";
  const auto before = std::chrono::steady_clock::now();
  tty.kill(SIGINT);
  EXPECT_EQ(tty.wait(5s, /*keep_reading=*/false), std::optional<int>(130));
  // "At once": _exit; a sanitizer's runtime still takes its time to end a process.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  EXPECT_LT(std::chrono::steady_clock::now() - before, 3s);
#else
  EXPECT_LT(std::chrono::steady_clock::now() - before, 1s);
#endif
}

// --- usage errors -------------------------------------------------------------

TEST(CliTest, MalformedBrokerIsAUsageError) {
  for (const std::string broker :
       {"localhost:5555", "tcp://host", "http://x", "tcp://host:0", "tcp://host:65536", "tcp://host:55x",
        "tcp://:5555", "tcp://host:-1", "tcp://host:5555/x", "ipc://", "5555", "tcp://host:"}) {
    const CliResult r = RunCli({"fetch", "--broker", broker, "--broker-timeout", "1"}, "http://127.0.0.1:1/\n");
    EXPECT_EQ(r.exit_code, 2) << broker << ": " << r.err;
    EXPECT_TRUE(Contains(r.err, "--broker")) << broker << ": " << r.err;
  }
}

TEST(CliTest, DirectoryAsInputIsAUsageError) {
  const CliResult r = RunCli({"fetch", ::testing::TempDir()});
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_TRUE(Contains(r.err, "is a directory")) << r.err;
}

// 0 means no timeout; 0.0005 s would round to 0 ms and silently mean the same.
TEST(CliTest, TimeoutBelowOneMillisecondIsRefused) {
  HttpServer server;
  for (const std::string t : {"0.0005", "0.0001", "1e-9"}) {
    const CliResult r = RunCli({"fetch", "--timeout", t}, server.url("/a") + "\n");
    EXPECT_EQ(r.exit_code, 2) << t << ": " << r.err;
    EXPECT_TRUE(Contains(r.err, "--timeout")) << r.err;
  }
  for (const std::string t : {"0", "2.5"}) {
    const CliResult r = RunCli({"fetch", "--timeout", t}, server.url("/a") + "\n");
    EXPECT_EQ(r.exit_code, 0) << t << ": " << r.err;
  }
  // 1 ms is the smallest timeout taken. It is accepted, but a loaded machine (or a sanitizer) may
  // well spend it before the answer comes: the statement then fails at its index, it is not refused.
  const CliResult r = RunCli({"fetch", "--timeout", "0.001"}, server.url("/a") + "\n");
  if (r.exit_code != 0) {
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(Contains(r.err, "1 deadline_exceeded")) << r.err;
    EXPECT_TRUE(Contains(r.out, "\"index\":0")) << r.out;
  }
}

// The embedded worker does not repeat the Gatherer's warning: a user reads it once.
TEST(CliTest, InsecureIsWarnedOnce) {
  HttpServer server;
  const CliResult r = RunCli({"fetch", "--insecure"}, server.url("/a") + "\n");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(Count(r.err, "without TLS verification") + Count(r.err, "TLS verification is off"), 1u) << r.err;
}

// --- summary ------------------------------------------------------------------

TEST(CliTest, SummaryLineAfterASuccessfulRun) {
  HttpServer server;
  const CliResult r = RunCli({"fetch"}, server.url("/a") + "\n" + server.url("/b") + "\n" + server.url("/c") + "\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(StartsWith(r.err, "gatherer: 3 statements: 3 ok, 0 failed, 0 retried; ")) << r.err;
  EXPECT_TRUE(Contains(r.err, " s, ")) << r.err;
  EXPECT_EQ(Count(r.err, "\n"), 1u) << r.err;
  EXPECT_TRUE(Contains(r.err, " req/s\n")) << r.err;
}

TEST(CliTest, SummaryLineSaysWhyStatementsFailed) {
  std::atomic<int> flaky{0};
  HttpServer server([&flaky](const HttpRequest& request) {
    HttpReply reply;
    reply.body = "ok";
    if (StartsWith(request.target, "/nf/")) reply.status = 404;
    if (request.target == "/flaky" && flaky++ == 0) reply.status = 503;
    if (request.target == "/slow") reply.delay = 3s;
    return reply;
  });
  std::string input;
  for (int i = 0; i < 6; ++i) input += server.url("/ok/" + std::to_string(i)) + "\n";
  input += server.url("/flaky") + "\n" + server.url("/nf/1") + "\n" + server.url("/nf/2") + "\n" +
           server.url("/slow") + "\n";
  const CliResult r = RunCli({"fetch", "--retries", "1", "--timeout", "0.3"}, input);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(CountLines(r.out), 10u);
  EXPECT_TRUE(Contains(r.err, "gatherer: 10 statements: 7 ok, 3 failed (2 http_status [HTTP 404: 2], "
                              "1 deadline_exceeded), 2 retried; "))
      << r.err;
}

TEST(CliTest, QuietSuppressesTheSummary) {
  HttpServer server;
  const CliResult r = RunCli({"fetch", "--quiet"}, server.url("/a") + "\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  EXPECT_EQ(CountLines(r.out), 1u);
}

// --- limits -------------------------------------------------------------------

TEST(CliTest, LimitFlagsOutOfRangeAreUsageErrors) {
  const std::vector<std::vector<std::string>> cases = {
      {"--max-redirects", "-1"},          {"--max-redirects", "101"},
      {"--max-body-bytes", "0"},          {"--max-body-bytes", "268435457"},
      {"--max-body-bytes", "257MiB"},     {"--max-body-bytes", "12x"},
      {"--backoff-base-ms", "-1"},        {"--backoff-base-ms", "3600001"},
      {"--backoff-max-ms", "3600001"},    {"--backoff-base-ms", "500", "--backoff-max-ms", "100"},
      {"--retry-after-max-ms", "-5"},     {"--retry-after-max-ms", "3600001"},
  };
  for (const auto& flags : cases) {
    std::vector<std::string> args = {"fetch"};
    args.insert(args.end(), flags.begin(), flags.end());
    const CliResult r = RunCli(args, "http://127.0.0.1:1/\n");
    EXPECT_EQ(r.exit_code, 2) << flags[0] << " " << flags[1] << ": " << r.err;
    EXPECT_TRUE(Contains(r.err, flags[0])) << r.err;
    EXPECT_FALSE(Contains(r.err, "not expected")) << r.err;
  }
}

HttpReply RedirectsAndBigBody(const HttpRequest& request) {
  HttpReply reply;
  int n = 0;
  if (std::sscanf(request.target.c_str(), "/r/%d", &n) == 1 && n > 0) {
    reply.status = 302;
    reply.headers = {{"Location", "/r/" + std::to_string(n - 1)}};
  } else if (request.target == "/big") {
    reply.body = std::string(4096, 'b');
  } else {
    reply.body = "end";
  }
  return reply;
}

TEST(CliTest, MaxRedirectsAndMaxBodyBytesAreApplied) {
  HttpServer server(RedirectsAndBigBody);
  const std::string input = server.url("/r/2") + "\n" + server.url("/r/3") + "\n" + server.url("/big") + "\n";
  const CliResult tight = RunCli({"fetch", "--retries", "0", "--max-redirects", "2", "--max-body-bytes", "4095"}, input);
  EXPECT_EQ(tight.exit_code, 1) << tight.err;
  auto lines = Lines(tight.out);
  ASSERT_EQ(lines.size(), 3u) << tight.out;
  EXPECT_TRUE(StartsWith(lines[0], LinePrefix(0, 200))) << lines[0];
  EXPECT_TRUE(Contains(lines[0], "\"body\":\"end\"")) << lines[0];
  EXPECT_FALSE(Contains(lines[1], "\"error\":null")) << lines[1];
  EXPECT_TRUE(Contains(lines[2], "\"error\":{\"kind\":\"resource_exhausted\"")) << lines[2];

  const CliResult roomy = RunCli({"fetch", "--retries", "0", "--max-redirects", "3", "--max-body-bytes", "4K"}, input);
  EXPECT_EQ(roomy.exit_code, 0) << roomy.err;
  lines = Lines(roomy.out);
  ASSERT_EQ(lines.size(), 3u) << roomy.out;
  for (const auto& line : lines) EXPECT_TRUE(Contains(line, "\"error\":null")) << line;
}

// A 503 asking to come back in 2 s is retried after at most the cap.
TEST(CliTest, RetryAfterIsCapped) {
  std::atomic<int> calls{0};
  HttpServer server([&calls](const HttpRequest&) {
    HttpReply reply;
    if (calls++ == 0) {
      reply.status = 503;
      reply.headers = {{"Retry-After", "2"}};
    }
    return reply;
  });
  const CliResult r =
      RunCli({"fetch", "--retries", "1", "--retry-after-max-ms", "50", "--backoff-max-ms", "50"}, server.url("/") + "\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(NumberAfter(r.out, "attempts"), 2) << r.out;
  EXPECT_LT(NumberAfter(r.out, "elapsed_ms"), 1500) << r.out;
}

// JSON Lines readers (jq, pandas, ...) skip blank lines; so does the CLI, and
// `index` counts statements, not lines.
TEST(CliTest, BlankLinesAreSkippedAndIndexCountsStatements) {
  HttpServer server;
  const std::string input = "\n" + server.url("/a") + "\n\n   \n\t\n" + server.url("/b") + "\r\n\n" +
                            server.url("/c") + "\n\n";
  const CliResult r = RunCli({"fetch"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 3u) << r.out;
  const char* paths[] = {"/a", "/b", "/c"};
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(StartsWith(lines[i], LinePrefix(i, 200))) << lines[i];
    EXPECT_TRUE(Contains(lines[i], std::string("\"body\":\"ok:") + paths[i] + "\"")) << lines[i];
  }
  const CliResult help = RunCli({"fetch", "--help"});
  EXPECT_TRUE(Contains(help.out, "Blank lines (empty or only whitespace) are skipped: \"index\" counts statements,\n"
                                 "  not lines."))
      << help.out;
}

// --- JSON bodies, repeated headers --------------------------------------------

TEST(CliTest, JsonBodyIsSentAsJsonText) {
  Seen seen;
  HttpServer server([&seen](const HttpRequest& request) {
    std::lock_guard<std::mutex> lock(seen.mu);
    seen.requests.push_back(request);
    return HttpReply{};
  });
  const std::string u = server.url("");
  const std::string input =
      R"({"url":")" + u + R"(/1","method":"POST","body":{"a":[1,2.5,"x\"y"],"b":{"c":null}}})" "\n" +
      R"({"url":")" + u + R"(/2","method":"PUT","body":[1, 2]})" "\n" +
      R"({"url":")" + u + R"(/3","method":"POST","headers":{"content-type":"application/merge-patch+json"},"body":{"a":1}})" "\n" +
      R"({"url":")" + u + R"(/4","method":"POST","body":"{\"raw\":true}"})" "\n";
  const CliResult r = RunCli({"fetch"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::map<std::string, HttpRequest> by_target;
  {
    std::lock_guard<std::mutex> lock(seen.mu);
    for (const auto& request : seen.requests) by_target[request.target] = request;
  }
  ASSERT_EQ(by_target.size(), 4u);
  EXPECT_EQ(by_target["/1"].body, R"({"a":[1,2.5,"x\"y"],"b":{"c":null}})");
  EXPECT_EQ(by_target["/1"].header("Content-Type"), "application/json");
  EXPECT_EQ(by_target["/2"].body, "[1, 2]");
  EXPECT_EQ(by_target["/2"].header("Content-Type"), "application/json");
  EXPECT_EQ(by_target["/3"].body, R"({"a":1})");
  EXPECT_EQ(by_target["/3"].header("Content-Type"), "application/merge-patch+json");
  EXPECT_EQ(by_target["/4"].body, R"({"raw":true})");
  EXPECT_NE(by_target["/4"].header("Content-Type"), "application/json");

  // A Content-Type given with --header is the user's choice for every statement.
  {
    std::lock_guard<std::mutex> clear_lock(seen.mu);
    seen.requests.clear();
  }
  const CliResult with_default = RunCli({"fetch", "--header", "Content-Type: application/vnd.api+json"},
                                        R"({"url":")" + u + R"(/5","method":"POST","body":{"a":1}})" "\n");
  ASSERT_EQ(with_default.exit_code, 0) << with_default.err;
  std::lock_guard<std::mutex> lock(seen.mu);
  ASSERT_EQ(seen.requests.size(), 1u);
  EXPECT_EQ(seen.requests[0].header("Content-Type"), "application/vnd.api+json");
  EXPECT_EQ(seen.requests[0].body, R"({"a":1})");
}

TEST(CliTest, BodyOfAnotherJsonTypeIsAnInvalidLine) {
  HttpServer server;
  for (const std::string body : {"1", "true", R"({"a":tru})"}) {
    const CliResult r = RunCli({"fetch"}, R"({"url":")" + server.url("/") + R"(","method":"POST","body":)" + body + "}\n");
    EXPECT_EQ(r.exit_code, 2) << body << ": " << r.err;
    EXPECT_TRUE(Contains(r.err, "line 1: ")) << r.err;
  }
  EXPECT_EQ(server.requests(), 0u);
}

TEST(CliTest, RepeatedResponseHeadersKeepEveryValue) {
  HttpServer server([](const HttpRequest&) {
    HttpReply reply;
    reply.headers = {{"Set-Cookie", "a=1; Path=/"}, {"X-One", "1"}, {"Set-Cookie", "b=2"}};
    return reply;
  });
  const CliResult r = RunCli({"fetch"}, server.url("/") + "\n");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(Contains(r.out, R"("Set-Cookie":["a=1; Path=/","b=2"])")) << r.out;
  EXPECT_TRUE(Contains(r.out, R"("X-One":"1")")) << r.out;
}

// --workers far above the number of statements: the window is the job's,
// not the flag's, so 200 statements cost what 200 workers do.
TEST(CliTest, WorkersFlagFarAboveTheJobCostsNoMemory) {
  HttpServer server;
  std::string input;
  for (int i = 0; i < 200; ++i) input += server.url("/w/" + std::to_string(i)) + "\n";
  const CliResult r = RunCli({"fetch", "--workers", "100000"}, input);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(CountLines(r.out), 200u);
  ASSERT_TRUE(r.max_rss_kb.has_value());
  std::printf("gatherer fetch --workers 100000 of 200 statements: peak RSS %.1f MB\n",
              static_cast<double>(*r.max_rss_kb) / 1024.0);
  if (kCheckRss) {
    EXPECT_LT(*r.max_rss_kb, 64 * 1024);
  }
}

// Big POST bodies cost what is in flight, not what the window allows: 50
// POSTs of 1 MiB at the default window (25 + 25 prefetch) peaked at 228 MB
// when every body sat in the client, the broker and the worker at once;
// --max-in-flight-bytes (default 8M) bounds them. Every POST is sent once.
TEST(CliTest, BigPostBodiesCostWhatIsInFlightNotTheWindow) {
  HttpServer server;
  const std::string body(1 << 20, 'x');
  std::string input;
  for (int i = 0; i < 50; ++i) {
    std::string path = "/p/";
    path += std::to_string(i);
    input += "{\"method\":\"POST\",\"url\":\"" + server.url(path) + "\",\"body\":\"" + body + "\"}\n";
  }
  const TempFile file("gatherer_cli_test_big_posts.jsonl", input);
  input.clear();
  input.shrink_to_fit();
  const CliResult r = RunCli({"fetch", file.path()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(CountLines(r.out), 50u);
  EXPECT_EQ(server.requests(), 50u);
  ASSERT_TRUE(r.max_rss_kb.has_value());
  std::printf("gatherer fetch of 50 POSTs of 1 MiB: peak RSS %.1f MB\n", static_cast<double>(*r.max_rss_kb) / 1024.0);
  if (kCheckRss) {
    EXPECT_LT(*r.max_rss_kb, 140 * 1024);
  }
}

// A broker with no worker: the CLI says so once on stderr within a few
// seconds, and keeps waiting (a worker may come) until --broker-timeout.
TEST(CliTest, ABrokerWithNoWorkerIsSaidOnceAndWaitedFor) {
  const std::string ep = testing::FreeTcpEndpoint();
  Process broker({std::string(GATHERER_BIN_DIR) + "/broker/gatherer-broker", "--bind", ep, "--log-level", "error"});
  Process cli({kGatherer, "fetch", "--broker", ep, "--broker-timeout", "60"}, "http://127.0.0.1:1/a\n");
  ASSERT_TRUE(WaitFor([&] { return Contains(cli.stderr_text(), "has no worker connected; waiting"); }, 10s))
      << cli.stderr_text();
  EXPECT_TRUE(cli.running()) << "gave up instead of waiting for a worker";
  cli.kill(SIGTERM);
  EXPECT_TRUE(cli.wait(10s).has_value());
  const std::string err = cli.stderr_text();
  EXPECT_EQ(err.find("has no worker connected"), err.rfind("has no worker connected")) << "said more than once: " << err;
}

// A broker that is not there: said once within a few seconds, then the run
// fails after --broker-timeout naming the broker, not before.
// The notice comes by half the timeout at the latest, so a timeout shorter
// than the usual 3 s before the notice is announced too.
TEST(CliTest, AnUnreachableBrokerIsSaidThenTimesOut) {
  const std::string ep = testing::FreeTcpEndpoint();
  const auto start = std::chrono::steady_clock::now();
  const CliResult r = RunCli({"fetch", "--broker", ep, "--broker-timeout", "2"}, "http://127.0.0.1:1/a\n");
  const auto took = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "not reachable yet; waiting up to 2 s")) << r.err;
  EXPECT_LT(r.err.find("not reachable yet"), r.err.find("unreachable for")) << r.err;
  EXPECT_TRUE(Contains(r.err, "broker " + ep + " unreachable")) << r.err;
  EXPECT_GE(took, 2s);
  EXPECT_LT(took, 20s);
}

// log_level debug does not print a line per failed statement: the failure
// is in each output line already.
TEST(CliTest, DebugLogLevelPrintsNoLinePerFailedStatement) {
  HttpServer server([](const HttpRequest&) {
    HttpReply r;
    r.status = 404;
    return r;
  });
  std::string input;
  for (int i = 0; i < 50; ++i) input += server.url("/missing/" + std::to_string(i)) + "\n";
  const CliResult r = RunCli({"fetch", "--log-level", "debug", "--retries", "0"}, input);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 50);
  EXPECT_LT(std::count(r.err.begin(), r.err.end(), '\n'), 25) << r.err;
}

}  // namespace
}  // namespace gatherer::testing

// --- progress -------------------------------------------------------------------

namespace gatherer::testing {
namespace {

using namespace std::chrono_literals;

std::string ReadFile(const std::string& path) {
  std::string text;
  if (std::FILE* f = std::fopen(path.c_str(), "r")) {
    char buf[4096];
    std::size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
    std::fclose(f);
  }
  return text;
}

// stderr a terminal, stdout a file: the bar is drawn while the run goes
// (done / total, failed, req/s, ETA), erased at the end, and one summary
// line follows; the responses in the file are untouched by it.
TEST(CliTest, ProgressBarOnATerminalThenOneSummaryLine) {
  HttpServer server(DelayHandler);
  const TempFile file("gatherer_cli_test_progress.txt", DelayInput(server, 40, [](int) { return 100; }));
  const std::string out_path = ::testing::TempDir() + "gatherer_cli_test_progress.out";
  PtyProcess tty({"/bin/sh", "-c", "exec " + kGatherer + " fetch --workers 4 " + file.path() + " > " + out_path});
  ASSERT_TRUE(tty.read_until("/40  ", 10s)) << tty.text();
  ASSERT_TRUE(tty.read_until("req/s  ETA ", 10s)) << tty.text();
  EXPECT_FALSE(tty.wait(0ms).has_value()) << "the run ended before its progress was seen";
  ASSERT_EQ(tty.wait(30s), std::optional<int>(0)) << tty.text();
  const std::string text = tty.text();
  EXPECT_TRUE(Contains(text, " failed  ")) << text;
  EXPECT_TRUE(Contains(text, "]  ")) << text;
  // Erased (ESC [ K) before the summary, which is the one line that ends it.
  const auto summary = text.find("gatherer: 40 statements: 40 ok, 0 failed");
  ASSERT_NE(summary, std::string::npos) << text;
  EXPECT_GE(summary, 3u);
  EXPECT_EQ(text.substr(summary - 3, 3), "\x1b[K") << text;
  EXPECT_EQ(Count(text.substr(summary), "\n"), 1u) << text;
  ExpectDelayLines(ReadFile(out_path), 40);
  std::remove(out_path.c_str());
}

// stderr not a terminal: no bar unless --progress asks for one.
TEST(CliTest, NoProgressBarOffATerminalUnlessAsked) {
  HttpServer server(DelayHandler);
  const std::string input = DelayInput(server, 10, [](int) { return 50; });
  Process plain({kGatherer, "fetch", "--workers", "2"}, input);
  ASSERT_EQ(plain.wait(30s), std::optional<int>(0)) << plain.stderr_text();
  EXPECT_FALSE(Contains(plain.stderr_text(), "\x1b[K")) << plain.stderr_text();
  EXPECT_EQ(Count(plain.stderr_text(), "\n"), 1u) << plain.stderr_text();
  Process asked({kGatherer, "fetch", "--workers", "2", "--progress"}, input);
  ASSERT_EQ(asked.wait(30s), std::optional<int>(0)) << asked.stderr_text();
  EXPECT_TRUE(Contains(asked.stderr_text(), "/10  ")) << asked.stderr_text();
  EXPECT_TRUE(Contains(asked.stderr_text(), "\x1b[K")) << asked.stderr_text();
  ExpectDelayLines(asked.stdout_text(), 10);
}

// stdout and stderr one terminal: responses are written there, no bar tears them.
TEST(CliTest, NoProgressBarWhenStdoutIsTheSameTerminal) {
  HttpServer server(DelayHandler);
  const TempFile file("gatherer_cli_test_progress_same.txt", DelayInput(server, 10, [](int) { return 50; }));
  PtyProcess tty({kGatherer, "fetch", "--workers", "2", file.path()});
  ASSERT_EQ(tty.wait(30s), std::optional<int>(0)) << tty.text();
  EXPECT_FALSE(Contains(tty.text(), "\x1b[K")) << tty.text();
  EXPECT_EQ(Count(tty.text(), "{\"index\":"), 10u) << tty.text();
}

}  // namespace
}  // namespace gatherer::testing
