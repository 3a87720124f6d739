#include "gatherer/worker.h"

#include <unistd.h>

#include <iterator>
#include <thread>
#include <unordered_map>

#include <tbb/concurrent_queue.h>

#include "fetcher.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/wake_fd.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using Clock = std::chrono::steady_clock;

struct ResultBatch {
  SessionId session;
  std::vector<worker::FetchResult> results;
};
}  // namespace

struct Worker::Impl {
  WorkerOptions options;
  std::string id;
  std::string host;
  std::uint32_t slots = 0;
  std::unique_ptr<zmq::context_t> own_context;
  zmq::context_t* context = nullptr;
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<worker::Fetcher> fetcher;
  // I/O threads -> socket thread. The flag collapses many wake-ups into one
  // eventfd write per drain.
  // std::allocator so ThreadSanitizer sees page reuse (see fetcher.cc).
  tbb::concurrent_queue<ResultBatch, std::allocator<ResultBatch>> done;
  std::atomic<bool> wake_pending{false};
  std::unique_ptr<WakeFd> wake_fd;
  std::atomic<bool> stopping{false};
  std::atomic<bool> drain_requested{false};
  std::atomic<bool> drained{false};
  std::chrono::milliseconds drain_timeout{0};  // written before drain_requested
  std::thread thread;
  WorkerStats stats;
  RateLimitedLog bad_frame_log;
  Clock::time_point last_heard;
  // Sessions opened by SESSION, with the statements in hand for each (taken
  // and not yet answered); owned by the socket thread.
  std::unordered_map<SessionId, std::uint64_t> sessions;
  std::uint64_t in_hand = 0;
  Clock::time_point next_heartbeat;
  bool draining = false;
  Clock::time_point drain_deadline;

  explicit Impl(WorkerOptions o) : options(std::move(o)) {}

  void wake() {
    if (!wake_pending.exchange(true, std::memory_order_acq_rel)) wake_fd->signal();
  }
  void send(proto::Frames&& frames) {
    if (proto::SendMessage(*dealer, {}, frames, /*block=*/true) != proto::SendResult::kSent) {
      Logger().warn("worker {}: send to broker failed", id);
    }
  }
  // READY, first or again (§3.4.3, §3.4.4). Registering again means the
  // broker presumed this worker dead or lost it, and its leases are being
  // re-dispatched: the sessions held so far are dropped, so no statement
  // keeps being fetched for nobody (PROTOCOL.md §3.4.5).
  void register_with_broker() {
    if (stats.registrations.fetch_add(1, std::memory_order_relaxed) > 0) {
      for (const auto& [s, n] : sessions) fetcher->close_session(s);
      sessions.clear();
      set_in_hand(0);
    }
    send(proto::Encode(proto::Ready{id, host, slots}));
    // A drain outlives a re-registration: the new broker is told too.
    if (draining) send(proto::EncodeEmpty(proto::Command::kDraining));
  }
  void set_in_hand(std::uint64_t n) {
    in_hand = n;
    stats.in_hand.store(n, std::memory_order_relaxed);
  }
  void end_session(const SessionId& session) {
    auto it = sessions.find(session);
    if (it == sessions.end()) return;
    fetcher->close_session(session);
    set_in_hand(in_hand - it->second);
    sessions.erase(it);
  }
  bool drain_step(Clock::time_point now);
  // A new DEALER connected to the broker. Also used after a silent broker:
  // ZeroMQ does not reconnect a connection it dropped after a protocol error,
  // so a fresh socket is the one sure way back (like Majordomo's workers).
  Status connect() {
    dealer = std::make_unique<zmq::socket_t>(*context, zmq::socket_type::dealer);
    protocol::ConfigureSocket(*dealer);
    try {
      dealer->connect(options.broker);
    } catch (const zmq::error_t& e) {
      dealer.reset();
      return InvalidArgument("cannot connect to " + options.broker + ": " + e.what());
    }
    return Status::Ok();
  }
  void handle(std::vector<zmq::message_t>& frames);
  void echo(const SessionId& session, const std::vector<proto::WireStatement>& statements);
  void flush_results();
  void run();
};

