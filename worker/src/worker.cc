#include "gatherer/worker.h"

#include <unistd.h>

#include <iterator>
#include <thread>
#include <unordered_set>

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
  std::thread thread;
  WorkerStats stats;
  RateLimitedLog bad_frame_log;
  Clock::time_point last_heard;
  std::unordered_set<SessionId> sessions;  // opened by SESSION, owned by the socket thread
  Clock::time_point next_heartbeat;

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
      for (const SessionId& s : sessions) fetcher->close_session(s);
      sessions.clear();
    }
    send(proto::Encode(proto::Ready{id, host, slots}));
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
      sessions.insert(m->session);
      return;
    }
    case proto::Command::kDispatch: {
      auto m = proto::DecodeStatements(frames);
      if (!m) return bad(m.error());
      stats.received.fetch_add(m->statements.size(), std::memory_order_relaxed);
      if (options.echo) return echo(m->session, m->statements);
      fetcher->submit(m->session, std::move(m->statements));
      return;
    }
    case proto::Command::kEndSession: {
      auto m = proto::DecodeSessionRef(frames);
      if (!m) return bad(m.error());
      fetcher->close_session(m->session);
      sessions.erase(m->session);
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
    stats.completed.fetch_add(batch.results.size(), std::memory_order_relaxed);
    send(proto::Encode(proto::Results{batch.session, std::move(batch.results)}));
  }
}

void Worker::Impl::run() {
  register_with_broker();
  last_heard = Clock::now();
  next_heartbeat = last_heard + options.heartbeat_interval;
  zmq::pollitem_t items[] = {{dealer->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, wake_fd->fd(), ZMQ_POLLIN, 0}};
  std::vector<zmq::message_t> frames;
  while (!stopping.load(std::memory_order_acquire)) {
    const auto wait = std::chrono::duration_cast<std::chrono::milliseconds>(next_heartbeat - Clock::now());
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
    if (now >= next_heartbeat) {
      next_heartbeat = now + options.heartbeat_interval;
      if (now - last_heard > options.heartbeat_interval * options.heartbeat_liveness) {
        // Majordomo-style: a silent broker may have restarted and forgotten us.
        Logger().info("worker {}: broker silent, registering again", id);
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
  m.dealer = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::dealer);
  protocol::ConfigureSocket(*m.dealer);
  try {
    m.dealer->connect(m.options.broker);
  } catch (const zmq::error_t& e) {
    m.dealer.reset();
    return InvalidArgument("cannot connect to " + m.options.broker + ": " + e.what());
  }
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
