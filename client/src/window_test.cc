#include "window.h"

#include <gtest/gtest.h>

#include <random>

namespace gatherer::client {
namespace {

Response Ok(int status) {
  Response r;
  r.status = status;
  return r;
}

std::vector<std::uint64_t> Drain(Window& w) {
  std::vector<std::uint64_t> out;
  while (auto item = w.next()) out.push_back(item->index);
  return out;
}

TEST(WindowTest, AtMostTheLimitIsUnansweredAndEachAnswerMakesRoom) {
  Window w(Order::kCompletion, 100, 4);
  EXPECT_EQ(w.room(), 4u);
  w.send(4);
  EXPECT_EQ(w.room(), 0u);
  w.answer(2, Ok(200));
  EXPECT_EQ(w.room(), 1u) << "one answer, one more may go: a sliding window, not a lockstep batch";
  w.send(1);
  EXPECT_EQ(w.sent(), 5u);
  EXPECT_EQ(w.unanswered_count(), 4u);
}

TEST(WindowTest, OneSlowPositionHoldsBackOnlyTheSpan) {
  // Position 0 never answers; every other answers at once.
  Window w(Order::kInput, 16, 4);
  std::uint64_t answered = 0;
  while (w.room() > 0) {
    const std::uint64_t first = w.sent();
    const std::size_t n = w.room();
    w.send(n);
    for (std::uint64_t p = first; p < first + n; ++p) {
      if (p != 0) {
        w.answer(p, Ok(200));
        ++answered;
      }
    }
  }
  EXPECT_EQ(w.sent(), 16u) << "the window moved past the slow position up to the span";
  EXPECT_EQ(answered, 15u);
  EXPECT_FALSE(w.next()) << "input order: nothing before position 0";
  w.answer(0, Ok(200));
  const auto order = Drain(w);
  ASSERT_EQ(order.size(), 16u);
  for (std::uint64_t i = 0; i < order.size(); ++i) EXPECT_EQ(order[i], i);
  EXPECT_EQ(w.room(), 4u);
}

TEST(WindowTest, InputOrderWhateverTheAnswerOrder) {
  Window w(Order::kInput, 64, 32);
  std::mt19937 rng(7);
  std::vector<std::uint64_t> got;
  std::vector<std::uint64_t> pending;
  while (got.size() < 1000) {
    const std::size_t n = std::min<std::size_t>(w.room(), 1000 - w.sent());
    for (std::size_t i = 0; i < n; ++i) pending.push_back(w.sent() + i);
    w.send(n);
    std::shuffle(pending.begin(), pending.end(), rng);
    // Answer a random part of what is out, then take what is ready.
    const std::size_t k = pending.empty() ? 0 : 1 + rng() % pending.size();
    for (std::size_t i = 0; i < k; ++i) {
      w.answer(pending.back(), Ok(200));
      pending.pop_back();
    }
    for (auto i : Drain(w)) got.push_back(i);
  }
  for (std::uint64_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], i);
}

TEST(WindowTest, CompletionOrderHandsOutAsAnswered) {
  Window w(Order::kCompletion, 8, 8);
  w.send(3);
  w.answer(2, Ok(201));
  w.answer(0, Ok(200));
  auto first = w.next();
  ASSERT_TRUE(first);
  EXPECT_EQ(first->index, 2u);
  EXPECT_EQ(first->response.status, 201);
  EXPECT_EQ(Drain(w), std::vector<std::uint64_t>{0});
}

TEST(WindowTest, DuplicatesStaleAndUnsentAnswersAreRecognised) {
  Window w(Order::kCompletion, 4, 4);
  w.send(2);
  EXPECT_TRUE(w.unanswered(1));
  EXPECT_FALSE(w.unanswered(2)) << "never sent";
  w.answer(1, Ok(200));
  EXPECT_FALSE(w.unanswered(1)) << "a second answer is a duplicate";
  w.answer(0, Ok(200));
  Drain(w);
  w.send(4);  // positions 2..5 reuse the slots of 0..3
  EXPECT_FALSE(w.unanswered(0)) << "a position answered long ago, its slot since reused";
  EXPECT_TRUE(w.unanswered(4));
}

TEST(WindowTest, ADroppedFailureStopsInputOrderAtIt) {
  Window w(Order::kInput, 8, 8);
  w.send(3);
  w.answer(0, Ok(200));
  w.drop(1);
  w.answer(2, Ok(200));
  EXPECT_EQ(Drain(w), std::vector<std::uint64_t>{0});
  EXPECT_FALSE(w.unanswered(1));
  EXPECT_EQ(w.unanswered_count(), 0u);
}

TEST(WindowTest, UnansweredPositionsForSyncAndResubmit) {
  Window w(Order::kCompletion, 16, 16);
  w.send(6);
  w.answer(1, Ok(200));
  w.answer(4, Ok(200));
  std::vector<std::uint64_t> left;
  w.for_each_unanswered([&](std::uint64_t p) { left.push_back(p); });
  EXPECT_EQ(left, (std::vector<std::uint64_t>{0, 2, 3, 5}));
  EXPECT_EQ(w.highest_unanswered_below(5), 3u);
  EXPECT_EQ(w.highest_unanswered_below(100), 5u);
  w.answer(0, Ok(200));
  EXPECT_FALSE(w.highest_unanswered_below(1));
}

TEST(WindowTest, HeldBytesCountWhatIsAnsweredAndNotHandedOut) {
  for (Order order : {Order::kInput, Order::kCompletion}) {
    Window w(order, 8, 8);
    w.send(3);
    Response big;
    big.body.assign(1000, 'x');
    w.answer(2, Response(big));
    w.answer(1, Response(big));
    EXPECT_EQ(w.held_bytes(), 2000u);
    if (order == Order::kInput) {
      EXPECT_FALSE(w.next()) << "position 0 first";
    }
    w.answer(0, Ok(200));
    Drain(w);
    EXPECT_EQ(w.held_bytes(), 0u);
  }
}

TEST(WindowTest, ExpectedBytesOfTheUnansweredFollowTheMeanBodySoFar) {
  Window w(Order::kInput, 16, 8);
  w.send(8);
  EXPECT_EQ(w.expected_unanswered_bytes(), 0u) << "nothing is known before the first answer";
  Response big = Ok(200);
  big.body.assign(3000, 'x');
  w.answer(0, Response(big));
  w.answer(1, Ok(200));  // an empty body lowers the mean
  EXPECT_EQ(w.expected_unanswered_bytes(), 6u * 1500u);
  Drain(w);
  EXPECT_EQ(w.expected_unanswered_bytes(), 6u * 1500u) << "handing out does not change what is in flight";
  for (std::uint64_t p = 2; p < 8; ++p) w.answer(p, Ok(200));
  EXPECT_EQ(w.expected_unanswered_bytes(), 0u) << "nothing unanswered";
}

TEST(WindowTest, MemoryIsTheSpanNotTheStatementCount) {
  // A million positions through a span of 8: the ring is reused throughout.
  Window w(Order::kInput, 8, 4);
  std::uint64_t next = 0;
  while (w.sent() < 1'000'000) {
    const std::uint64_t first = w.sent();
    const std::size_t n = w.room();
    ASSERT_GT(n, 0u);
    w.send(n);
    for (std::uint64_t p = first + n; p-- > first;) w.answer(p, Ok(200));
    while (auto item = w.next()) ASSERT_EQ(item->index, next++);
  }
  EXPECT_EQ(next, 1'000'000u);
  EXPECT_EQ(w.span(), 8u);
}

}  // namespace
}  // namespace gatherer::client
