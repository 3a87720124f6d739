#pragma once
// MetricsHttpServer: serves Prometheus' text exposition format (version
// 0.0.4) at GET /metrics on ADDR:PORT, with libmicrohttpd on a thread of its
// own. The render callback runs on that thread for each scrape: it reads
// relaxed atomics and text the owner publishes, never the owner's locks on a
// hot path. Used by gatherer-broker and gatherer-worker (--metrics).
//
// Thread-safety: start() and stop() from the owning thread; render is called
// from the server's thread.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "gatherer/status.h"

namespace gatherer {

class MetricsHttpServer {
 public:
  using Render = std::function<std::string()>;
  explicit MetricsHttpServer(Render render);
  ~MetricsHttpServer();  // stops
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Listens on "ADDR:PORT" (an IPv4 address; port 0 = any free port).
  // InvalidArgument for a malformed address, Unavailable if it cannot bind.
  [[nodiscard]] Status start(const std::string& address);
  void stop();
  // The bound port (after start()).
  std::uint16_t port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Prometheus text helpers: a label value escaped (\\, \", \n).
std::string PromEscape(const std::string& value);

}  // namespace gatherer
