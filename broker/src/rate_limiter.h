#pragma once
// Cluster-wide rate limits at the broker (PROTOCOL.md §3.8).
//
// RateLimiter holds one state per key (a destination host, or a named rule
// on a host, or a learned per-endpoint key): its windows, its requests in
// flight and the answer times of its last requests, a pacing schedule and a
// pause. It never reads a clock: every call takes `now`, so tests drive it in
// simulated time.
//
// A request counts in a window from its grant until W after its answer came
// back (PROTOCOL.md §3.8.3). Why that is enough whatever the delays: take any
// span of W on the server's clock and, of the requests it counted there, j
// the one granted last. Every other one, i, was granted before j and counted
// by the server at s_i, at least s_j - W >= g_j - W, and answered after that;
// so at j's grant i was in flight or answered less than W ago, and was
// counted. Fewer than `count` were, so the span holds at most `count`.
//
// SessionRate is one session's view: its rules, the keys of each statement,
// and the selection of the queued statements every key allows now, skipping
// the blocked ones (no head-of-line blocking across keys).
//
// Owned by the broker's loop thread; not synchronised.

#include <array>
#include <chrono>
#include <cstdint>
#include <deque>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "gatherer/config.h"
#include "gatherer/protocol.h"
#include "gatherer/rate_limit.h"

namespace gatherer::broker {

using RateTime = std::chrono::steady_clock::time_point;
inline constexpr RateTime kNever = RateTime::max();

// What a key says about itself (BrokerStats, logs, tests).
struct RateKeyStats {
  std::string key;
  RateWindows windows;
  std::uint64_t used = 0;       // requests granted
  std::uint64_t throttled = 0;  // 429s seen
  RateTime paused_until{};
};

class RateLimiter {
 public:
  struct Key;
  // The key named `name`, created without windows when new. The pointer
  // stays valid while the key is referenced (acquire/release).
  Key* key(std::string_view name);
  void acquire(Key* k);
  void release(Key* k);

  // Adds windows to the key; for a window length it already has, the lower
  // count wins. True when something changed.
  bool declare(Key* k, const RateWindows& windows);
  // Earliest time the key allows one more request (<= now: allowed now).
  // An answer arriving later never makes it earlier, so a wake-up set for
  // it needs no revisiting when answers come in.
  RateTime ready_at(const Key* k, RateTime now) const;
  // Counts a request granted at `now`: in flight until answered().
  void record(Key* k, RateTime now);
  // The request's answer came back (or it was given up) at `now`: it leaves
  // the windows W after this.
  void answered(Key* k, RateTime now);
  // No request until `until` (a later pause extends an earlier one).
  void pause(Key* k, RateTime until);
  // A 429 naming no wait: pauses for an exponential backoff (1 s, doubling
  // per 429 within the last backoff, at most 60 s). Returns the pause end.
  RateTime backoff(Key* k, RateTime now);
  void count_throttled(Key* k);

  RateKeyStats stats(const Key* k) const;
  std::vector<RateKeyStats> all_stats() const;
  // The `n` keys with the most grants, most first (ties by name): what
  // operators see (PROTOCOL.md §3.9.7). Copies only those `n`.
  std::vector<RateKeyStats> busiest(std::size_t n) const;
  std::size_t size() const { return keys_.size(); }
  // Forgets unreferenced keys idle for longer than their longest window.
  void collect(RateTime now);

  // Added to each window, so that a request delayed on its way by up to
  // this much still falls outside the server's window: W/100 + 5 ms.
  static std::chrono::nanoseconds Margin(std::uint32_t window_ms);

