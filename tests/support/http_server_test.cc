// Tests for the test-support HttpServer and Process, driven by real libcurl
// clients and raw sockets.

#include <arpa/inet.h>
#include <curl/curl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "http_server.h"
#include "process.h"
#include "wait_for.h"

namespace gatherer::testing {
namespace {

using namespace std::chrono_literals;

// curl_global_init is not thread-safe on every build; do it before any test.
struct CurlGlobal {
  CurlGlobal() { curl_global_init(CURL_GLOBAL_DEFAULT); }
  ~CurlGlobal() { curl_global_cleanup(); }
} curl_global;

std::size_t append_to_string(char* data, std::size_t size, std::size_t n, void* user) {
  static_cast<std::string*>(user)->append(data, size * n);
  return size * n;
}

struct EasyDeleter {
  void operator()(CURL* h) const { curl_easy_cleanup(h); }
};
using Easy = std::unique_ptr<CURL, EasyDeleter>;

struct Response {
  CURLcode code = CURLE_OK;
  long status = 0;
  std::string headers;
  std::string body;
};

// A handle that ignores any proxy set in the environment and cannot hang a test.
Easy make_easy(const std::string& url, Response* r) {
  Easy h(curl_easy_init());
  curl_easy_setopt(h.get(), CURLOPT_URL, url.c_str());
  curl_easy_setopt(h.get(), CURLOPT_PROXY, "");
  curl_easy_setopt(h.get(), CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h.get(), CURLOPT_TIMEOUT_MS, 20'000L);
  curl_easy_setopt(h.get(), CURLOPT_WRITEFUNCTION, append_to_string);
  curl_easy_setopt(h.get(), CURLOPT_WRITEDATA, &r->body);
  curl_easy_setopt(h.get(), CURLOPT_HEADERFUNCTION, append_to_string);
  curl_easy_setopt(h.get(), CURLOPT_HEADERDATA, &r->headers);
  return h;
}

// Runs the transfer set up on `h` (its URL replaced by `url`) into `r`.
void perform(CURL* h, const std::string& url, Response* r) {
  r->headers.clear();
  r->body.clear();
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  r->code = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
}

Response get(const std::string& url) {
  Response r;
  Easy h = make_easy(url, &r);
  perform(h.get(), url, &r);
  return r;
}

// Raw client for what curl will not send: pipelining, malformed requests.
int connect_raw(std::uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{10, 0};  // a broken server fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(port);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  return fd;
}

void send_all(int fd, std::string_view data) {
  while (!data.empty()) {
    const ssize_t n = ::send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    ASSERT_GT(n, 0);
    data.remove_prefix(static_cast<std::size_t>(n));
  }
}

// Everything the server sends until it closes (or 10 s of silence).
std::string read_until_eof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

std::size_t count_of(std::string_view haystack, std::string_view needle) {
  std::size_t count = 0;
  for (auto pos = haystack.find(needle); pos != std::string_view::npos;
       pos = haystack.find(needle, pos + 1)) {
    ++count;
  }
  return count;
}

TEST(HttpServer, DefaultHandlerEchoesTarget) {
  HttpServer server;
  const Response r = get(server.url("/a/b?c=1"));
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "ok:/a/b?c=1");
  EXPECT_NE(r.headers.find("Content-Type: text/plain\r\n"), std::string::npos) << r.headers;
  EXPECT_EQ(server.requests(), 1u);
  EXPECT_EQ(server.in_flight(), 0);
  EXPECT_EQ(server.max_in_flight(), 1);
}

TEST(HttpServer, CustomHandlerSetsStatusHeadersAndBody) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.status = 201;
    reply.headers = {{"X-Served-By", "test"}};
    reply.body = req.method + " " + req.target + " probe=" + req.header("x-probe");
    return reply;
  });
  Response r;
  Easy h = make_easy(server.url("/thing"), &r);
  curl_slist* headers = curl_slist_append(nullptr, "X-Probe: 42");
  curl_easy_setopt(h.get(), CURLOPT_HTTPHEADER, headers);
  perform(h.get(), server.url("/thing"), &r);
  curl_slist_free_all(headers);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 201);
  EXPECT_NE(r.headers.find("X-Served-By: test\r\n"), std::string::npos) << r.headers;
  EXPECT_EQ(r.body, "GET /thing probe=42");
}

