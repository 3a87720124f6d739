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

#include <optional>
#include <string_view>

#include <zmq.hpp>

#include "gatherer/protocol.h"

namespace gatherer::protocol {

// Applies the options every Gatherer socket shares (PROTOCOL.md §1.3, §5):
// ZMQ_MAXMSGSIZE, no linger (unsent messages are never waited for: leases
// and heartbeats recover them), and high-water marks high enough that end to
// end windows, not ZeroMQ, bound the queues.
void ConfigureSocket(zmq::socket_t& socket);

enum class SendResult { kSent, kWouldBlock, kUnreachable, kFailed };

// Sends `frames` as one message, preceded by `routing_id` when it is not
// empty (ROUTER sockets). With block = false a full queue is kWouldBlock;
// with true it waits for room (a DEALER's natural back-pressure). A gone
// ROUTER peer is kUnreachable (ROUTER_MANDATORY). Frames are consumed.
SendResult SendMessage(zmq::socket_t& socket, std::string_view routing_id, Frames& frames, bool block = false);

// Receives one whole message without blocking into `frames` (cleared first).
// False when none is waiting; throws zmq::error_t only for ETERM.
bool ReceiveMessage(zmq::socket_t& socket, Frames& frames);

}  // namespace gatherer::protocol
