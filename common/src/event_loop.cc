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

}  // namespace gatherer
