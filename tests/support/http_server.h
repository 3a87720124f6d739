#pragma once
// HttpServer: a real HTTP/1.1 server on 127.0.0.1 (port 0, read back with
// port()) for tests and benchmarks. One event-loop thread (epoll), keep-alive,
// thousands of concurrent connections; replies may be delayed without
// blocking other connections (timer queue), so "answer after 2 s" costs no
// thread.
//
// Thread-safety: all public methods may be called from any thread. The
// handler runs on the server thread and must not block.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gatherer::testing {

struct HttpRequest {
  std::string method;
  std::string target;  // path plus query, as sent ("/a?b=1")
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;
  // The client's TCP address and port, as accept() saw them ("127.0.0.12";
  // tells which process sent it when each leaves from an address of its own).
  std::string peer_address;
  std::uint16_t peer_port = 0;
  // Value of the first header named `name` (case-insensitive), or "".
  std::string header(std::string_view name) const;
};

struct HttpReply {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;  // Content-Length is added
  std::string body;
  // Reply this long after the request was read (0 = at once).
  std::chrono::milliseconds delay{0};
  // Close the connection without replying (a transport error for the client).
  bool drop = false;
  // Close the connection once the reply is written, without saying so
  // ("Connection: close"): a kept-alive connection the server ends while
  // the client holds it idle.
  bool close_after = false;
};

using HttpHandler = std::function<HttpReply(const HttpRequest&)>;

class HttpServer {
 public:
  // Starts listening on 127.0.0.1:0 (or `bind_address`:0, an IPv4 address)
  // and serving on a thread of its own. Default handler: 200, body "ok:<target>".
  explicit HttpServer(HttpHandler handler = {}, std::string bind_address = "127.0.0.1");
  ~HttpServer();  // stops the thread, closes every connection
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  std::uint16_t port() const;
  // "http://<bind address>:<port><path>"
  std::string url(std::string_view path = "/") const;

  // Requests whose head was fully read (counted before the handler runs).
  std::uint64_t requests() const;
  // Requests read whose reply has not been written yet (delayed ones included).
  std::int64_t in_flight() const;
  // Highest in_flight() seen since start.
  std::int64_t max_in_flight() const;
  // TCP connections accepted since start.
  std::uint64_t connections() const;

  // Writes every delayed reply waiting now at once, as if its delay had
  // ended: a test holds a reply with a long delay and releases it when what
  // it waits for has happened, instead of guessing a time. Replies delayed
  // after the call keep their delay. May be called from the handler.
  void release_delayed();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace gatherer::testing
