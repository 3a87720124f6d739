#pragma once
// Sending and receiving whole Gatherer messages on a ZeroMQ socket. Every
// socket owner (broker loop, worker socket thread, client) goes through these
// two functions, so the rules live in one place:
//  - a multipart message is queued whole or not at all;
//  - ZeroMQ errors become return values, never exceptions in the loops;
//  - under ThreadSanitizer, a message's frames carry a happens-before edge
//    from sender to receiver. Debian's libzmq is not instrumented, so TSan
//    cannot see that the hand-off through an inproc pipe synchronises; the
//    annotation states what ZeroMQ guarantees.
//
// Thread-safety: the caller must own the socket (ZeroMQ sockets are not
// thread-safe).

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include <zmq.hpp>

#include "gatherer/ids.h"
#include "gatherer/protocol.h"

namespace gatherer::protocol {

// Applies the options every Gatherer socket shares (PROTOCOL.md §1.3, §1.6,
// §5): ZMQ_MAXMSGSIZE, no linger (unsent messages are never waited for:
// acknowledgements and resynchronisation recover them), high-water marks high
// enough that end-to-end windows, not ZeroMQ, bound the queues, and ZMTP
// heartbeats sized from the application's `heartbeat` period, so that a link
// that went silent is dropped (and a connecting socket reconnects) after
// about 1.5 periods, well before a peer is presumed dead (3 periods).
void ConfigureSocket(zmq::socket_t& socket, std::chrono::milliseconds heartbeat = std::chrono::milliseconds(1000));

// A routing id of its own for a connecting socket, so that a reconnect keeps
// its routes at the broker (ZMQ_ROUTER_HANDOVER, PROTOCOL.md §1.5): a client
// is 'c' + its session id, a worker 'w' + 16 random bytes of its instance.
std::string ClientRoutingId(const SessionId& session);
std::string WorkerRoutingId(const SessionId& instance);

// Reports when a connecting socket has been connected again: ZeroMQ
// reconnects a DEALER by itself, and whatever was in flight on the old
// connection may be lost, so the owner resynchronises with the broker
// (PROTOCOL.md §3.6, §3.7). Built on zmq_socket_monitor over an inproc PAIR.
//
// Thread-safety: owned by the thread that owns the watched socket; must be
// destroyed before that socket is closed.
class ReconnectWatch {
 public:
  ReconnectWatch(zmq::context_t& context, zmq::socket_t& socket);
  ~ReconnectWatch();
  ReconnectWatch(const ReconnectWatch&) = delete;
  ReconnectWatch& operator=(const ReconnectWatch&) = delete;

  // For zmq::poll: readable when there are events to read.
  zmq::socket_t& events() { return pair_; }
  // Reads every pending event; true if a handshake succeeded on a
  // connection after an earlier one (a reconnect) since the last call.
  bool reconnected();
  // Why the last handshake was refused (CURVE: a key the broker does not
  // list, or one side using CURVE and the other not), once read by
  // reconnected(); empty after a handshake succeeded. ZeroMQ keeps retrying,
  // so the owner decides when to give up.
  const std::string& refused() const { return refused_; }

 private:
  zmq::socket_t& socket_;
  zmq::socket_t pair_;
  int handshakes_ = 0;
  std::string refused_;
};

// False for a tcp:// endpoint that other machines can reach: any address
// but 127.0.0.0/8, ::1 and localhost (wildcards included). ipc:// and
// inproc:// are local.
bool IsLoopbackEndpoint(std::string_view endpoint);

enum class SendResult { kSent, kWouldBlock, kUnreachable, kFailed };

// Sends `frames` as one message, preceded by `routing_id` when it is not
// empty (ROUTER sockets). With block = false a full queue is kWouldBlock;
// with true it waits for room (a DEALER's natural back-pressure). A gone
// ROUTER peer is kUnreachable (ROUTER_MANDATORY). Frames are consumed.
SendResult SendMessage(zmq::socket_t& socket, std::string_view routing_id, Frames& frames, bool block = false);

// A copy of every frame of `frames` sharing their buffers (zmq_msg_copy:
// bodies are reference-counted, not copied): what a sender keeps of a
// message until it is acknowledged, and sends again (PROTOCOL.md §3.6, §3.7).
Frames CopyFrames(Frames& frames);

// Receives one whole message without blocking into `frames` (cleared first).
// False when none is waiting; throws zmq::error_t only for ETERM.
bool ReceiveMessage(zmq::socket_t& socket, Frames& frames);

}  // namespace gatherer::protocol
