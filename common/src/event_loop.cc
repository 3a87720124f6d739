#include "gatherer/event_loop.h"

#include <algorithm>
#include <cerrno>

#include "gatherer/wake_fd.h"

namespace gatherer {

std::size_t PollSet::add(zmq::socket_t& socket) {
  items_.push_back({socket.handle(), 0, ZMQ_POLLIN, 0});
  wakes_.push_back(nullptr);
  return items_.size() - 1;
}

std::size_t PollSet::add(WakeFd& wake) {
  items_.push_back({nullptr, wake.fd(), ZMQ_POLLIN, 0});
  wakes_.push_back(&wake);
  return items_.size() - 1;
}

void PollSet::replace(std::size_t i, zmq::socket_t& socket) { items_[i].socket = socket.handle(); }

void PollSet::truncate(std::size_t n) {
  if (n >= items_.size()) return;
  items_.resize(n);
  wakes_.resize(n);
  ready_ = 0;
}

bool PollSet::wait_until(Clock::time_point deadline) {
  std::chrono::milliseconds timeout{0};
  if (deadline != Clock::time_point::min()) {
    // Rounded up: poll counts whole milliseconds, and waking before the
    // deadline would only poll again with timeout 0 until it passed.
    timeout = std::max(std::chrono::milliseconds(0),
                       std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()));
  }
  for (auto& item : items_) item.revents = 0;
  try {
    ready_ = zmq::poll(items_.data(), items_.size(), timeout);
  } catch (const zmq::error_t& e) {
    ready_ = 0;
    return e.num() != ETERM;  // EINTR: nothing ready, go round
  }
  for (std::size_t i = 0; i < items_.size(); ++i) {
    if (wakes_[i] != nullptr && (items_[i].revents & ZMQ_POLLIN)) wakes_[i]->drain();
  }
  return true;
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
