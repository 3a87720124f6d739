#pragma once
// WaitFor: poll a condition until it holds or a deadline passes. Tests use it
// instead of sleeping to synchronise. Clock: the clock they time things on.

#include <chrono>
#include <thread>

namespace gatherer::testing {

// What tests measure deadlines and elapsed times on.
using Clock = std::chrono::steady_clock;

// True as soon as pred() is true; false if it is still false after `timeout`.
template <typename Pred>
bool WaitFor(Pred&& pred, std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

}  // namespace gatherer::testing
