#include "gatherer/worker.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <deque>
#include <iterator>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <tbb/concurrent_queue.h>

#include "fetcher.h"
#include "gatherer/event_loop.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/wake_fd.h"
#include "request.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using Clock = std::chrono::steady_clock;

struct ResultBatch {
  SessionId session;
  std::vector<worker::FetchResult> results;
};

// A RESULTS message sent and not yet acknowledged by the broker (§3.7); its
// frames share their buffers with what was sent.
struct Unacked {
  std::uint64_t seq = 0;
  Clock::time_point sent;
  proto::Frames frames;
};

// Set while this thread runs the fetcher's driven loop (Worker::Impl::step):
// the results that loop hands over are flushed by the same step, so no
// eventfd needs to say so.
thread_local bool tl_driving_fetcher = false;
}  // namespace

struct Worker::Impl final : LoopPart {
  WorkerOptions options;
  std::string id;
  std::string host;
  std::uint32_t slots = 0;
  std::unique_ptr<zmq::context_t> own_context;
  zmq::context_t* context = nullptr;
  std::unique_ptr<zmq::socket_t> dealer;
  std::unique_ptr<proto::ReconnectWatch> watch;  // of `dealer`; destroyed before it
  std::string routing_id;                 // kept across sockets (§1.5)
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
  bool started = false;
  std::vector<zmq::message_t> frames;
  // Bumped with every new socket (connect()): a PollSet holding the old
  // one is built again.
  std::uint64_t sockets_generation = 0;
  std::size_t driven_item = 0;  // the fetcher's driven loop in a PollSet, after `first`
  // While the fetcher's loop is driven: results and their body bytes since
  // the last look at its load (flush_results, weigh_driven_loop).
  std::uint64_t sampled_results = 0;
  std::uint64_t sampled_body_bytes = 0;
  WorkerStats stats;
  worker::FetchMetrics fetch_metrics;  // for metrics_text(), when options.metrics
  RateLimitedLog bad_frame_log;
  RateLimitedLog send_failed_log;
  RateLimitedLog broker_error_log;  // ERRORs from the broker, one line a second  // a gone broker fails every send: one line a second
  Clock::time_point last_heard;
  // The silence after which a new socket is connected (§3.4.3): liveness
  // periods, doubling while the broker stays silent, up to four times that;
  // anything heard from the broker starts it over.
  Clock::duration silence_limit{};
  Clock::duration silence_base() const { return options.heartbeat_interval * options.heartbeat_liveness; }
  // Sessions opened by SESSION, with the indices in hand for each (taken
  // and not yet answered: what HOLDING reports, §3.7); owned by the socket
  // thread.
  std::unordered_map<SessionId, std::unordered_set<std::uint64_t>> sessions;
  std::uint64_t in_hand = 0;
  // §3.7: the last order seq received from the broker (SESSION, DISPATCH,
  // END_SESSION), RESULTS numbered and kept until acknowledged.
  std::uint64_t order_seq = 0;
  std::uint64_t results_seq = 0;
  std::deque<Unacked> unacked;
  // READY sent and nothing heard since but errors: a not_found now answers
  // a message sent before READY (§3.4.4).
  bool awaiting_registration = false;
  // A RESULTS could not be handed to ZeroMQ: send the unacknowledged again
  // at the next heartbeat.
  bool resend_due = false;
  std::string refusal;  // why the broker refused the last handshake, if it did
  Clock::time_point next_heartbeat;
  bool draining = false;
  bool remote_drain = false;  // the broker sent DRAIN (§3.9.5)
  Clock::time_point drain_deadline;

  explicit Impl(WorkerOptions o) : options(std::move(o)) {}
  spdlog::logger& log() const { return options.logger ? *options.logger : Logger(); }

