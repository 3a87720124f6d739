#pragma once
// Helpers for tests whose fake broker is a raw ZeroMQ ROUTER speaking GTR/2
// frame by frame (tests/protocol/client_spec_test.cc, spec_test.cc,
// tests/fault/chaos_test.cc): configure and (re)bind the ROUTER as the real
// broker does, receive one routed message, copy frames, expand index ranges.
//
// Thread-safety: plain functions; a socket passed in must be owned by the
// calling thread (ZeroMQ sockets are not thread-safe).

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "socket_monitor.h"

namespace gatherer::testing {

// One message as the fake broker's ROUTER receives it.
struct Routed {
  std::string peer;          // routing id of the sender's connection
  protocol::Frames frames;   // the frames after the routing id
  std::optional<protocol::Command> command;  // nullopt: malformed
};

// Sets the options the real broker sets on its ROUTER (PROTOCOL.md §1.2,
// §1.5): a message to a gone peer is reported, and a peer that reconnects
// under its routing id takes its route over. No linger: a test never waits
// for what it sent to a peer that left.
inline void ConfigureFakeBroker(zmq::socket_t& router) {
  router.set(zmq::sockopt::linger, 0);
  router.set(zmq::sockopt::router_mandatory, 1);
  router.set(zmq::sockopt::router_handover, 1);
}

// The next message on `router` within `timeout`, or nullopt.
inline std::optional<Routed> RecvRouted(zmq::socket_t& router, std::chrono::milliseconds timeout) {
  zmq::pollitem_t item{router.handle(), 0, ZMQ_POLLIN, 0};
  zmq::poll(&item, 1, timeout);
  protocol::Frames frames;
  // ReceiveMessage tells ThreadSanitizer about the hand-off from ZeroMQ's
  // I/O thread (libzmq is not instrumented).
  if (!protocol::ReceiveMessage(router, frames) || frames.empty()) return std::nullopt;
  Routed m;
  m.peer = frames[0].to_string();
  m.frames.assign(std::make_move_iterator(frames.begin() + 1), std::make_move_iterator(frames.end()));
  auto c = protocol::PeekCommand(m.frames);
  if (c) m.command = *c;
  return m;
}



// Stops listening on `endpoint` ("tcp://127.0.0.1:port" or "ipc://path"),
// waits until ZeroMQ, which does it asynchronously, has closed the
// listener, then closes `router` and every connection it had: a broker that
// went away, as its peers see it. False if the listener did not close
// within `timeout`.
inline bool CloseRouter(zmq::context_t& ctx, zmq::socket_t& router, const std::string& endpoint,
                        std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  {
    SocketMonitor monitor(ctx, router, ZMQ_EVENT_CLOSED);
    router.unbind(endpoint);
    if (!monitor.wait_for(ZMQ_EVENT_CLOSED, timeout)) return false;
  }
  router.close();
  return true;
}

// Makes `router` a new ROUTER, configured as ConfigureFakeBroker says, bound
// at `endpoint` (where a closed one listened): the broker is back. A port
// still held by the old listener is retried until `timeout`.
inline bool BindRouter(zmq::context_t& ctx, zmq::socket_t& router, const std::string& endpoint,
                       std::chrono::milliseconds timeout = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  router = zmq::socket_t(ctx, zmq::socket_type::router);
  ConfigureFakeBroker(router);
  for (;;) {
    try {
      router.bind(endpoint);
      return true;
    } catch (const zmq::error_t& e) {
      if (e.num() != EADDRINUSE || std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
}

// CloseRouter, then BindRouter: a broker restarted in place; every peer's
// connection drops and ZeroMQ connects it again.
inline bool ReplaceRouter(zmq::context_t& ctx, zmq::socket_t& router, const std::string& endpoint) {
  return CloseRouter(ctx, router, endpoint) && BindRouter(ctx, router, endpoint);
}

// The indices a list of ranges names, in order.
inline std::vector<std::uint64_t> Expand(const std::vector<protocol::IndexRange>& ranges) {
  std::vector<std::uint64_t> out;
  for (const auto& r : ranges) {
    for (std::uint64_t i = 0; i < r.count; ++i) out.push_back(r.first + i);
  }
  return out;
}

}  // namespace gatherer::testing
