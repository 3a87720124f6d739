#include "window.h"

#include <algorithm>

namespace gatherer::client {

Window::Window(Order order, std::size_t span, std::size_t limit)
    : order_(order), span_(std::max<std::size_t>(span, 1)), limit_(std::max<std::size_t>(limit, 1)) {
  slots_.assign(span_, kFree);
  if (order_ == Order::kInput) reorder_.resize(span_);
}

std::size_t Window::room() const {
  const std::size_t room_window = limit_ - static_cast<std::size_t>(sent_ - answered_);
  const std::size_t room_span = span_ - static_cast<std::size_t>(sent_ - low_);
  return std::min(room_window, room_span);
}

void Window::send(std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) slots_[(sent_ + i) % span_] = kSent;
  sent_ += count;
}

void Window::answer(std::uint64_t pos, Response&& response) {
  ++answered_;
  held_bytes_ += response.body.size();
  answered_bytes_ += response.body.size();
  const std::size_t at = pos % span_;
  slots_[at] = kDone;
  if (order_ == Order::kInput) {
    reorder_[at] = std::move(response);
    return;
  }
  ready_.push_back(Indexed{pos, std::move(response)});
  while (low_ < sent_ && slots_[low_ % span_] == kDone) slots_[low_++ % span_] = kFree;
}

void Window::drop(std::uint64_t pos) {
  ++answered_;
  slots_[pos % span_] = kDropped;
}

std::optional<Indexed> Window::next() {
  if (order_ == Order::kCompletion) {
    if (ready_.empty()) return std::nullopt;
    Indexed out = std::move(ready_.front());
    ready_.pop_front();
    held_bytes_ -= out.response.body.size();
    return out;
  }
  if (low_ == sent_ || slots_[low_ % span_] != kDone) return std::nullopt;
  const std::size_t at = low_ % span_;
  slots_[at] = kFree;
  held_bytes_ -= reorder_[at].body.size();
  return Indexed{low_++, std::move(reorder_[at])};
}

std::optional<std::uint64_t> Window::highest_unanswered_below(std::uint64_t end) const {
  for (std::uint64_t p = std::min(end, sent_); p-- > low_;) {
    if (slots_[p % span_] == kSent) return p;
  }
  return std::nullopt;
}

}  // namespace gatherer::client