  void wake() {
    if (!wake_pending.exchange(true, std::memory_order_acq_rel)) wake_fd->signal();
  }
  // False when ZeroMQ would not take the message (no connection for the
  // whole send timeout, or at once without `wait`): whatever it carried
  // must be sent again. What is sent each period (HEARTBEAT, RESULTS again)
  // does not wait: with the connection gone, a wait of the send timeout
  // would hold this thread past the broker's silence it must notice. Nor
  // does it warn when ZeroMQ cannot take it now (no connection, or a full
  // queue to a broker that still hears this worker's RESULTS): the next
  // period sends again, and a broker silent for too long is said anyway.
  bool send(proto::Frames&& frames, bool wait = true) {
    const proto::SendResult result = proto::SendMessage(*dealer, {}, frames, wait);
    if (result == proto::SendResult::kSent) return true;
    std::uint64_t suppressed = 0;
    if ((wait || result != proto::SendResult::kWouldBlock) && send_failed_log.allow(suppressed)) {
      log().warn("worker {}: send to broker failed ({} more suppressed)", id, suppressed);
    }
    return false;
  }
  // READY, first or again (§3.4.3, §3.4.4). Registering again means the
  // broker presumed this worker dead or lost it, and its leases are being
  // re-dispatched: the sessions held so far are dropped, so no statement
  // keeps being fetched for nobody (PROTOCOL.md §3.4.5). RESULTS not yet
  // acknowledged go first when the broker may still know this worker: they
  // settle their leases there instead of being fetched again.
  void register_with_broker(bool resend_unacked) {
    if (resend_unacked) resend(Clock::time_point::max());
    if (stats.registrations.fetch_add(1, std::memory_order_relaxed) > 0) {
      for (const auto& [s, held] : sessions) fetcher->close_session(s);
      sessions.clear();
      set_in_hand(0);
    }
    unacked.clear();
    order_seq = 0;
    results_seq = 0;
    send(proto::Encode(proto::Ready{id, host, slots, static_cast<std::uint32_t>(::getpid())}));
    awaiting_registration = true;
    // A drain outlives a re-registration: the new broker is told too.
    if (draining) send(proto::EncodeEmpty(proto::Command::kDraining));
  }
  // Numbers, keeps and sends one RESULTS message (§3.7).
  void send_results(proto::Results&& results) {
    results.seq = ++results_seq;
    proto::Frames frames = proto::Encode(std::move(results));
    unacked.push_back(Unacked{results_seq, Clock::now(), proto::CopyFrames(frames)});
    if (!send(std::move(frames))) resend_due = true;
  }
  // Sends again every unacknowledged RESULTS sent before `before`.
  void resend(Clock::time_point before, bool wait = true) {
    const auto now = Clock::now();
    for (Unacked& u : unacked) {
      if (u.sent >= before) break;
      u.sent = now;
      if (!send(proto::CopyFrames(u.frames), wait)) resend_due = true;
    }
  }
  // §3.7: after a reconnect or a gap in the order seqs, RESULTS not yet
  // acknowledged go again, then HOLDING says what is in hand, so the broker
  // queues again what never arrived here.
  void resynchronise(const char* why) {
    log().info("worker {}: resynchronising with the broker ({}): {} RESULTS sent again, {} statements in hand", id,
                  why, unacked.size(), in_hand);
    resend(Clock::time_point::max());
    proto::Holding holding{order_seq, {}};
    holding.sessions.reserve(sessions.size());
    for (const auto& [session, held] : sessions) {
      holding.sessions.emplace_back(session, std::vector<std::uint64_t>(held.begin(), held.end()));
    }
    send(proto::Encode(holding));
  }
  // Notes an order seq; false when one was missed.
  bool in_order(std::uint64_t seq) {
    const bool gap = seq > order_seq + 1;
    order_seq = std::max(order_seq, seq);
    return !gap;
  }
  void set_in_hand(std::uint64_t n) {
    in_hand = n;
    stats.in_hand.store(n, std::memory_order_relaxed);
  }
  void end_session(const SessionId& session) {
    auto it = sessions.find(session);
    if (it == sessions.end()) return;
    fetcher->close_session(session);
    set_in_hand(in_hand - it->second.size());
    sessions.erase(it);
  }
  bool drain_step(Clock::time_point now);
  // A new DEALER connected to the broker. Also used after a silent broker:
  // ZeroMQ does not reconnect a connection it dropped after a protocol error,
  // so a fresh socket is the one sure way back (like Majordomo's workers).
  Status connect() {
    watch.reset();
    dealer = std::make_unique<zmq::socket_t>(*context, zmq::socket_type::dealer);
    protocol::ConfigureSocket(*dealer, options.heartbeat_interval);
    if (!options.curve_broker_key.empty()) MakeCurveClient(*dealer, options.curve_key, options.curve_broker_key);
    dealer->set(zmq::sockopt::routing_id, routing_id);
    watch = std::make_unique<proto::ReconnectWatch>(*context, *dealer);
    ++sockets_generation;
    try {
      dealer->connect(options.broker);
    } catch (const zmq::error_t& e) {
      watch.reset();
      dealer.reset();
      return InvalidArgument("cannot connect to " + options.broker + ": " + e.what());
    }
    return Status::Ok();
  }
  void handle(std::vector<zmq::message_t>& frames);
  void echo(const SessionId& session, const std::vector<proto::WireStatement>& statements);
  bool flush_results();
  void weigh_driven_loop();
  static constexpr std::uint64_t kLoadSample = 64;
  static constexpr std::uint64_t kBigBody = 64 << 10;
  void begin();
  void run();
  // An inproc connection (the embedded cluster's) never drops: its link
  // events are not polled.
  bool link_events() const { return !options.broker.starts_with("inproc://"); }
  std::size_t add_to(PollSet& poll) override {
    const std::size_t first = poll.add(*dealer);
    poll.add(*wake_fd);
    if (link_events()) poll.add(watch->events());
    // Without a thread of its own, the worker runs the fetcher's first I/O
    // loop in its steps (Fetcher::Options::drive_first).
    if (fetcher->driven_fd() >= 0) driven_item = poll.add(fetcher->driven_fd()) - first;
    return first;
  }
  std::uint64_t generation() const override { return sockets_generation; }
  Clock::time_point next_due() const override {
    Clock::time_point due = draining ? std::min(next_heartbeat, drain_deadline) : next_heartbeat;
    if (const auto fetch_due = fetcher->driven_due()) due = std::min(due, *fetch_due);
    return due;
  }
  void drive_fetcher(const PollSet* poll, std::size_t first, bool submitted);
  Step step(const PollSet* poll, std::size_t first) override;
};

