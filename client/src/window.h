#pragma once
// The client's sliding window and reorder ring for one run (a gather() or a
// stream), as a plain unit: no socket, no clock, no statements. The run
// (`Stream::Run`, stream.cc) decides what to send and when; the window
// keeps, for every position the run has sent and not yet handed out, whether
// it is answered, and hands responses out in input or completion order
// (docs/architecture.md §3).
//
// Positions count from 0 at the run's first statement. A position is tracked
// in slot pos % span from when it is sent until it is handed out (input
// order) or answered and every earlier one too (completion order), so memory
// is bounded by the span, never by the number of statements. At most `limit`
// positions are sent and unanswered at once: the window proper. One slow
// position holds back nothing but the span.
//
// Thread-safety: none; owned by the thread reading the run.

#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "gatherer/gatherer.h"

namespace gatherer::client {

class Window {
 public:
  // span >= 1 positions tracked at once; limit >= 1 unanswered at once.
  Window(Order order, std::size_t span, std::size_t limit);

  // How many more positions may be sent now.
  std::size_t room() const;
  // Positions [sent(), sent() + count) went out; count <= room().
  void send(std::size_t count);

  // True for a position sent and not answered yet: an answer for any other
  // (never sent, answered already, an earlier run's) is a duplicate or stale.
  bool unanswered(std::uint64_t pos) const {
    return pos >= low_ && pos < sent_ && slots_[pos % span_] == kSent;
  }
  // The first answer of an unanswered position: kept for next().
  void answer(std::uint64_t pos, Response&& response);
  // Answered, but nothing is kept or handed out for it: the run is stopping
  // on this failure (cancel_on_raise), and what was ready before it goes
  // first. In input order nothing at or after it is handed out.
  void drop(std::uint64_t pos);

  // The next response to hand out, if one is ready: in input order the next
  // position once it is answered; in completion order the oldest answer.
  std::optional<Indexed> next();

  // Calls f(pos) for every unanswered position, lowest first.
  template <typename F>
  void for_each_unanswered(F&& f) const {
    for (std::uint64_t p = low_; p < sent_; ++p) {
      if (slots_[p % span_] == kSent) f(p);
    }
  }
  // The highest unanswered position below `end`, if any.
  std::optional<std::uint64_t> highest_unanswered_below(std::uint64_t end) const;

  // Body bytes of the responses answered and not yet handed out.
  std::uint64_t held_bytes() const { return held_bytes_; }
  // Body bytes the unanswered positions are expected to bring: their count
  // times the mean body answered so far (0 before the first answer).
  std::uint64_t expected_unanswered_bytes() const { return unanswered_count() * mean_body_bytes(); }
  // The mean body answered so far (0 before the first answer).
  std::uint64_t mean_body_bytes() const { return answered_ == 0 ? 0 : answered_bytes_ / answered_; }
  std::uint64_t sent() const { return sent_; }
  std::uint64_t answered() const { return answered_; }
  std::uint64_t unanswered_count() const { return sent_ - answered_; }
  std::size_t span() const { return span_; }

 private:
  enum Slot : std::uint8_t { kFree = 0, kSent = 1, kDone = 2, kDropped = 3 };

  Order order_;
  std::size_t span_;
  std::size_t limit_;
  std::vector<std::uint8_t> slots_;
  std::vector<Response> reorder_;  // input order only, span_ long
  std::deque<Indexed> ready_;      // completion order only
  std::uint64_t sent_ = 0;
  std::uint64_t answered_ = 0;
  std::uint64_t low_ = 0;  // lowest position still tracked
  std::uint64_t held_bytes_ = 0;
  std::uint64_t answered_bytes_ = 0;  // every body answered, handed out or not
};

}  // namespace gatherer::client
