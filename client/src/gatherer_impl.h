#pragma once
// Gatherer::Impl: what one Gatherer owns (its options, its session, the
// DEALER to the broker, the embedded cluster in embedded mode, progress
// figures). Shared by gatherer.cc (the Gatherer: checking options, opening
// and closing the session, progress, cancel) and stream.cc (Stream::Run, one
// gather() or stream over the session).
//
// Thread-safety: owned by the thread using the Gatherer; cancel() and the
// progress figures are the only parts touched from other threads.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <zmq.hpp>

#include "embedded.h"
#include "gatherer/gatherer.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/wake_fd.h"

namespace gatherer {
namespace proto = protocol;

namespace client {
using Clock = std::chrono::steady_clock;
// Heartbeat period until OPENED says the broker's (§3.3.1).
inline constexpr std::chrono::milliseconds kHeartbeat{1000};
}  // namespace client

struct Gatherer::Impl {
  using Clock = client::Clock;

  Options options;
  SessionSettings settings;
  SessionId session;
  std::string session_text;
  std::string endpoint;
  // This Gatherer's logger, at its log_level (shared with its embedded
  // broker and worker); the process-wide level is left alone.
  std::shared_ptr<spdlog::logger> logger;
  spdlog::logger& log() const { return *logger; }
  std::unique_ptr<zmq::context_t> context;
  // Embedded mode only: the in-process cluster (docs/architecture.md §2).
  std::unique_ptr<EmbeddedCluster> cluster;
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<proto::ReconnectWatch> watch;  // of `dealer`; destroyed before it
  WakeFd cancel_fd;
  std::atomic<bool> cancel_requested{false};
  std::uint64_t next_index = 0;
  // §3.6: the broker numbers its RESULTS for the session; every one up to
  // results_seq has arrived, and acked_seq is what the broker was told.
  std::uint64_t results_seq = 0;
  std::uint64_t acked_seq = 0;
  // Heartbeat period: the broker's (OPENED), at most a third of its session
  // TTL so that two lost heartbeats do not expire a live session, and at
  // most a third of the client's broker timeout so that a live broker, which
  // answers each heartbeat, is heard from before that timeout.
  std::chrono::milliseconds heartbeat = client::kHeartbeat;
  Clock::time_point last_heard;
  bool heard_once = false;  // any message from the broker, ever
  // Malformed messages from the broker: dropped, counted, logged at most
  // once a second (PROTOCOL.md §2.4).
  std::uint64_t malformed = 0;
  RateLimitedLog bad_log;
  void bad(std::string_view what, const Status& status) {
    ++malformed;
    std::uint64_t suppressed = 0;
    if (bad_log.allow(suppressed)) {
      log().warn("gatherer: dropped malformed {} from the broker: {} ({} more suppressed)", what,
                    status.ToString(), suppressed);
    }
  }
  std::uint32_t prefetch = 0;  // statements queued at the broker beyond the window
  bool running = false;  // a gather() or stream is in progress
  // What progress() reports: written by the run's thread, read from any.
  struct ProgressCounters {
    std::atomic<std::uint64_t> total{0}, done{0}, failed{0};
    std::atomic<std::int64_t> started_ns{0}, ended_ns{0};
    std::atomic<bool> running{false};
  } progress;
  static std::int64_t NowNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  // The run ended (finished, failed or abandoned).
  void end_progress() {
    if (progress.running.exchange(false, std::memory_order_relaxed)) {
      progress.ended_ns.store(NowNs(), std::memory_order_relaxed);
    }
  }

  void send(proto::Frames&& frames) {
    if (proto::SendMessage(*dealer, {}, frames, /*block=*/true) != proto::SendResult::kSent) {
      throw Error("cannot send to broker " + endpoint, -1, StatusCode::kUnavailable);
    }
  }
  void cancel_on_broker() { send(proto::Encode(proto::Command::kCancel, proto::SessionRef{session})); }
  // Receives one message if there is one; empty when none is waiting.
  bool recv(std::vector<zmq::message_t>& frames) {
    if (!proto::ReceiveMessage(*dealer, frames)) return false;
    last_heard = Clock::now();
    heard_once = true;
    return true;
  }
  void close_session();
  // §3.3.1: heartbeat at the broker's period, and at least three times per
  // session TTL and per broker timeout (§3.2.9).
  void adopt(const proto::Opened& opened) {
    auto period = std::chrono::milliseconds(opened.heartbeat_ms);
    period = std::min(period, std::chrono::milliseconds(opened.session_ttl_ms / 3));
    period = std::min(period, options.broker_timeout / 3);
    heartbeat = std::clamp(period, std::chrono::milliseconds(50), std::chrono::milliseconds(10'000));
  }
};

}  // namespace gatherer