void Worker::Impl::handle(std::vector<zmq::message_t>& frames) {
  last_heard = Clock::now();
  auto command = proto::PeekCommand(frames);
  auto bad = [&](const Status& s) {
    stats.malformed.fetch_add(1, std::memory_order_relaxed);
    std::uint64_t suppressed = 0;
    if (bad_frame_log.allow(suppressed)) {
      Logger().warn("worker {}: dropped malformed message: {} ({} more suppressed)", id, s.ToString(), suppressed);
    }
  };
  if (!command) return bad(command.error());
  switch (*command) {
    case proto::Command::kSession: {
      auto m = proto::DecodeSession(frames);
      if (!m) return bad(m.error());
      fetcher->open_session(m->session, m->settings);
      sessions.try_emplace(m->session, 0);
      return;
    }
    case proto::Command::kDispatch: {
      auto m = proto::DecodeStatements(frames);
      if (!m) return bad(m.error());
      stats.received.fetch_add(m->statements.size(), std::memory_order_relaxed);
      auto held = sessions.find(m->session);
      if (held == sessions.end()) {
        // Sent before the broker saw this worker register again (§3.4.5):
        // the broker has taken those leases back, so nobody wants them.
        Logger().debug("worker {}: dropped DISPATCH of a session it does not hold", id);
        return;
      }
      if (options.echo) return echo(m->session, m->statements);
      held->second += m->statements.size();
      set_in_hand(in_hand + m->statements.size());
      fetcher->submit(m->session, std::move(m->statements));
      return;
    }
    case proto::Command::kEndSession: {
      auto m = proto::DecodeSessionRef(frames);
      if (!m) return bad(m.error());
      end_session(m->session);
      return;
    }
    case proto::Command::kHeartbeat: {
      // Decoded only to reject a malformed one (PROTOCOL.md §2.4).
      auto m = proto::DecodeHeartbeat(frames);
      if (!m) return bad(m.error());
      return;
    }
    case proto::Command::kError: {
      auto m = proto::DecodeError(frames);
      if (!m) return bad(m.error());
      Logger().warn("worker {}: broker says {}: {}", id, StatusCodeName(m->code), m->message);
      // The broker does not know us (it restarted): register again.
      if (m->code == StatusCode::kNotFound) register_with_broker();
      return;
    }
    default:
      return bad(InvalidArgument(std::string("command not accepted by a worker: ") + proto::CommandName(*command)));
  }
}

// WorkerOptions::echo: an empty 200 per statement, straight back.
void Worker::Impl::echo(const SessionId& session, const std::vector<proto::WireStatement>& statements) {
  proto::Results results{session, std::vector<proto::WireResult>(statements.size())};
  for (std::size_t i = 0; i < statements.size(); ++i) {
    results.results[i].index = statements[i].index;
    results.results[i].response.status = 200;
    results.results[i].response.attempts = 1;
    results.results[i].response.worker = id;
  }
  stats.completed.fetch_add(statements.size(), std::memory_order_relaxed);
  send(proto::Encode(std::move(results)));
}

void Worker::Impl::flush_results() {
  // Order matters: consume the eventfd first, then clear the flag, then
  // drain. Clearing first would let an I/O thread's wake-up land in the
  // eventfd we are about to consume while the flag stays set, and every
  // later batch would then skip its write: results stranded, session stalled.
  wake_fd->drain();
  wake_pending.exchange(false, std::memory_order_acq_rel);
  ResultBatch batch;
  while (done.try_pop(batch)) {
    auto held = sessions.find(batch.session);
    if (held == sessions.end()) continue;  // ended meanwhile: nobody wants these
    const std::uint64_t n = std::min<std::uint64_t>(batch.results.size(), held->second);
    held->second -= n;
    set_in_hand(in_hand - n);
    stats.completed.fetch_add(batch.results.size(), std::memory_order_relaxed);
    send(proto::Encode(proto::Results{batch.session, std::move(batch.results)}));
  }
}

// Graceful drain (§3.4.7): DRAINING once, then DISCONNECT when nothing is in
// hand or the deadline passed. True when the worker is done.
bool Worker::Impl::drain_step(Clock::time_point now) {
  if (!draining) {
    if (!drain_requested.load(std::memory_order_acquire)) return false;
    draining = true;
    drain_deadline = now + drain_timeout;
    Logger().info("worker {}: draining: no new work; {} statements in hand, {} ms to finish them", id, in_hand,
                  drain_timeout.count());
    send(proto::EncodeEmpty(proto::Command::kDraining));
  }
  if (in_hand > 0 && now < drain_deadline) return false;
  if (in_hand > 0) {
    Logger().warn("worker {}: drain deadline passed; {} statements in hand go back to the broker", id, in_hand);
  } else {
    Logger().info("worker {}: drained; every statement answered", id);
  }
  send(proto::EncodeEmpty(proto::Command::kDisconnect));
  // Let the last results and DISCONNECT leave before the socket closes.
  dealer->set(zmq::sockopt::linger, static_cast<int>(options.heartbeat_interval.count() * 2));
  return true;
}