void Worker::Impl::handle(std::vector<zmq::message_t>& frames) {
  last_heard = Clock::now();
  silence_limit = silence_base();
  auto command = proto::PeekCommand(frames);
  auto bad = [&](const Status& s) {
    stats.malformed.fetch_add(1, std::memory_order_relaxed);
    std::uint64_t suppressed = 0;
    if (bad_frame_log.allow(suppressed)) {
      log().warn("worker {}: dropped malformed message: {} ({} more suppressed)", id, s.ToString(), suppressed);
    }
  };
  if (!command) return bad(command.error());
  switch (*command) {
    case proto::Command::kSession: {
      auto m = proto::DecodeSession(frames);
      if (!m) return bad(m.error());
      // Sent before the broker took our READY: stale (§3.4.5).
      if (awaiting_registration) return;
      const bool ordered = in_order(m->seq);
      fetcher->open_session(m->session, m->settings);
      if (sessions.try_emplace(m->session).second && m->settings.tls_insecure && options.warn_insecure_sessions) {
        log().warn("worker {}: session {} fetches without TLS verification (tls_insecure): for testing only", id,
                   m->session.ToString());
      }
      if (!ordered) resynchronise("an order from the broker was lost");
      return;
    }
    case proto::Command::kDispatch: {
      auto m = proto::DecodeStatements(frames);
      if (!m) return bad(m.error());
      stats.received.fetch_add(m->statements.size(), std::memory_order_relaxed);
      if (awaiting_registration) return;
      const bool ordered = in_order(m->seq);
      auto held = sessions.find(m->session);
      if (held == sessions.end()) {
        // Its SESSION never arrived: HOLDING (now, or after the gap that
        // shows it) hands these back to the broker.
        log().debug("worker {}: dropped DISPATCH of a session it does not hold", id);
        if (!ordered) resynchronise("an order from the broker was lost");
        return;
      }
      if (options.echo) {
        echo(m->session, m->statements);
      } else {
        for (const auto& ws : m->statements) held->second.insert(ws.index);
        set_in_hand(in_hand + m->statements.size());
        fetcher->submit(m->session, std::move(m->statements));
      }
      if (!ordered) resynchronise("an order from the broker was lost");
      return;
    }
    case proto::Command::kEndSession: {
      auto m = proto::DecodeEndSession(frames);
      if (!m) return bad(m.error());
      if (awaiting_registration) return;
      const bool ordered = in_order(m->seq);
      end_session(m->session);
      if (!ordered) resynchronise("an order from the broker was lost");
      return;
    }
    case proto::Command::kHeartbeat: {
      auto m = proto::DecodeBrokerHeartbeat(frames);
      if (!m) return bad(m.error());
      // The broker answers READY with HEARTBEAT [0]: from here on it knows
      // us. Until then a heartbeat is from before READY (§3.4.1).
      if (awaiting_registration) {
        if (m->seq == 0) awaiting_registration = false;
        return;
      }
      // §3.7: the broker names the last order it sent; every earlier one on
      // this connection has arrived, so one not seen here was lost.
      if (m->seq > order_seq) {
        order_seq = m->seq;
        resynchronise("the broker's heartbeat names an order that never arrived");
      }
      return;
    }
    case proto::Command::kDrain: {
      // §3.9.5: an operator asked for this worker to drain, as on SIGTERM.
      if (Status st = proto::DecodeEmpty(frames); !st.ok()) return bad(st);
      remote_drain = true;
      return;
    }
    case proto::Command::kAck: {
      auto m = proto::DecodeAck(frames);
      if (!m) return bad(m.error());
      while (!unacked.empty() && unacked.front().seq <= m->seq) unacked.pop_front();
      return;
    }
    case proto::Command::kError: {
      auto m = proto::DecodeError(frames);
      if (!m) return bad(m.error());
      if (m->code == StatusCode::kNotFound && awaiting_registration) return;  // answers a message sent before READY
      std::uint64_t suppressed = 0;
      if (broker_error_log.allow(suppressed)) {
        log().warn("worker {}: broker says {}: {} ({} more suppressed)", id, StatusCodeName(m->code), m->message,
                   suppressed);
      }
      // The broker does not know us (it restarted): register again.
      if (m->code == StatusCode::kNotFound) register_with_broker(/*resend_unacked=*/false);
      return;
    }
    default:
      return bad(InvalidArgument(std::string("command not accepted by a worker: ") + proto::CommandName(*command)));
  }
}

