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
// Thread-safety: a PollSet is owned and used by the loop's thread only;
// LoopDriver (below) says how a loop is handed between threads.

#include <poll.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "gatherer/wake_fd.h"

#include "gatherer/transport.h"

namespace gatherer {

class PollSet {
 public:
  using Clock = std::chrono::steady_clock;

  // What to wait on; each returns the index ready() takes.
  std::size_t add(zmq::socket_t& socket);
  // Readable when signalled; drained by wait_until().
  std::size_t add(WakeFd& wake);
  // Any other descriptor, waited on for reading and left as it is (an
  // epoll set: readable while one of its descriptors is).
  std::size_t add(int fd);

  // Waits until something is ready or `deadline` passes (see above); a past
  // deadline looks without waiting. False once the ZeroMQ context is
  // terminated (the owner is shutting down); an interrupted poll (EINTR)
  // returns true with nothing ready.
  bool wait_until(Clock::time_point deadline);
  // Looks without waiting.
  bool poll_now() { return wait_until(Clock::time_point::min()); }

  bool ready(std::size_t i) const { return ready_flags_[i] != 0; }
  bool any_ready() const { return ready_ > 0; }
  std::size_t size() const { return fds_.size(); }
  // Drops every item from index `n` on (a LoopDriver's parts, when its
  // leader lets go).
  void truncate(std::size_t n);

 private:
  std::size_t add_item(void* socket, WakeFd* wake, int fd);
  // 1 if the socket has a message, 0 if not, -1 once the context is
  // terminated.
  int readable(std::size_t i) const;
  void mark(std::size_t i) {
    ready_flags_[i] = 1;
    ++ready_;
  }

  // Beside each other, one entry per item: the ZeroMQ socket (null for a
  // descriptor), the WakeFd (null for a socket or a plain descriptor), and
  // the descriptor polled: the socket's ZMQ_FD, the WakeFd's, or the one
  // given.
  std::vector<void*> sockets_;
  std::vector<WakeFd*> wakes_;
  std::vector<pollfd> fds_;
  std::vector<char> ready_flags_;
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

// A loop that another thread may run: the embedded cluster's broker and
// worker, both driven by one LoopDriver (docs/architecture.md §2). A part
// owns its state and sockets; whoever drives it holds the driver's lock.
class LoopPart {
 public:
  using Clock = std::chrono::steady_clock;
  enum class Step {
    kIdle,  // nothing came in
    kBusy,  // took something in, and may have sent to the other parts
    kDone,  // finished (its context terminated, or it drained): not stepped again
  };
  virtual ~LoopPart() = default;
  // Adds what it waits on to `poll` and returns the index of the first item.
  virtual std::size_t add_to(PollSet& poll) = 0;
  // Bumped whenever what it waits on changes (a new socket): every PollSet
  // it was added to is built again.
  virtual std::uint64_t generation() const = 0;
  // When it must run next, whatever arrives (heartbeats, expiries, grants).
  virtual Clock::time_point next_due() const = 0;
  // Takes in what is waiting, whether or not `poll` saw it ready (another
  // part driven beside it may have sent it something since), and does what
  // is due. `poll` is the wait that just returned, with this part's items
  // from `first` on, or null when none was made since its last step.
  virtual Step step(const PollSet* poll, std::size_t first) = 0;
};

// Runs LoopParts on a thread of its own, and lets one other thread, the
// *leader*, run them in its own poll step instead while it waits anyway:
// in the embedded mode the client's thread leads during a run, so a result
// travels I/O thread -> client thread with no broker or worker thread woken
// between them. When the leader has not taken a turn for `grace` (its caller
// is busy with a response), the driver's thread stands in with a look at
// every part, so heartbeats, leases and dispatch never wait on the caller.
//
// Thread-safety: lead(), unlead() and turn() by the leading thread;
// start() and stop() by the owner. The parts are only ever touched by the
// thread holding the lock, so ZeroMQ sockets pass between threads behind a
// full barrier, as ZeroMQ requires.
class LoopDriver {
 public:
  using Clock = std::chrono::steady_clock;
  // `parts` are stepped in this order each pass, again while any is busy.
  explicit LoopDriver(std::vector<LoopPart*> parts, std::chrono::milliseconds grace = std::chrono::milliseconds(20));
  ~LoopDriver();  // stop()
  LoopDriver(const LoopDriver&) = delete;
  LoopDriver& operator=(const LoopDriver&) = delete;

  void start();
  void stop();

  // The calling thread leads from now until unlead(): the parts' items are
  // added to `poll` after the leader's own, and turn() drives them.
  void lead(PollSet& poll);
  void unlead();
  // The leader's poll step: waits on its PollSet (its own items and the
  // parts') until `deadline` or the parts' next due time (a past deadline
  // looks without waiting), then steps the parts. False once the context
  // is terminated.
  bool turn(Clock::time_point deadline);

 private:
  struct Seat {  // the parts' items in one PollSet
    PollSet* poll = nullptr;
    std::size_t own = 0;  // the PollSet's own items, before the parts'
    std::uint64_t generation = ~std::uint64_t{0};
    std::vector<std::size_t> first;
  };
  void seat(Seat& seat);
  Clock::time_point next_due() const;
  void step(const PollSet& poll, const Seat& seat);
  void run();

  std::vector<LoopPart*> parts_;
  std::vector<bool> done_;
  const std::chrono::milliseconds grace_;
  std::mutex mu_;  // held by whoever drives the parts
  std::condition_variable cv_;
  bool leading_ = false;               // under mu_
  Seat leader_;                        // under mu_
  Clock::time_point last_turn_;        // under mu_: the leader's last turn
  std::atomic<bool> want_lead_{false};
  std::atomic<bool> stopping_{false};
  WakeFd wake_;  // lead() and stop() wake the driver's thread out of its poll
  std::thread thread_;
};

}  // namespace gatherer
