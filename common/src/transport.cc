#include "gatherer/transport.h"

#include <iterator>

#include <zmq_addon.hpp>

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define GATHERER_TSAN 1
#endif

namespace gatherer::protocol {
namespace {

void Release([[maybe_unused]] zmq::message_t& frame) {
#ifdef GATHERER_TSAN
  __tsan_release(frame.data());
#endif
}

void Acquire([[maybe_unused]] zmq::message_t& frame) {
#ifdef GATHERER_TSAN
  __tsan_acquire(frame.data());
#endif
}

}  // namespace

void ConfigureSocket(zmq::socket_t& socket) {
  socket.set(zmq::sockopt::maxmsgsize, kMaxMessageBytes);
  socket.set(zmq::sockopt::linger, 0);
  // A blocking send gives up after this long instead of hanging: a DEALER
  // whose connection ZeroMQ dropped for good (after a protocol error, say)
  // has nowhere to queue (the caller reports the broker unreachable).
  socket.set(zmq::sockopt::sndtimeo, 5000);
  socket.set(zmq::sockopt::sndhwm, 100'000);
  socket.set(zmq::sockopt::rcvhwm, 100'000);
}

SendResult SendMessage(zmq::socket_t& socket, std::string_view routing_id, Frames& frames, bool block) {
  const auto first = block ? zmq::send_flags::none : zmq::send_flags::dontwait;
  try {
    for (auto& f : frames) Release(f);
    if (!routing_id.empty()) {
      if (!socket.send(zmq::buffer(routing_id.data(), routing_id.size()), zmq::send_flags::sndmore | first)) {
        return SendResult::kWouldBlock;
      }
    }
    for (std::size_t i = 0; i < frames.size(); ++i) {
      auto flags = first;
      if (i + 1 < frames.size()) flags = flags | zmq::send_flags::sndmore;
      // After the first part is accepted the rest of a multipart message is
      // queued atomically; only the first can report EAGAIN.
      if (!socket.send(frames[i], flags)) return SendResult::kWouldBlock;
    }
    return SendResult::kSent;
  } catch (const zmq::error_t& e) {
    return e.num() == EHOSTUNREACH ? SendResult::kUnreachable : SendResult::kFailed;
  }
}

bool ReceiveMessage(zmq::socket_t& socket, Frames& frames) {
  frames.clear();
  std::optional<std::size_t> got;
  try {
    got = zmq::recv_multipart(socket, std::back_inserter(frames), zmq::recv_flags::dontwait);
  } catch (const zmq::error_t& e) {
    if (e.num() == ETERM) throw;
    return false;
  }
  if (!got) return false;
  for (auto& f : frames) Acquire(f);
  return true;
}

}  // namespace gatherer::protocol