// WorkerOptions::echo: an empty 200 per statement, straight back.
void Worker::Impl::echo(const SessionId& session, const std::vector<proto::WireStatement>& statements) {
  proto::Results results{session, 0, std::vector<proto::WireResult>(statements.size())};
  for (std::size_t i = 0; i < statements.size(); ++i) {
    results.results[i].index = statements[i].index;
    results.results[i].response.status = 200;
    results.results[i].response.attempts = 1;
    results.results[i].response.worker = id;
  }
  stats.completed.fetch_add(statements.size(), std::memory_order_relaxed);
  send_results(std::move(results));
}

// True when it sent any.
bool Worker::Impl::flush_results() {
  // Order matters: the eventfd is consumed first (the poll step did), then
  // the flag cleared, then the queue drained. Clearing first would let an I/O
  // thread's wake-up land in the eventfd about to be consumed while the flag
  // stays set, and every later batch would then skip its write: results
  // stranded, session stalled.
  wake_pending.exchange(false, std::memory_order_acq_rel);
  ResultBatch batch;
  bool sent = false;
  const bool driving = fetcher->driven_fd() >= 0;  // the driven loop's load is sampled
  while (done.try_pop(batch)) {
    auto held = sessions.find(batch.session);
    if (held == sessions.end()) continue;  // ended meanwhile: nobody wants these
    std::uint64_t n = 0;
    for (const auto& r : batch.results) n += held->second.erase(r.index);
    if (driving) {
      for (const auto& r : batch.results) sampled_body_bytes += r.response.body.size();
      sampled_results += batch.results.size();
    }
    set_in_hand(in_hand - std::min(n, in_hand));
    stats.completed.fetch_add(batch.results.size(), std::memory_order_relaxed);
    send_results(proto::Results{batch.session, 0, std::move(batch.results)});
    sent = true;
  }
  // Weighed after a sample's count, or as soon as its bodies are known to
  // average kBigBody or more whatever comes next (four of 1 MiB).
  if (sampled_results >= kLoadSample || sampled_body_bytes >= kLoadSample * kBigBody) weigh_driven_loop();
  return sent;
}

