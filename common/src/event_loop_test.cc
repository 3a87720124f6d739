#include "gatherer/event_loop.h"

#include <gtest/gtest.h>

#include "gatherer/wake_fd.h"

namespace gatherer {
namespace {

using Clock = PollSet::Clock;
using namespace std::chrono_literals;

struct Pair {
  zmq::context_t context{1};
  zmq::socket_t in{context, zmq::socket_type::pair};
  zmq::socket_t out{context, zmq::socket_type::pair};
  Pair() {
    in.bind("inproc://event-loop-test");
    out.connect("inproc://event-loop-test");
  }
};

TEST(PollSetTest, ADeadlineUnderAMillisecondAwayIsWaitedForNotSpunOn) {
  WakeFd idle;
  PollSet poll;
  poll.add(idle);
  // Each deadline is a fraction of a millisecond past a whole one: polling
  // with whole milliseconds rounded down would come back early, again and
  // again, until it passed.
  int most = 0;
  for (int round = 0; round < 20; ++round) {
    const auto deadline = Clock::now() + 1500us;
    int calls = 0;
    while (Clock::now() < deadline) {
      ASSERT_TRUE(poll.wait_until(deadline));
      ++calls;
    }
    most = std::max(most, calls);
  }
  EXPECT_LE(most, 2) << "poll steps before a deadline 1.5 ms away";
}

TEST(PollSetTest, AWakeSignalIsSeenOnceThenDrained) {
  WakeFd wake;
  PollSet poll;
  const auto i = poll.add(wake);
  wake.signal();
  wake.signal();  // signals coalesce
  ASSERT_TRUE(poll.wait_until(Clock::now() + 1s));
  EXPECT_TRUE(poll.ready(i));
  // Drained by the step: the next one waits out its deadline.
  const auto start = Clock::now();
  ASSERT_TRUE(poll.wait_until(start + 30ms));
  EXPECT_FALSE(poll.any_ready());
  EXPECT_GE(Clock::now() - start, 29ms);
}

TEST(PollSetTest, PollNowLooksWithoutWaiting) {
  Pair p;
  PollSet poll;
  const auto i = poll.add(p.in);
  ASSERT_TRUE(poll.poll_now());
  EXPECT_FALSE(poll.any_ready());
  p.out.send(zmq::str_buffer("x"));
  const auto deadline = Clock::now() + 5s;
  while (Clock::now() < deadline && !(poll.poll_now() && poll.ready(i))) {
  }
  EXPECT_TRUE(poll.ready(i));
}

TEST(PollSetTest, ReceiveBatchTakesAtMostItsBoundPerPass) {
  Pair p;
  for (int k = 0; k < 10; ++k) p.out.send(zmq::str_buffer("m"));
  PollSet poll;
  const auto i = poll.add(p.in);
  ASSERT_TRUE(poll.wait_until(Clock::now() + 5s));
  ASSERT_TRUE(poll.ready(i));
  protocol::Frames frames;
  int handled = 0;
  ASSERT_TRUE(ReceiveBatch(p.in, frames, 4, [&](protocol::Frames& f) { handled += static_cast<int>(f.size()); }));
  EXPECT_EQ(handled, 4);
  ASSERT_TRUE(ReceiveBatch(p.in, frames, 100, [&](protocol::Frames& f) { handled += static_cast<int>(f.size()); }));
  EXPECT_EQ(handled, 10);
}

TEST(PollSetTest, ATerminatedContextEndsTheLoop) {
  auto context = std::make_unique<zmq::context_t>(1);
  zmq::socket_t socket(*context, zmq::socket_type::pair);
  socket.set(zmq::sockopt::linger, 0);
  PollSet poll;
  poll.add(socket);
  context->shutdown();
  EXPECT_FALSE(poll.wait_until(Clock::now() + 5s));
  protocol::Frames frames;
  EXPECT_FALSE(ReceiveBatch(socket, frames, 10, [](protocol::Frames&) {}));
}

}  // namespace
}  // namespace gatherer
