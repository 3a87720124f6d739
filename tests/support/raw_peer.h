#pragma once
// Raw ZeroMQ peers speaking GTR/2 frame by frame. RawPeer is a DEALER
// playing a client or a worker against a real broker (broker/src/broker_test.cc,
// tests/protocol/broker_spec_test.cc). The functions serve tests whose fake
// broker is a raw ROUTER (tests/protocol/client_spec_test.cc, spec_test.cc,
// tests/fault/chaos_test.cc): configure and (re)bind the ROUTER as the real
// broker does, receive one routed message, expand index ranges.
//
// Thread-safety: a RawPeer, and a socket passed in, must be owned by the
// calling thread (ZeroMQ sockets are not thread-safe).

#include <algorithm>
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
#include "frames.h"
#include "socket_monitor.h"

namespace gatherer::testing {

// A raw DEALER playing a client or a worker. Owned by the test thread. A
// worker's RESULTS are numbered as GTR/2 asks (PROTOCOL.md §3.7.1); recv()
// skips the broker's ACKs and HEARTBEATs, recv_any() and recv_ack() read
// them where a test is about them.
class RawPeer {
 public:
  // `routing_id` empty: ZeroMQ picks one. `reconnect` false: a connection
  // the broker drops stays dropped (ZMQ_RECONNECT_IVL -1), as a dead one
  // would.
  RawPeer(zmq::context_t& ctx, const std::string& endpoint, const std::string& routing_id = {}, bool reconnect = true)
      : socket_(ctx, zmq::socket_type::dealer) {
    socket_.set(zmq::sockopt::linger, 0);
    if (!routing_id.empty()) socket_.set(zmq::sockopt::routing_id, routing_id);
    if (!reconnect) socket_.set(zmq::sockopt::reconnect_ivl, -1);
    socket_.connect(endpoint);
  }
  // Through the transport's send, which tells ThreadSanitizer that the frames
  // are handed to ZeroMQ's I/O thread (libzmq is not instrumented). A worker
  // numbers its RESULTS from 1 again after each READY (§3.7.1).
  void send(protocol::Frames&& frames) {
    if (CommandOf(frames) == protocol::Command::kReady) results_seq_ = 0;
    protocol::SendMessage(socket_, {}, frames, /*block=*/true);
  }
  // RESULTS for `indices` with this worker's next seq, body "<prefix><index>".
  void send_results(const SessionId& sid, const std::vector<std::uint64_t>& indices,
                    const std::string& prefix = "body") {
    send(ResultsFor(sid, ++results_seq_, indices, prefix));
  }
  std::uint64_t results_seq() const { return results_seq_; }
  // A live worker heartbeats while it waits (§3.4.3): with `on`, recv()
  // sends HEARTBEAT every 50 ms while it waits.
  void set_heartbeat(bool on) { heartbeat_ = on; }
  // How long recv() waits when not told.
  void set_recv_timeout(std::chrono::milliseconds timeout) { recv_timeout_ = timeout; }
  // Next message within `timeout`, HEARTBEAT and ACK included; empty if none came.
  protocol::Frames recv_any(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    zmq::pollitem_t item{socket_.handle(), 0, ZMQ_POLLIN, 0};
    zmq::poll(&item, 1, timeout);
    protocol::Frames frames;
    (void)zmq::recv_multipart(socket_, std::back_inserter(frames), zmq::recv_flags::dontwait);
    return frames;
  }
  // Next message other than HEARTBEAT and ACK (the broker's beats, its
  // answer to READY and its acknowledgements of a worker's RESULTS, §3.4.1,
  // §3.7.2) within `timeout`; empty if none came.
  protocol::Frames recv(std::chrono::milliseconds timeout) {
    using std::chrono::milliseconds;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= milliseconds(0)) return {};
      if (heartbeat_) send(protocol::EncodeHeartbeat());
      protocol::Frames frames = recv_any(heartbeat_ ? std::min(left, milliseconds(50)) : left);
      const auto c = CommandOf(frames);
      if (!frames.empty() && c != protocol::Command::kHeartbeat && c != protocol::Command::kAck) return frames;
    }
  }
  protocol::Frames recv() { return recv(recv_timeout_); }
  // The value of the next ACK within `timeout` (HEARTBEATs skipped), or
  // nullopt if another message or none came.
  std::optional<std::uint64_t> recv_ack(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= std::chrono::milliseconds(0)) return std::nullopt;
      protocol::Frames frames = recv_any(left);
      if (CommandOf(frames) == protocol::Command::kHeartbeat) continue;
      if (CommandOf(frames) != protocol::Command::kAck) return std::nullopt;
      auto ack = protocol::DecodeAck(frames);
      if (!ack || ack->session) return std::nullopt;  // to a worker: [ack] (§3.5)
      return ack->seq;
    }
  }
  // Waits for the broker's answer to READY, HEARTBEAT [0] (§3.4.1); ACKs of
  // what it sent before are skipped. False if something else or nothing came.
  bool await_ready_answer(std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= std::chrono::milliseconds(0)) return false;
      protocol::Frames frames = recv_any(left);
      if (frames.empty()) continue;
      const auto c = CommandOf(frames);
      if (c == protocol::Command::kAck) continue;
      if (c != protocol::Command::kHeartbeat) return false;
      auto beat = protocol::DecodeBrokerHeartbeat(frames);
      return beat && !beat->session && beat->seq == 0;
    }
  }
  zmq::socket_t& socket() { return socket_; }

 private:
  zmq::socket_t socket_;
  bool heartbeat_ = false;
  std::chrono::milliseconds recv_timeout_ = std::chrono::seconds(5);
  std::uint64_t results_seq_ = 0;
};

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