// The fetcher's driven loop runs on this thread, where a small result costs
// least: no thread is woken for it. Big bodies are another matter: reading
// them is most of the work, and done here it waits on everything else this
// thread does (the broker, the client, their copies). When the results of
// a sample average kBigBody or more, the loop gets a thread of its
// own for good, its sessions and connections kept (Fetcher::undrive), and
// this worker's poll items change with it.
void Worker::Impl::weigh_driven_loop() {
  const bool big = sampled_body_bytes / sampled_results >= kBigBody;
  sampled_results = 0;
  sampled_body_bytes = 0;
  if (!big) return;
  fetcher->undrive();
  ++sockets_generation;
  log().debug("worker {}: bodies average {} KiB or more: fetching on a thread of its own", id, kBigBody >> 10);
}

// Graceful drain (§3.4.7): DRAINING once, then DISCONNECT when nothing is in
// hand or the deadline passed. True when the worker is done.
bool Worker::Impl::drain_step(Clock::time_point now) {
  if (!draining) {
    const bool local = drain_requested.load(std::memory_order_acquire);
    if (!local && !remote_drain) return false;
    draining = true;
    // drain_timeout is written before drain_requested, so read only after it.
    const auto timeout = local ? drain_timeout : options.drain_timeout;
    drain_deadline = now + timeout;
    log().info("worker {}: draining ({}): no new work; {} statements in hand, {} ms to finish them", id,
               local ? "signal" : "asked by the broker", in_hand, timeout.count());
    send(proto::EncodeEmpty(proto::Command::kDraining));
  }
  if (in_hand > 0 && now < drain_deadline) return false;
  if (in_hand > 0) {
    log().warn("worker {}: drain deadline passed; {} statements in hand go back to the broker", id, in_hand);
  } else {
    log().info("worker {}: drained; every statement answered", id);
  }
  send(proto::EncodeEmpty(proto::Command::kDisconnect));
  // Let the last results and DISCONNECT leave before the socket closes.
  dealer->set(zmq::sockopt::linger, static_cast<int>(options.heartbeat_interval.count() * 2));
  return true;
}

void Worker::Impl::begin() {
  register_with_broker(/*resend_unacked=*/false);
  last_heard = Clock::now();
  silence_limit = silence_base();
  next_heartbeat = last_heard + options.heartbeat_interval;
}

void Worker::Impl::run() {
  PollSet poll;
  std::size_t first = 0;
  std::uint64_t seated = ~std::uint64_t{0};
  while (true) {
    if (seated != sockets_generation) {  // a new socket after a silent broker
      poll.truncate(0);
      first = add_to(poll);
      seated = sockets_generation;
    }
    if (!poll.wait_until(next_due()) || step(&poll, first) == Step::kDone) return;
  }
}

