// End-to-end tests of the `gatherer` CLI binary (DESIGN §2 "CLI"): it runs as
// a subprocess against a real local HTTP server, and the tests check what a
// user would: exit status, the JSON Lines on stdout, the message on stderr,
// and what the server received.

#include <chrono>
#include <cstdio>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "http_server.h"
#include "process.h"

namespace gatherer::testing {
namespace {

constexpr auto kRunTimeout = std::chrono::seconds(90);

struct CliResult {
  int exit_code = -1;
  std::string out;
  std::string err;
  std::optional<long> max_rss_kb;  // peak RSS of the CLI process
};

CliResult RunCli(std::vector<std::string> args, std::string input = {}) {
  args.insert(args.begin(), GATHERER_BIN_DIR "/client/gatherer");
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
      EXPECT_TRUE(Contains(line, "\"error\":{\"kind\":\"failed_precondition\"")) << line;
    } else {
      EXPECT_TRUE(StartsWith(line, LinePrefix(static_cast<std::size_t>(i), 200))) << line;
      EXPECT_TRUE(Contains(line, "\"error\":null,")) << line;
    }
  }
}

TEST(CliTest, CancelOnRaiseNamesTheFailedIndex) {
  HttpServer server([](const HttpRequest& request) { return NotFoundAt("/n/17", request); });
  std::string input;
  for (int i = 0; i < 40; ++i) input += server.url("/n/" + std::to_string(i)) + "\n";

  const CliResult r = RunCli({"fetch", "--cancel-on-raise", "--retries", "0", "--workers", "4"}, input);
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_TRUE(Contains(r.err, "index 17")) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
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

}  // namespace
}  // namespace gatherer::testing
