#pragma once
// Request handlers shared by cross-component tests.

#include <atomic>
#include <chrono>
#include <cstdio>
#include <string>

#include "http_server.h"

namespace gatherer::testing {

// "/d/<index>/<delay ms>" replies 200 "body-<index>" after the delay; any
// other path is a 404. Lets a test choose each statement's latency.
inline HttpReply DelayHandler(const HttpRequest& req) {
  HttpReply r;
  unsigned index = 0, delay = 0;
  if (std::sscanf(req.target.c_str(), "/d/%u/%u", &index, &delay) == 2) {
    r.delay = std::chrono::milliseconds(delay);
    r.body = "body-" + std::to_string(index);
  } else {
    r.status = 404;
  }
  return r;
}

// Holds replies until open(): a test looks at a run that cannot end
// meanwhile, whatever the machine's speed, instead of racing a clock. A held
// reply waits 20 s at most (below a statement's default timeout). Declare it
// before the HttpServer whose handler uses it.
class ReplyGate {
 public:
  // `reply`, held while the gate is closed.
  HttpReply hold(HttpReply reply) const {
    if (!open_.load()) reply.delay = std::chrono::seconds(20);
    return reply;
  }
  // Opens the gate and writes what it held.
  void open(HttpServer& server) {
    open_.store(true);
    server.release_delayed();
  }

 private:
  std::atomic<bool> open_{false};
};

// Any request: 200 after 5 s, longer than a test waits for it. Keeps
// transfers in flight while a test acts on them.
inline HttpReply SlowHandler(const HttpRequest&) {
  HttpReply r;
  r.delay = std::chrono::seconds(5);
  return r;
}

}  // namespace gatherer::testing