LoopPart::Step Worker::Impl::step(const PollSet* poll, std::size_t first) {
  if (stopping.load(std::memory_order_acquire)) return Step::kDone;
  // On its own thread the poll is the whole truth (nothing else sends to the
  // broker for it between the poll and this step): an empty receive would
  // only cost two system calls in ZeroMQ's mailbox check.
  std::size_t taken = 0;
  const bool look = !options.own_thread || poll == nullptr || poll->ready(first);
  if (look && !ReceiveBatch(*dealer, frames, 1024, [&](auto& f) {
        handle(f);
        ++taken;
      })) {
    return Step::kDone;
  }
  drive_fetcher(poll, first, taken > 0);
  // Whether or not the wake-up was seen: results the I/O threads queued go
  // now (flush_results() keeps the eventfd and flag in the right order).
  const bool flushed = flush_results();
  // §3.7: the connection came back; what was in flight on the old one may
  // be lost either way. Only a poll shows link events.
  if (poll != nullptr && link_events() && poll->ready(first + 2) && watch->reconnected() && !awaiting_registration) {
    resynchronise("reconnected");
  }
  // A refused handshake (CURVE) is said once, not at every retry.
  if (watch->refused() != refusal) {
    refusal = watch->refused();
    if (!refusal.empty()) log().error("worker {}: cannot connect to broker {}: {}", id, options.broker, refusal);
  }
  const auto now = Clock::now();
  if (drain_step(now)) {
    drained.store(true, std::memory_order_release);
    return Step::kDone;
  }
  if (now >= next_heartbeat) {
    next_heartbeat = now + options.heartbeat_interval;
    if (now - last_heard > silence_limit) {
      // Majordomo-style: a silent broker may have restarted and forgotten
      // us. Each further reconnect waits longer: a broker slow to come back
      // (a restart, a loaded machine) is not met by a new connection every
      // few periods, each one torn down as it is accepted; a restarted one
      // hears this worker's HEARTBEATs on the socket ZeroMQ reconnects
      // meanwhile, and answers them (§3.4.4).
      log().info("worker {}: broker silent for {} ms, reconnecting and registering again", id,
                 std::chrono::duration_cast<std::chrono::milliseconds>(now - last_heard).count());
      silence_limit = std::min(silence_limit * 2, silence_base() * 4);
      if (Status st = connect(); !st.ok()) {
        log().error("worker {}: {}", id, st.ToString());
        return Step::kDone;
      }
      register_with_broker(/*resend_unacked=*/true);
      last_heard = now;
    } else {
      send(proto::EncodeHeartbeat(), /*wait=*/false);
      // §3.7.1: RESULTS are lost only with a connection (the reconnect
      // resynchronises) or when ZeroMQ refused one; as a safety net, any
      // unacknowledged for ten periods — the broker acknowledges within one
      // loop pass — go again. Never sooner: a slow broker would only get
      // duplicates, and be slowed further by them.
      if (resend_due) {
        resend_due = false;
        resend(Clock::time_point::max(), /*wait=*/false);
      } else {
        resend(now - 10 * options.heartbeat_interval, /*wait=*/false);
      }
    }
  }
  return taken > 0 || flushed ? Step::kBusy : Step::kIdle;
}

// One pass of the fetcher's driven loop, if it has one and anything may be
// ready for it: its descriptor fired, statements just went to it, a stand-in
// looks without a poll, or its timers are due.
void Worker::Impl::drive_fetcher(const PollSet* poll, std::size_t first, bool submitted) {
  if (fetcher->driven_fd() < 0) return;
  if (!submitted && poll != nullptr && !poll->ready(first + driven_item)) {
    const auto due = fetcher->driven_due();
    if (!due || *due > Clock::now()) return;
  }
  tl_driving_fetcher = true;
  fetcher->drive();
  tl_driving_fetcher = false;
}

Status CheckSourceAddress(std::string_view address) {
  if (address.empty()) return Status::Ok();
  std::string message = "source address '";
  message += address;
  if (!worker::IsIpLiteral(address)) {
    message += "' is not an IPv4 or IPv6 address (a literal such as 10.0.0.5 or 2001:db8::5; no host or interface name)";
    return InvalidArgument(message);
  }
  // Bound once here, so that an address this host does not have fails at
  // start rather than at every connection the worker would open.
  const std::string text(address);
  sockaddr_in6 v6{};
  sockaddr_in v4{};
  const sockaddr* bound = nullptr;
  socklen_t length = 0;
  if (inet_pton(AF_INET, text.c_str(), &v4.sin_addr) == 1) {
    v4.sin_family = AF_INET;
    bound = reinterpret_cast<const sockaddr*>(&v4);
    length = sizeof v4;
  } else if (inet_pton(AF_INET6, text.c_str(), &v6.sin6_addr) == 1) {
    v6.sin6_family = AF_INET6;
    bound = reinterpret_cast<const sockaddr*>(&v6);
    length = sizeof v6;
  }
  const int fd = bound ? ::socket(bound->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0) : -1;
  const int error = fd < 0 ? errno : (::bind(fd, bound, length) == 0 ? 0 : errno);
  if (fd >= 0) ::close(fd);
  if (error == 0) return Status::Ok();
  message += "' cannot be bound on this host: ";
  message += std::strerror(error);
  return InvalidArgument(message);
}

Worker::Worker(WorkerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  impl_->id = impl_->options.worker_id.empty() ? NewWorkerId() : impl_->options.worker_id;
  // Unique per instance whatever --id says, so two workers never share a route.
  impl_->routing_id = protocol::WorkerRoutingId(NewSessionId());
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) == 0) impl_->host = host;
}

