#pragma once
// The embedded mode's in-process cluster: a broker bound to an inproc://
// endpoint and a worker connected to it, in the client's ZeroMQ context
// (docs/architecture.md §2).
//
// Two definitions, one per library: embedded.cc (gatherer::client, the
// default: zero set-up) starts the real broker and worker; no_embedded.cc
// (gatherer::remote, for a program that only ever talks to a remote broker)
// refuses, so that such a program links neither the worker, libcurl nor
// oneTBB.

#include <memory>
#include <string>

namespace spdlog {
class logger;
}
namespace zmq {
class context_t;
}

namespace gatherer {

class EmbeddedCluster {
 public:
  virtual ~EmbeddedCluster() = default;
};

// Starts the broker on `endpoint`, then the worker. Throws gatherer::Error
// when either cannot start, or when this library has no embedded mode.
// Destroying the result stops the worker, then the broker.
std::unique_ptr<EmbeddedCluster> StartEmbeddedCluster(zmq::context_t& context, const std::string& endpoint,
                                                      std::shared_ptr<spdlog::logger> logger, unsigned io_threads);

}  // namespace gatherer