TEST(HttpServer, KeepAliveReusesTheConnection) {
  HttpServer server;
  Response r;
  Easy h = make_easy(server.url("/1"), &r);
  perform(h.get(), server.url("/1"), &r);
  EXPECT_EQ(r.body, "ok:/1");
  perform(h.get(), server.url("/2"), &r);
  EXPECT_EQ(r.body, "ok:/2");
  EXPECT_EQ(server.requests(), 2u);
  EXPECT_EQ(server.connections(), 1u);
}

TEST(HttpServer, ConnectionCloseIsHonoured) {
  HttpServer server;
  Response r;
  Easy h = make_easy(server.url("/1"), &r);
  curl_slist* headers = curl_slist_append(nullptr, "Connection: close");
  curl_easy_setopt(h.get(), CURLOPT_HTTPHEADER, headers);
  perform(h.get(), server.url("/1"), &r);
  EXPECT_EQ(r.status, 200);
  EXPECT_NE(r.headers.find("Connection: close\r\n"), std::string::npos) << r.headers;
  perform(h.get(), server.url("/2"), &r);
  EXPECT_EQ(r.status, 200);
  curl_slist_free_all(headers);
  EXPECT_EQ(server.connections(), 2u);
}

TEST(HttpServer, HeadSendsLengthButNoBody) {
  HttpServer server;
  Response r;
  Easy h = make_easy(server.url("/h"), &r);
  curl_easy_setopt(h.get(), CURLOPT_NOBODY, 1L);
  perform(h.get(), server.url("/h"), &r);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, "");
  curl_off_t length = -1;
  curl_easy_getinfo(h.get(), CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &length);
  EXPECT_EQ(length, 5);  // "ok:/h"
  // No stray body bytes were sent: the connection is still usable.
  curl_easy_setopt(h.get(), CURLOPT_HTTPGET, 1L);
  perform(h.get(), server.url("/g"), &r);
  EXPECT_EQ(r.body, "ok:/g");
  EXPECT_EQ(server.connections(), 1u);
}

TEST(HttpServer, DelayedReplyDoesNotBlockOtherConnections) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = "done:" + req.target;
    if (req.target == "/slow") reply.delay = 1s;
    return reply;
  });
  Response slow;
  std::atomic<bool> slow_done{false};
  std::thread slow_client([&] {
    slow = get(server.url("/slow"));
    slow_done = true;
  });
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 1; }));

  Response r;
  Easy h = make_easy(server.url("/"), &r);
  for (int i = 0; i < 20; ++i) {
    const std::string path = "/fast/" + std::to_string(i);
    perform(h.get(), server.url(path), &r);
    ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
    EXPECT_EQ(r.body, "done:" + path);
  }
  // All 20 answered while the slow one is still held by the server.
  EXPECT_EQ(server.requests(), 21u);
  EXPECT_EQ(server.in_flight(), 1);
  EXPECT_FALSE(slow_done);

  slow_client.join();
  EXPECT_EQ(slow.code, CURLE_OK) << curl_easy_strerror(slow.code);
  EXPECT_EQ(slow.body, "done:/slow");
  EXPECT_EQ(server.in_flight(), 0);
}