Worker::~Worker() { stop(); }

Status Worker::start() {
  Impl& m = *impl_;
  if (m.started) return FailedPrecondition("worker already started");
  // Before connecting: a worker that cannot fetch must not register.
  if (Status st = CheckSourceAddress(m.options.source_address); !st.ok()) return st;
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
  fo.metrics = m.options.metrics ? &m.fetch_metrics : nullptr;
  fo.destinations = m.options.destinations;
  fo.source_address = m.options.source_address;
  fo.drive_first = !m.options.own_thread;
  m.fetcher = std::make_unique<worker::Fetcher>(
      fo, [&m](const SessionId& session, std::vector<worker::FetchResult>&& results) {
        m.done.push(ResultBatch{session, std::move(results)});
        if (!tl_driving_fetcher) m.wake();
      });
  m.stopping.store(false);
  m.begin();
  m.started = true;
  if (m.options.own_thread) m.thread = std::thread([&m] { m.run(); });
  m.log().info("worker {}: connecting to {} with {} I/O threads, {} slots{}", m.id, m.options.broker, io, m.slots,
                m.options.echo ? " (echo mode: no HTTP)" : "");
  return Status::Ok();
}

void Worker::drain(std::chrono::milliseconds deadline) {
  Impl& m = *impl_;
  if (!m.started || m.drain_requested.load(std::memory_order_acquire)) return;
  m.drain_timeout = deadline;
  m.drain_requested.store(true, std::memory_order_release);
  m.wake_fd->signal();
}

bool Worker::drained() const { return impl_->drained.load(std::memory_order_acquire); }

void Worker::stop() {
  Impl& m = *impl_;
  if (!m.started) return;
  m.started = false;
  m.stopping.store(true, std::memory_order_release);
  m.wake_fd->signal();
  if (m.thread.joinable()) m.thread.join();
  m.fetcher.reset();  // joins the I/O threads; no sink call after this
  m.watch.reset();
  m.dealer.reset();
  m.wake_fd.reset();
}

const WorkerStats& Worker::stats() const { return impl_->stats; }

LoopPart& Worker::loop() { return *impl_; }

std::string Worker::metrics_text() const {
  const Impl& m = *impl_;
  const auto load = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  std::string out = fmt::format(
      "# HELP gatherer_worker_build_info Always 1; the version and worker id in labels.\n"
      "# TYPE gatherer_worker_build_info gauge\n"
      "gatherer_worker_build_info{{version=\"{}\",worker=\"{}\"}} 1\n"
      "# HELP gatherer_worker_slots Statements this worker takes at once.\n# TYPE gatherer_worker_slots gauge\n"
      "gatherer_worker_slots {}\n"
      "# HELP gatherer_worker_statements_received_total Statements dispatched to this worker.\n"
      "# TYPE gatherer_worker_statements_received_total counter\ngatherer_worker_statements_received_total {}\n"
      "# HELP gatherer_worker_statements_done_total Statements answered to the broker.\n"
      "# TYPE gatherer_worker_statements_done_total counter\ngatherer_worker_statements_done_total {}\n"
      "# HELP gatherer_worker_statements_in_flight Statements in hand.\n"
      "# TYPE gatherer_worker_statements_in_flight gauge\ngatherer_worker_statements_in_flight {}\n"
      "# HELP gatherer_worker_malformed_frames_total Malformed messages dropped.\n"
      "# TYPE gatherer_worker_malformed_frames_total counter\ngatherer_worker_malformed_frames_total {}\n"
      "# HELP gatherer_worker_registrations_total READY messages sent (registrations with the broker).\n"
      "# TYPE gatherer_worker_registrations_total counter\ngatherer_worker_registrations_total {}\n",
      GATHERER_VERSION, m.id, m.slots, load(m.stats.received), load(m.stats.completed), load(m.stats.in_hand),
      load(m.stats.malformed), load(m.stats.registrations));
  if (m.options.metrics) out += m.fetch_metrics.render();
  return out;
}
const std::string& Worker::id() const { return impl_->id; }
std::size_t Worker::sessions() const { return impl_->fetcher ? impl_->fetcher->sessions() : 0; }

}  // namespace gatherer
