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

class LoopDriver;

class EmbeddedCluster {
 public:
  virtual ~EmbeddedCluster() = default;
  // What runs the broker's and the worker's loops: a thread of its own,
  // which a run's thread takes the lead of while it waits (LoopDriver).
  virtual LoopDriver& driver() = 0;
};

// Starts the broker on `endpoint`, then the worker, both driven by one
// LoopDriver. Throws gatherer::Error when either cannot start, or when this
// library has no embedded mode. Destroying the result stops the driver, the
// worker, then the broker.
std::unique_ptr<EmbeddedCluster> StartEmbeddedCluster(zmq::context_t& context, const std::string& endpoint,
                                                      std::shared_ptr<spdlog::logger> logger, unsigned io_threads);

}  // namespace gatherer