// A reply held for a minute is written as soon as the test releases it; one
// delayed after the release keeps its delay.
TEST(HttpServer, ReleaseDelayedWritesHeldRepliesAtOnce) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = "done:" + req.target;
    reply.delay = 60s;
    return reply;
  });
  Response first, second;
  std::thread a([&] { first = get(server.url("/a")); });
  std::thread b([&] { second = get(server.url("/b")); });
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 2; }));
  server.release_delayed();
  a.join();
  b.join();
  EXPECT_EQ(first.code, CURLE_OK) << curl_easy_strerror(first.code);
  EXPECT_EQ(first.body, "done:/a");
  EXPECT_EQ(second.body, "done:/b");
  EXPECT_EQ(server.in_flight(), 0);

  std::thread c([&] { first = get(server.url("/c")); });
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 1; }));
  // Not released by the earlier call: still held after the loop has run.
  const std::uint64_t requests = server.requests();
  Response other;
  std::thread d([&] { other = get(server.url("/d")); });
  ASSERT_TRUE(WaitFor([&] { return server.requests() == requests + 1; }));
  EXPECT_EQ(server.in_flight(), 2);
  server.release_delayed();
  c.join();
  d.join();
  EXPECT_EQ(first.body, "done:/c");
  EXPECT_EQ(other.body, "done:/d");
}

TEST(HttpServer, PipelinedRequestsWaitBehindADelayedReply) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = "body" + req.target;
    if (req.target == "/slow") reply.delay = 500ms;
    return reply;
  });
  const int fd = connect_raw(server.port());
  send_all(fd,
           "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
           "GET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  ASSERT_TRUE(WaitFor([&] { return server.in_flight() == 1; }));
  // The second request is not even parsed until the first reply is queued.
  EXPECT_EQ(server.requests(), 1u);
  const std::string replies = read_until_eof(fd);
  ::close(fd);
  EXPECT_EQ(count_of(replies, "HTTP/1.1 200 OK\r\n"), 2u) << replies;
  const auto slow_at = replies.find("body/slow");
  const auto fast_at = replies.find("body/fast");
  ASSERT_NE(slow_at, std::string::npos) << replies;
  ASSERT_NE(fast_at, std::string::npos) << replies;
  EXPECT_LT(slow_at, fast_at);
  EXPECT_EQ(server.requests(), 2u);
}

TEST(HttpServer, DropIsATransportError) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.drop = true;
    if (req.target == "/later") reply.delay = 50ms;
    return reply;
  });
  const Response now = get(server.url("/now"));
  EXPECT_NE(now.code, CURLE_OK);
  const Response later = get(server.url("/later"));
  EXPECT_NE(later.code, CURLE_OK);
  EXPECT_EQ(server.requests(), 2u);
  EXPECT_EQ(server.in_flight(), 0);
}

TEST(HttpServer, PostBodyReachesTheHandler) {
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = req.method + ":" + req.header("Content-Length") + ":" + req.body;
    return reply;
  });
  Response r;
  Easy h = make_easy(server.url("/post"), &r);
  curl_easy_setopt(h.get(), CURLOPT_POSTFIELDS, "hello body");
  perform(h.get(), server.url("/post"), &r);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_EQ(r.body, "POST:10:hello body");

  // Large enough for partial reads and writes on both sides, and for curl's
  // "Expect: 100-continue".
  std::string big(3 * 1024 * 1024, 'x');
  for (std::size_t i = 0; i < big.size(); i += 997) big[i] = static_cast<char>('a' + i % 26);
  curl_easy_setopt(h.get(), CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(big.size()));
  curl_easy_setopt(h.get(), CURLOPT_POSTFIELDS, big.c_str());
  perform(h.get(), server.url("/big"), &r);
  ASSERT_EQ(r.code, CURLE_OK) << curl_easy_strerror(r.code);
  EXPECT_TRUE(r.body == "POST:" + std::to_string(big.size()) + ":" + big);
  EXPECT_EQ(server.requests(), 2u);
}

TEST(HttpServer, MalformedRequestGets400AndClose) {
  HttpServer server;
  const int fd = connect_raw(server.port());
  send_all(fd, "NONSENSE\r\n\r\n");
  const std::string reply = read_until_eof(fd);  // returns at the server's close
  ::close(fd);
  EXPECT_EQ(reply.rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u) << reply;
  EXPECT_EQ(server.requests(), 0u);
}