 private:
  std::unordered_map<std::string, Key> keys_;
};

struct RateLimiter::Key {
  std::string name;
  RateWindows windows;  // sorted by window length
  // Answer times of the last `capacity` answered requests (the largest count
  // of a window), a ring; nondecreasing, as they are logged at `now`.
  std::vector<RateTime> log;
  std::size_t head = 0;  // index of the oldest when full
  std::size_t filled = 0;
  std::uint32_t in_flight = 0;  // granted and not answered yet
  RateTime last_grant{};
  // Pacing (GCRA): the theoretical time of the next grant, and the spacing:
  // the shortest window's length (plus margin) over its count.
  RateTime tat{};
  std::chrono::nanoseconds gap{0};
  RateTime paused_until{};
  RateTime last_used{};
  std::chrono::nanoseconds backoff{0};
  std::uint64_t used = 0;
  std::uint64_t throttled = 0;
  std::uint32_t refs = 0;
  // The i-th most recent answer (0 = latest); requires i < filled.
  RateTime recent(std::size_t i) const;
};

// One session's rate state. Exists only for a session that declares rules,
// or learns limits, or that the broker's default rules apply to: an
// unlimited session has none and routes as before.
class SessionRate {
 public:
  SessionRate(const SessionSettings& settings, const std::vector<RateRule>& broker_defaults);
  ~SessionRate();
  SessionRate(const SessionRate&) = delete;
  SessionRate& operator=(const SessionRate&) = delete;

  // Moves into `out`, from anywhere in `pending`, up to `n` statements whose
  // keys all allow a request at `now`, in queue order, and counts them.
  // Returns when the first statement left behind may be allowed (kNever
  // when none is left, or none waits on a limit).
  RateTime take(std::deque<protocol::HeldStatement>& pending, std::size_t n, RateTime now,
                std::vector<protocol::HeldStatement>& out);
  // Applies what a response said (§3.8): advertised limits are declared on
  // the statement's keys, a 429 pauses the key it names. Returns whether
  // the result should run again rather than be forwarded: a 429 while the
  // statement has attempts left, or a retryable failure the worker handed
  // back (counted in ws.attempts, and not taken again before its wait ends).
  bool learn(protocol::HeldStatement& ws, const RateReport& report, RateTime now);
  // The statement's request was answered, or given up (the broker answered
  // it, or its session ended) at `now`: its keys count it W from now on.
  // Idempotent; a statement back in the queue without an answer (its lease
  // was lost) is counted answered when take() next looks at it, at the latest.
  void answered(std::uint64_t index, RateTime now);
  void answered_all(RateTime now);
  // Forgets a statement's 429 count, wait and retry time (its result was
  // forwarded).
  void settled(std::uint64_t index) {
    if (!throttles_.empty()) throttles_.erase(index);
    if (!waits_.empty()) waits_.erase(index);
    if (!not_before_.empty()) not_before_.erase(index);
  }

  RateLimiter& limiter() { return *limiter_; }
  // Keys this session used, for stats.
  std::vector<RateKeyStats> stats() const;

  // The limiter all sessions share (one per broker). Set once before use.
  static void Bind(SessionRate& s, RateLimiter& limiter) { s.limiter_ = &limiter; }

 private:
  // A statement's keys: its host's, then each named rule it matches (or,
  // when it matches none and the session learns, its learned endpoint key).
  struct Keys {
    std::array<RateLimiter::Key*, 4> keys{};
    std::size_t size = 0;
    RateLimiter::Key* host() const { return keys[0]; }
    RateLimiter::Key* method() const { return size > 1 ? keys[1] : nullptr; }
  };
  // The keys of `s`; false when its URL names no host (never limited).
  bool keys_of(const protocol::HeldStatement& s, Keys& out);
  RateLimiter::Key* cached(const std::string& name, const RateWindows* declare);

  RateLimiter* limiter_ = nullptr;
  std::string base_url_;
  std::uint32_t max_attempts_ = 1;
  bool learn_ = false;
  RateWindows host_windows_;
  std::vector<RateRule> named_;
  std::unordered_map<std::string, RateLimiter::Key*> cache_;
  // Statements granted and not answered yet, with the keys they count on.
  std::unordered_map<std::uint64_t, Keys> granted_;
  RateTime last_now_{};  // for the destructor, which answers what is left
  std::unordered_map<std::uint64_t, std::uint32_t> throttles_;  // 429s per index
  // Statements handed back to run again, and when they may (§3.8.7).
  std::unordered_map<std::uint64_t, RateTime> not_before_;
  // Statements that waited on a key: since when, and how long in all (a
  // statement granted at once has no entry).
  struct Wait {
    RateTime since{};
    std::chrono::nanoseconds total{0};
    bool waiting = false;
  };
  std::unordered_map<std::uint64_t, Wait> waits_;
  std::string scratch_, name_, host_;  // reused: no allocation per statement once warm
};

}  // namespace gatherer::broker
