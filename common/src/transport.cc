#include "gatherer/transport.h"

#include <algorithm>
#include <atomic>
#include <cstring>
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

void ConfigureSocket(zmq::socket_t& socket, std::chrono::milliseconds heartbeat) {
  socket.set(zmq::sockopt::maxmsgsize, kMaxMessageBytes);
  // §1.6: ZMTP PING every half period; a connection silent for 1.5 periods
  // (at least 1 s, so a loaded machine does not drop healthy links) is
  // closed, and a connecting socket then reconnects. A connect attempt that
  // gets no answer (a link that is down) is retried after the same time
  // rather than after the kernel's minutes of SYN retries.
  const int period = static_cast<int>(std::max<std::int64_t>(heartbeat.count(), 10));
  const int timeout = std::max(period * 3 / 2, 1000);
  socket.set(zmq::sockopt::heartbeat_ivl, std::max(period / 2, 100));
  socket.set(zmq::sockopt::heartbeat_timeout, timeout);
  socket.set(zmq::sockopt::heartbeat_ttl, timeout);
  socket.set(zmq::sockopt::connect_timeout, timeout);
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

Frames CopyFrames(Frames& frames) {
  Frames copy(frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) copy[i].copy(frames[i]);
  return copy;
}

bool IsLoopbackEndpoint(std::string_view endpoint) {
  constexpr std::string_view kTcp = "tcp://";
  if (!endpoint.starts_with(kTcp)) return true;
  std::string_view host = endpoint.substr(kTcp.size());
  if (const auto semicolon = host.find(';'); semicolon != std::string_view::npos) {
    host = host.substr(semicolon + 1);  // "source;destination": the destination counts
  }
  if (host.starts_with('[')) return host.starts_with("[::1]");
  host = host.substr(0, host.rfind(':'));
  return host == "localhost" || host.starts_with("127.");
}

std::string ClientRoutingId(const SessionId& session) { return "c" + std::string(session.raw()); }

std::string WorkerRoutingId(const SessionId& instance) { return "w" + std::string(instance.raw()); }

ReconnectWatch::ReconnectWatch(zmq::context_t& context, zmq::socket_t& socket)
    : socket_(socket), pair_(context, zmq::socket_type::pair) {
  static std::atomic<std::uint64_t> counter{0};
  const std::string address = "inproc://gatherer-reconnect-watch-" + std::to_string(counter.fetch_add(1));
  if (zmq_socket_monitor(socket_.handle(), address.c_str(),
                         ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH |
                             ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) != 0) {
    throw zmq::error_t();
  }
  pair_.set(zmq::sockopt::linger, 0);
  pair_.connect(address);
}

ReconnectWatch::~ReconnectWatch() { zmq_socket_monitor(socket_.handle(), nullptr, 0); }

bool ReconnectWatch::reconnected() {
  bool again = false;
  Frames frames;
  // Each event is two frames: [uint16 event, uint32 value], then the endpoint.
  while (ReceiveMessage(pair_, frames)) {
    if (frames.empty() || frames[0].size() < 2) continue;
    std::uint16_t event = 0;
    std::uint32_t value = 0;
    std::memcpy(&event, frames[0].data(), sizeof(event));
    if (frames[0].size() >= 6) std::memcpy(&value, static_cast<const char*>(frames[0].data()) + 2, sizeof(value));
    if (event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
      refused_ = "the broker refused this peer's CURVE key (authentication status " + std::to_string(value) +
                 "): its public key is not on the broker's allow-list";
      continue;
    }
    if (event == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
      refused_ = value == ZMQ_PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                     ? "security mismatch: the broker uses CURVE and this peer does not, or the other way round"
                     : "the connection's handshake failed (ZeroMQ protocol error " + std::to_string(value) +
                           "; with CURVE, check the broker's public key)";
      continue;
    }
    refused_.clear();
    if (++handshakes_ > 1) again = true;
  }
  return again;
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
