#pragma once
// The one poll step of every ZeroMQ loop in Gatherer: the broker's ROUTER
// loop, the worker's DEALER loop and the client's pump (docs/architecture.md
// §5). Each loop owns a PollSet of what it waits on, computes its own next
// deadline (heartbeats, expiries, rate grants) and calls wait_until(); what a
// loop does with what is ready stays its own.
//
// What the shared step guarantees, so no loop gets it wrong again:
// - a deadline is rounded up to poll's whole milliseconds: a deadline less
//   than a millisecond away is waited for, not polled with timeout 0 over
//   and over until it passes (a spinning loop);
// - a WakeFd that fired is drained before wait_until() returns: a signal is
//   seen once, and never makes every later poll return at once;
// - ReceiveBatch() takes a bounded number of messages per pass, so a flood
//   on one socket never starves the loop's heartbeats and timers.
//
// Thread-safety: owned and used by the loop's thread only.

#include <chrono>
#include <cstddef>
#include <vector>
#include <zmq.hpp>

#include "gatherer/transport.h"

namespace gatherer {

class WakeFd;

class PollSet {
 public:
  using Clock = std::chrono::steady_clock;

  // What to wait on; each returns the index ready() takes.
  std::size_t add(zmq::socket_t& socket);
  // Readable when signalled; drained by wait_until().
  std::size_t add(WakeFd& wake);
  // A socket replaced (a reconnect builds a new one) at index `i`.
  void replace(std::size_t i, zmq::socket_t& socket);

  // Waits until something is ready or `deadline` passes (see above); a past
  // deadline looks without waiting. False once the ZeroMQ context is
  // terminated (the owner is shutting down); an interrupted poll (EINTR)
  // returns true with nothing ready.
  bool wait_until(Clock::time_point deadline);
  // Looks without waiting.
  bool poll_now() { return wait_until(Clock::time_point::min()); }

  bool ready(std::size_t i) const { return (items_[i].revents & ZMQ_POLLIN) != 0; }
  bool any_ready() const { return ready_ > 0; }

 private:
  std::vector<zmq::pollitem_t> items_;
  std::vector<WakeFd*> wakes_;  // beside items_: null for a socket
  int ready_ = 0;
};

// Receives up to `max` messages waiting on `socket` and hands each to
// `handle(frames)`. False once the context is terminated.
template <typename Handle>
bool ReceiveBatch(zmq::socket_t& socket, protocol::Frames& frames, int max, Handle&& handle) {
  try {
    for (int i = 0; i < max && protocol::ReceiveMessage(socket, frames); ++i) handle(frames);
  } catch (const zmq::error_t&) {
    return false;  // ETERM: ReceiveMessage throws for nothing else
  }
  return true;
}

}  // namespace gatherer
