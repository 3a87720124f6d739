#include "gatherer/event_loop.h"

#include <gtest/gtest.h>

#include <mutex>
#include <string>
#include <thread>
#include <vector>

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

// A socket's descriptor fires once for commands; what an operation on the
// socket takes in (here a send on it, which processes its mailbox) is
// readable without the descriptor firing again. A poll that only watched the
// descriptor would sleep past the message.
TEST(PollSetTest, AMessageTakenInByASendIsSeenWithoutTheDescriptorFiring) {
  Pair p;
  PollSet poll;
  const auto i = poll.add(p.in);
  // Nothing there yet: the wait runs out.
  ASSERT_TRUE(poll.wait_until(Clock::now() + 10ms));
  EXPECT_FALSE(poll.ready(i));
  for (int round = 0; round < 50; ++round) {
    p.out.send(zmq::str_buffer("m"));
    // A send on the receiving socket processes its commands, the message's
    // arrival among them, and resets the descriptor.
    p.in.send(zmq::str_buffer("back"));
    const auto start = Clock::now();
    ASSERT_TRUE(poll.wait_until(start + 5s));
    ASSERT_TRUE(poll.ready(i)) << "round " << round;
    EXPECT_LT(Clock::now() - start, 1s) << "waited past a message already readable, round " << round;
    zmq::message_t m;
    ASSERT_TRUE(p.in.recv(m, zmq::recv_flags::dontwait));
    ASSERT_TRUE(p.out.recv(m, zmq::recv_flags::dontwait));
  }
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

// A loop part over a real inproc PAIR: takes what arrives on `in`, notes
// the thread that took it, and passes it on to `next` (another part's feed)
// if it has one.
struct RelayPart final : LoopPart {
  RelayPart(zmq::context_t& context, const std::string& name)
      : in(context, zmq::socket_type::pair), feed(context, zmq::socket_type::pair) {
    in.bind("inproc://" + name);
    feed.connect("inproc://" + name);
  }
  std::size_t add_to(PollSet& poll) override { return poll.add(in); }
  std::uint64_t generation() const override { return 0; }
  Clock::time_point next_due() const override { return Clock::now() + 1h; }
  Step step(const PollSet*, std::size_t) override {
    protocol::Frames frames;
    std::size_t n = 0;
    if (!ReceiveBatch(in, frames, 100, [&](protocol::Frames& f) {
          ++n;
          std::lock_guard lock(mu);
          takers.push_back(std::this_thread::get_id());
          if (next != nullptr) next->send(zmq::buffer(f[0].to_string()));
        })) {
      return Step::kDone;
    }
    return n > 0 ? Step::kBusy : Step::kIdle;
  }
  std::vector<std::thread::id> taken() {
    std::lock_guard lock(mu);
    return takers;
  }
  bool wait_taken(std::size_t count) {
    const auto deadline = Clock::now() + 5s;
    while (Clock::now() < deadline) {
      if (taken().size() >= count) return true;
      std::this_thread::yield();
    }
    return false;
  }

  zmq::socket_t in, feed;
  zmq::socket_t* next = nullptr;  // touched by whoever drives this part
  std::mutex mu;
  std::vector<std::thread::id> takers;
};

TEST(LoopDriverTest, WithoutALeaderItsOwnThreadRunsTheParts) {
  zmq::context_t context(1);
  RelayPart a(context, "driver-own-a");
  LoopDriver driver({&a});
  driver.start();
  a.feed.send(zmq::str_buffer("x"));
  ASSERT_TRUE(a.wait_taken(1));
  EXPECT_NE(a.taken()[0], std::this_thread::get_id());
  driver.stop();
}

TEST(LoopDriverTest, ALeaderRunsEveryPartInItsTurnAndTheOthersTakeWhatOneSentThemInTheSameTurn) {
  zmq::context_t context(1);
  RelayPart a(context, "driver-lead-a"), b(context, "driver-lead-b");
  a.next = &b.feed;
  // A grace no test outlasts: the driver's thread never stands in, so any
  // message it took would show it polling behind the leader's back.
  LoopDriver driver({&a, &b}, std::chrono::milliseconds(3'600'000));
  driver.start();
  WakeFd own;
  PollSet poll;
  const std::size_t mine = poll.add(own);
  driver.lead(poll);
  EXPECT_GT(poll.size(), mine + 1) << "the parts' items follow the leader's own";
  for (std::size_t k = 1; k <= 20; ++k) {
    a.feed.send(zmq::str_buffer("x"));
    // One turn: a takes the message and sends it to b, and b takes it
    // before the turn ends, not a poll later.
    ASSERT_TRUE(driver.turn(Clock::now() + 5s));
    ASSERT_EQ(a.taken().size(), k);
    ASSERT_EQ(b.taken().size(), k);
  }
  for (auto id : a.taken()) EXPECT_EQ(id, std::this_thread::get_id());
  for (auto id : b.taken()) EXPECT_EQ(id, std::this_thread::get_id());
  // The leader's own items still work in its turns.
  own.signal();
  ASSERT_TRUE(driver.turn(Clock::now() + 5s));
  EXPECT_TRUE(poll.ready(mine));
  driver.unlead();
  EXPECT_EQ(poll.size(), mine + 1) << "the parts' items leave with the lead";
  // Let go: the driver's own thread runs the parts again.
  a.feed.send(zmq::str_buffer("y"));
  ASSERT_TRUE(b.wait_taken(21));
  EXPECT_NE(b.taken().back(), std::this_thread::get_id());
  driver.stop();
}

TEST(LoopDriverTest, TheDriversThreadStandsInWhileTheLeaderIsBusyElsewhere) {
  zmq::context_t context(1);
  RelayPart a(context, "driver-stand-in-a");
  LoopDriver driver({&a}, std::chrono::milliseconds(20));
  driver.start();
  // The driver's thread is in its poll (it took a message) when the lead is
  // taken: lead() wakes it, and it must stand by, not sleep until unlead().
  a.feed.send(zmq::str_buffer("w"));
  ASSERT_TRUE(a.wait_taken(1));
  PollSet poll;
  driver.lead(poll);
  // The leader takes no turn (its caller is busy with a response): what
  // arrives is still taken, by the driver's thread, within a few graces.
  for (std::size_t k = 2; k <= 4; ++k) {
    a.feed.send(zmq::str_buffer("x"));
    ASSERT_TRUE(a.wait_taken(k)) << "message " << k << " never taken while the leader was away";
    EXPECT_NE(a.taken().back(), std::this_thread::get_id());
  }
  // And the leader takes over again at its next turn.
  a.feed.send(zmq::str_buffer("y"));
  const auto deadline = Clock::now() + 5s;
  while (a.taken().size() < 5 && Clock::now() < deadline) ASSERT_TRUE(driver.turn(deadline));
  ASSERT_EQ(a.taken().size(), 5u);
  driver.unlead();
  driver.stop();
}

}  // namespace
}  // namespace gatherer
