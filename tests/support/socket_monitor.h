#pragma once
// Helpers for spec tests that look at ZeroMQ connections rather than
// messages: SocketMonitor reports a socket's connection events
// (zmq_socket_monitor), ZeroPagesMessage builds a huge frame that costs no
// memory, to check ZMQ_MAXMSGSIZE (PROTOCOL.md §1.3).
//
// Thread-safety: a SocketMonitor belongs to the thread that owns the
// monitored socket; it must be destroyed before that socket is closed.

#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>

#include <zmq.hpp>

namespace gatherer::testing {

class SocketMonitor {
 public:
  // Starts reporting `events` (ZMQ_EVENT_* bits) of `socket` from now on.
  SocketMonitor(zmq::context_t& ctx, zmq::socket_t& socket, int events)
      : socket_(socket), pair_(ctx, zmq::socket_type::pair) {
    static std::atomic<int> counter{0};
    const std::string address = "inproc://gatherer-monitor-" + std::to_string(counter.fetch_add(1));
    if (zmq_socket_monitor(socket_.handle(), address.c_str(), events) != 0) throw zmq::error_t();
    pair_.set(zmq::sockopt::linger, 0);
    pair_.connect(address);
  }
  ~SocketMonitor() { zmq_socket_monitor(socket_.handle(), nullptr, 0); }
  SocketMonitor(const SocketMonitor&) = delete;
  SocketMonitor& operator=(const SocketMonitor&) = delete;

  // True as soon as `event` is reported; false if it is not within `timeout`.
  bool wait_for(int event, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= std::chrono::milliseconds(0)) return false;
      zmq::pollitem_t item{pair_.handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, left);
      // An event is two frames: [uint16 event, uint32 value] and the endpoint.
      zmq::message_t head, endpoint;
      if (!pair_.recv(head, zmq::recv_flags::dontwait)) continue;
      if (head.more()) (void)pair_.recv(endpoint);
      std::uint16_t id = 0;
      if (head.size() >= sizeof(id)) std::memcpy(&id, head.data(), sizeof(id));
      if (id == event) return true;
    }
  }

 private:
  zmq::socket_t& socket_;
  zmq::socket_t pair_;
};

// A frame of `size` zero bytes backed by untouched anonymous pages: sending
// it reads the kernel's shared zero page, so even 256 MiB cost no memory.
inline zmq::message_t ZeroPagesMessage(std::size_t size) {
  void* data = mmap(nullptr, size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (data == MAP_FAILED) throw std::bad_alloc();
  return zmq::message_t(
      data, size, [](void* p, void* hint) { munmap(p, reinterpret_cast<std::size_t>(hint)); },
      reinterpret_cast<void*>(size));
}

}  // namespace gatherer::testing
