#include "gatherer/event_loop.h"

#include <algorithm>
#include <cerrno>

#include "gatherer/thread_name.h"
#include "gatherer/wake_fd.h"

namespace gatherer {

std::size_t PollSet::add(zmq::socket_t& socket) {
  return add_item(socket.handle(), nullptr, socket.get(zmq::sockopt::fd));
}

std::size_t PollSet::add(WakeFd& wake) { return add_item(nullptr, &wake, wake.fd()); }

std::size_t PollSet::add(int fd) { return add_item(nullptr, nullptr, fd); }

std::size_t PollSet::add_item(void* socket, WakeFd* wake, int fd) {
  sockets_.push_back(socket);
  wakes_.push_back(wake);
  fds_.push_back({fd, POLLIN, 0});
  ready_flags_.push_back(0);
  return fds_.size() - 1;
}

void PollSet::truncate(std::size_t n) {
  if (n >= fds_.size()) return;
  sockets_.resize(n);
  wakes_.resize(n);
  fds_.resize(n);
  ready_flags_.resize(n);
  ready_ = 0;
}

int PollSet::readable(std::size_t i) const {
  int events = 0;
  std::size_t size = sizeof events;
  if (zmq_getsockopt(sockets_[i], ZMQ_EVENTS, &events, &size) != 0) return zmq_errno() == ETERM ? -1 : 0;
  return (events & ZMQ_POLLIN) != 0 ? 1 : 0;
}

// One poll(2) over the descriptors, in place of zmq_poll, which polls twice
// (first without waiting) and asks every socket for ZMQ_EVENTS after each:
// four system calls per socket per wait, a third of a busy client's.
//
// A socket's ZMQ_FD only says that its mailbox has commands; what a send or
// receive on the socket took in shows in ZMQ_EVENTS alone, and the
// descriptor does not fire for it again. So every socket is asked for
// ZMQ_EVENTS before the wait, and after it only those whose descriptor
// fired: nothing readable is ever waited past.
bool PollSet::wait_until(Clock::time_point deadline) {
  ready_ = 0;
  std::fill(ready_flags_.begin(), ready_flags_.end(), 0);
  for (std::size_t i = 0; i < fds_.size(); ++i) {
    if (sockets_[i] == nullptr) continue;
    const int r = readable(i);
    if (r < 0) return false;
    if (r > 0) mark(i);
  }
  while (true) {
    int timeout = 0;
    if (ready_ == 0 && deadline != Clock::time_point::min()) {
      // Rounded up: poll counts whole milliseconds, and waking before the
      // deadline would only poll again with timeout 0 until it passed.
      timeout = static_cast<int>(std::clamp<std::int64_t>(
          std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count(), 0, 1 << 30));
    }
    const int n = ::poll(fds_.data(), fds_.size(), timeout);
    if (n < 0) return true;  // EINTR: nothing new, go round
    for (std::size_t i = 0; n > 0 && i < fds_.size(); ++i) {
      if ((fds_[i].revents & (POLLIN | POLLERR | POLLHUP)) == 0 || ready_flags_[i] != 0) continue;
      if (sockets_[i] == nullptr) {
        mark(i);
        if (wakes_[i] != nullptr) wakes_[i]->drain();
        continue;
      }
      const int r = readable(i);
      if (r < 0) return false;
      if (r > 0) mark(i);
    }
    // A socket's descriptor that fired for commands alone is no reason to
    // return before the deadline.
    if (ready_ > 0 || timeout == 0) return true;
  }
}

// ---- LoopDriver ----

LoopDriver::LoopDriver(std::vector<LoopPart*> parts, std::chrono::milliseconds grace)
    : parts_(std::move(parts)), done_(parts_.size(), false), grace_(grace) {}

LoopDriver::~LoopDriver() { stop(); }

void LoopDriver::start() {
  if (thread_.joinable()) return;
  stopping_.store(false, std::memory_order_release);
  thread_ = std::thread([this] { run(); });
}

void LoopDriver::stop() {
  if (!thread_.joinable()) return;
  stopping_.store(true, std::memory_order_release);
  wake_.signal();  // out of its poll, which holds the lock
  {
    // Taken so that the flag cannot fall between a wait's check and its
    // sleep.
    std::lock_guard lock(mu_);
  }
  cv_.notify_all();
  thread_.join();
}

// The parts' items at the end of `seat.poll`, again whenever a part's
// sockets changed.
void LoopDriver::seat(Seat& seat) {
  std::uint64_t generation = 0;
  for (const LoopPart* p : parts_) generation += p->generation();
  if (generation == seat.generation && seat.first.size() == parts_.size()) return;
  seat.poll->truncate(seat.own);
  seat.first.clear();
  for (LoopPart* p : parts_) seat.first.push_back(p->add_to(*seat.poll));
  seat.generation = generation;
}

LoopDriver::Clock::time_point LoopDriver::next_due() const {
  auto due = Clock::time_point::max();
  for (std::size_t i = 0; i < parts_.size(); ++i) {
    if (!done_[i]) due = std::min(due, parts_[i]->next_due());
  }
  return due;
}

// Steps the parts in order, and goes on round them while one was busy: a
// busy part may have sent to the others (RESULTS from the worker to the
// broker, then DISPATCH back), and each of them takes that in before the
// pass ends, rather than one poll later. Bounded, so the leader's own
// messages are never starved.
void LoopDriver::step(const PollSet& poll, const Seat& seat) {
  const std::size_t n = parts_.size();
  constexpr std::size_t kMaxSteps = 8;
  std::size_t idle_run = 0;
  for (std::size_t k = 0; k < kMaxSteps && (k < n || idle_run + 1 < n); ++k) {
    const std::size_t i = k % n;
    if (done_[i]) {
      ++idle_run;
      continue;
    }
    switch (parts_[i]->step(k < n ? &poll : nullptr, seat.first[i])) {
      case LoopPart::Step::kBusy:
        idle_run = 0;
        break;
      case LoopPart::Step::kDone:
        done_[i] = true;
        [[fallthrough]];
      case LoopPart::Step::kIdle:
        ++idle_run;
        break;
    }
  }
}

void LoopDriver::lead(PollSet& poll) {
  want_lead_.store(true, std::memory_order_release);
  wake_.signal();  // out of its poll, which holds the lock
  {
    std::lock_guard lock(mu_);
    want_lead_.store(false, std::memory_order_release);
    leading_ = true;
    leader_ = Seat{&poll, poll.size(), ~std::uint64_t{0}, {}};
    seat(leader_);
    last_turn_ = Clock::now();
  }
  cv_.notify_all();  // it waits for the lead to be taken, then stands by
}

void LoopDriver::unlead() {
  {
    std::lock_guard lock(mu_);
    if (!leading_) return;
    leading_ = false;
    leader_.poll->truncate(leader_.own);
    leader_ = Seat{};
  }
  cv_.notify_all();
}

bool LoopDriver::turn(Clock::time_point deadline) {
  std::lock_guard lock(mu_);
  seat(leader_);
  const bool alive = leader_.poll->wait_until(std::min(deadline, next_due()));
  if (alive) step(*leader_.poll, leader_);
  last_turn_ = Clock::now();
  return alive;
}

void LoopDriver::run() {
  NameThisThread("gatherer-driver");
  PollSet poll;
  poll.add(wake_);
  Seat own{&poll, poll.size(), ~std::uint64_t{0}, {}};
  std::unique_lock lock(mu_);
  while (!stopping_.load(std::memory_order_acquire)) {
    if (leading_ || want_lead_.load(std::memory_order_acquire)) {
      if (!leading_) {
        // lead() is waiting for the lock: let it have it.
        cv_.wait(lock, [&] { return leading_ || stopping_.load() || !want_lead_.load(); });
        continue;
      }
      // The leader drives. Stand in only when it has not taken a turn for
      // `grace`: its caller is busy, and the parts must not wait on it.
      const auto due = last_turn_ + grace_;
      if (Clock::now() < due) {
        cv_.wait_until(lock, due);
        continue;
      }
      seat(own);
      if (!poll.poll_now()) return;
      step(poll, own);
      last_turn_ = Clock::now();
      continue;
    }
    seat(own);
    if (!poll.wait_until(next_due())) return;
    step(poll, own);
  }
}

}  // namespace gatherer