TEST(HttpServer, ChunkedRequestBodyIsRefused) {
  HttpServer server;
  const int fd = connect_raw(server.port());
  send_all(fd,
           "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           "5\r\nhello\r\n0\r\n\r\n");
  const std::string reply = read_until_eof(fd);
  ::close(fd);
  EXPECT_EQ(reply.rfind("HTTP/1.1 411 Length Required\r\n", 0), 0u) << reply;
}

TEST(HttpServer, FiveHundredConcurrentConnections) {
  constexpr int kCount = 500;
  // The delay keeps every request in flight until all have arrived, so curl
  // cannot reuse a connection and the server really holds 500 at once.
  HttpServer server([](const HttpRequest& req) {
    HttpReply reply;
    reply.body = "ok:" + req.target;
    reply.delay = 1s;
    return reply;
  });
  CURLM* multi = curl_multi_init();
  std::vector<Response> responses(kCount);
  std::vector<Easy> easies;
  for (int i = 0; i < kCount; ++i) {
    const std::string url = server.url("/n/" + std::to_string(i));
    easies.push_back(make_easy(url, &responses[static_cast<std::size_t>(i)]));
    curl_easy_setopt(easies.back().get(), CURLOPT_PRIVATE, &responses[static_cast<std::size_t>(i)]);
    curl_multi_add_handle(multi, easies.back().get());
  }
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  int running = 1;
  while (running > 0 && std::chrono::steady_clock::now() < deadline) {
    ASSERT_EQ(curl_multi_perform(multi, &running), CURLM_OK);
    if (running > 0) curl_multi_poll(multi, nullptr, 0, 100, nullptr);
  }
  int done = 0;
  int queued = 0;
  while (CURLMsg* msg = curl_multi_info_read(multi, &queued)) {
    if (msg->msg != CURLMSG_DONE) continue;
    Response* r = nullptr;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &r);
    r->code = msg->data.result;
    curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &r->status);
    ++done;
  }
  EXPECT_EQ(done, kCount);
  for (int i = 0; i < kCount; ++i) {
    const Response& r = responses[static_cast<std::size_t>(i)];
    EXPECT_EQ(r.code, CURLE_OK) << i << ": " << curl_easy_strerror(r.code);
    EXPECT_EQ(r.status, 200) << i;
    EXPECT_EQ(r.body, "ok:/n/" + std::to_string(i));
  }
  for (auto& e : easies) curl_multi_remove_handle(multi, e.get());
  easies.clear();
  curl_multi_cleanup(multi);
  EXPECT_EQ(server.requests(), static_cast<std::uint64_t>(kCount));
  EXPECT_EQ(server.connections(), static_cast<std::uint64_t>(kCount));
  EXPECT_EQ(server.max_in_flight(), kCount);
  EXPECT_EQ(server.in_flight(), 0);
}

TEST(Process, FeedsStdinAndCapturesOutputAndExitCode) {
  Process p({"/bin/sh", "-c", "read x; echo got:$x; echo err >&2; exit 3"}, "hi\n");
  EXPECT_GT(p.pid(), 0);
  EXPECT_EQ(p.wait(10s), 3);
  EXPECT_EQ(p.stdout_text(), "got:hi\n");
  EXPECT_NE(p.stderr_text().find("err"), std::string::npos) << p.stderr_text();
  EXPECT_FALSE(p.running());
}

TEST(Process, KillReportsTheSignal) {
  Process p({"/bin/sleep", "30"});
  EXPECT_TRUE(p.running());
  EXPECT_EQ(p.wait(0ms), std::nullopt);
  p.kill();
  EXPECT_EQ(p.wait(10s), 128 + SIGKILL);
}

TEST(Process, MissingBinaryThrows) {
  EXPECT_THROW(Process({"/nonexistent/gatherer-nothing"}), std::runtime_error);
}

}  // namespace
}  // namespace gatherer::testing