void Worker::Impl::run() {
  register_with_broker();
  last_heard = Clock::now();
  next_heartbeat = last_heard + options.heartbeat_interval;
  zmq::pollitem_t items[] = {{dealer->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake_fd->fd(), ZMQ_POLLIN, 0}};
  std::vector<zmq::message_t> frames;
  while (!stopping.load(std::memory_order_acquire)) {
    auto until = next_heartbeat;
    if (draining) until = std::min(until, drain_deadline);
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
    try {
      zmq::poll(items, 2, std::max(wait, std::chrono::milliseconds(0)));
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) break;
      continue;
    }
    if (items[0].revents & ZMQ_POLLIN) {
      try {
        for (int i = 0; i < 1024 && proto::ReceiveMessage(*dealer, frames); ++i) handle(frames);
      } catch (const zmq::error_t&) {
        return;  // context terminated
      }
    }
    if (items[1].revents & ZMQ_POLLIN) flush_results();
    const auto now = Clock::now();
    if (drain_step(now)) {
      drained.store(true, std::memory_order_release);
      return;
    }
    if (now >= next_heartbeat) {
      next_heartbeat = now + options.heartbeat_interval;
      if (now - last_heard > options.heartbeat_interval * options.heartbeat_liveness) {
        // Majordomo-style: a silent broker may have restarted and forgotten us.
        Logger().info("worker {}: broker silent, reconnecting and registering again", id);
        if (Status st = connect(); !st.ok()) {
          Logger().error("worker {}: {}", id, st.ToString());
          return;
        }
        items[0].socket = dealer->handle();
        register_with_broker();
        last_heard = now;
      } else {
        send(proto::EncodeHeartbeat());
      }
    }
  }
}

Worker::Worker(WorkerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->id = impl_->options.worker_id.empty() ? NewWorkerId() : impl_->options.worker_id;
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) == 0) impl_->host = host;
}

Worker::~Worker() { stop(); }

Status Worker::start() {
  Impl& m = *impl_;
  if (m.thread.joinable()) return FailedPrecondition("worker already started");
  unsigned io = m.options.io_threads ? m.options.io_threads : std::max(1u, std::thread::hardware_concurrency());
  m.slots = m.options.slots ? m.options.slots : 1024 * io;
  if (m.options.context) {
    m.context = m.options.context;
  } else {
    m.own_context = std::make_unique<zmq::context_t>(1);
    m.context = m.own_context.get();
  }
  m.wake_fd = std::make_unique<WakeFd>();
  if (Status st = m.connect(); !st.ok()) return st;
  worker::Fetcher::Options fo;
  fo.io_threads = io;
  fo.worker_id = m.id;
  m.fetcher = std::make_unique<worker::Fetcher>(
      fo, [&m](const SessionId& session, std::vector<worker::FetchResult>&& results) {
        m.done.push(ResultBatch{session, std::move(results)});
        m.wake();
      });
  m.stopping.store(false);
  m.thread = std::thread([&m] { m.run(); });
  Logger().info("worker {}: connecting to {} with {} I/O threads, {} slots{}", m.id, m.options.broker, io, m.slots,
                m.options.echo ? " (echo mode: no HTTP)" : "");
  return Status::Ok();
}

void Worker::drain(std::chrono::milliseconds deadline) {
  Impl& m = *impl_;
  if (!m.thread.joinable() || m.drain_requested.load(std::memory_order_acquire)) return;
  m.drain_timeout = deadline;
  m.drain_requested.store(true, std::memory_order_release);
  m.wake_fd->signal();
}

bool Worker::drained() const { return impl_->drained.load(std::memory_order_acquire); }

void Worker::stop() {
  Impl& m = *impl_;
  if (!m.thread.joinable()) return;
  m.stopping.store(true, std::memory_order_release);
  m.wake_fd->signal();
  m.thread.join();
  m.fetcher.reset();  // joins the I/O threads; no sink call after this
  m.dealer.reset();
  m.wake_fd.reset();
}

const WorkerStats& Worker::stats() const { return impl_->stats; }
const std::string& Worker::id() const { return impl_->id; }
std::size_t Worker::sessions() const { return impl_->fetcher ? impl_->fetcher->sessions() : 0; }

}  // namespace gatherer
