#include "gatherer/gatherer.h"

#include "gatherer/curve.h"
#include "gatherer/event_loop.h"
#include "gatherer/ids.h"
#include "gatherer_impl.h"
#include "tls_settings.h"

namespace gatherer {
namespace {
using Clock = client::Clock;
using client::kHeartbeat;
}  // namespace

Gatherer::Gatherer(Options options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (options.workers < 1 || options.workers > 100'000) {
    throw Error("workers must be between 1 and 100000, got " + std::to_string(options.workers), -1,
                StatusCode::kInvalidArgument);
  }
  if (options.prefetch < 0 || options.prefetch > 100'000) {
    throw Error("prefetch must be between 0 and 100000, got " + std::to_string(options.prefetch), -1,
                StatusCode::kInvalidArgument);
  }
  // Below this the client would heartbeat faster than the broker's loop
  // answers on a loaded machine (it heartbeats three times per timeout).
  if (options.broker_timeout < std::chrono::milliseconds(150)) {
    throw Error("broker_timeout must be at least 150 ms, got " + std::to_string(options.broker_timeout.count()) +
                    " ms",
                -1, StatusCode::kInvalidArgument);
  }
  // One window, set in one place: settings.workers is filled in from it.
  if (options.settings.workers != SessionSettings{}.workers &&
      options.settings.workers != static_cast<std::uint32_t>(options.workers)) {
    throw Error("settings.workers (" + std::to_string(options.settings.workers) + ") differs from workers (" +
                    std::to_string(options.workers) + "); the window is Options::workers, leave settings.workers alone",
                -1, StatusCode::kInvalidArgument);
  }
  {
    const bool any = !options.curve_broker_key.empty() || !options.curve_public_key.empty() ||
                     !options.curve_secret_key.empty();
    if (any && !(IsCurveKey(options.curve_broker_key) && IsCurveKey(options.curve_public_key) &&
                 IsCurveKey(options.curve_secret_key))) {
      throw Error("CURVE needs curve_broker_key, curve_public_key and curve_secret_key, each 40 Z85 characters", -1,
                  StatusCode::kInvalidArgument);
    }
  }
  m.logger = NewLogger(options.log_level);
  m.options = std::move(options);
  m.settings = m.options.settings;
  m.settings.workers = static_cast<std::uint32_t>(m.options.workers);
  Status tls = client::LoadTlsFiles(m.options, m.settings);
  if (tls.ok()) tls = client::ValidateTlsAndProxy(m.settings);
  if (!tls.ok()) throw Error("invalid settings: " + tls.message(), -1, tls.code());
  if (m.settings.tls_insecure) {
    m.log().warn("gatherer: TLS verification is off (tls_insecure): any server can pose as the one asked for; "
                 "for testing only");
  }
  if (m.settings.max_attempts == 0 || m.settings.accept_min > m.settings.accept_max ||
      m.settings.max_body_bytes > kMaxResponseBody) {
    throw Error("invalid settings: max_attempts must be >= 1, accept_min <= accept_max and max_body_bytes <= " +
                    std::to_string(kMaxResponseBody),
                -1, StatusCode::kInvalidArgument);
  }
  m.session = NewSessionId();
  m.session_text = m.session.ToString();
  m.context = std::make_unique<zmq::context_t>(1);
  if (m.options.broker.empty()) {
    // Embedded: same broker and worker code, over inproc:// in this context.
    m.endpoint = "inproc://gatherer-" + m.session_text;
    m.cluster = StartEmbeddedCluster(*m.context, m.endpoint, m.logger, m.options.embedded_io_threads);
  } else {
    m.endpoint = m.options.broker;
  }
  m.dealer = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::dealer);
  proto::ConfigureSocket(*m.dealer, kHeartbeat);
  const bool curve = !m.options.broker.empty() && !m.options.curve_broker_key.empty();
  if (curve) MakeCurveClient(*m.dealer, {m.options.curve_public_key, m.options.curve_secret_key}, m.options.curve_broker_key);
  // §1.5: a reconnect keeps this session's route at the broker. With CURVE
  // the route is a secret of its own (§1.7), so that a session id seen in a
  // log does not let another peer take it over.
  m.dealer->set(zmq::sockopt::routing_id,
                curve ? proto::ClientRoutingId(NewSessionId()) : proto::ClientRoutingId(m.session));
  m.watch = std::make_unique<proto::ReconnectWatch>(*m.context, *m.dealer);
  try {
    m.dealer->connect(m.endpoint);
  } catch (const zmq::error_t& e) {
    throw Error("cannot connect to broker " + m.endpoint + ": " + e.what(), -1, StatusCode::kInvalidArgument);
  }
  m.prefetch = static_cast<std::uint32_t>(m.options.prefetch ? m.options.prefetch : m.options.workers);
  // Asynchronous: ZeroMQ queues OPEN until the broker is reachable, so the
  // client may start before the broker.
  m.send(proto::Encode(proto::Open{m.session, m.settings, m.prefetch}));
  m.last_heard = Clock::now();
  m.log().debug("gatherer: session {} opening on {} (window {})", m.session_text, m.endpoint, m.options.workers);
}

void Gatherer::Impl::close_session() {
  if (watch && !watch->refused().empty()) return;  // never admitted: nothing to close
  try {
    send(proto::Encode(proto::Command::kClose, proto::SessionRef{session}));
    // Wait for CLOSED so that, when the destructor returns, the broker has
    // forgotten the session and told the workers holding it. Not for a
    // broker that has been unreachable for the broker timeout, and only 1 s
    // for one never heard from (its OPENED comes first, in milliseconds, if
    // it is there at all): a session left behind expires by its TTL.
    auto wait = std::min<std::chrono::milliseconds>(options.connect_timeout, std::chrono::seconds(5));
    if (heard_once && Clock::now() - last_heard > options.broker_timeout) {
      log().debug("gatherer: not waiting for broker {} to confirm closing session {}: unreachable", endpoint,
                  session_text);
      return;
    }
    const auto deadline = Clock::now() + wait;
    const auto silent_deadline = Clock::now() + std::chrono::seconds(1);
    std::vector<zmq::message_t> frames;
    PollSet poll;
    poll.add(*dealer);
    while (Clock::now() < deadline) {
      if (!heard_once && Clock::now() >= silent_deadline) {
        log().debug("gatherer: broker {} never answered; not waiting to close session {}", endpoint, session_text);
        return;
      }
      if (!poll.wait_until(heard_once ? deadline : std::min(deadline, silent_deadline))) return;
      while (recv(frames)) {
        auto c = proto::PeekCommand(frames);
        if (!c) {
          bad("message", c.error());
          continue;
        }
        if (*c != proto::Command::kClosed) continue;
        auto closed = proto::DecodeSessionRef(frames);
        if (!closed) {
          bad("CLOSED", closed.error());
          continue;
        }
        if (closed->session == session) {
          log().debug("gatherer: session {} closed", session_text);
          return;
        }
      }
    }
    log().warn("gatherer: broker did not confirm closing session {}", session_text);
  } catch (const std::exception& e) {
    log().warn("gatherer: closing session {} failed: {}", session_text, e.what());
  }
}

Gatherer::~Gatherer() {
  Impl& m = *impl_;
  m.close_session();
  m.watch.reset();
  m.dealer.reset();
  m.cluster.reset();  // the worker, then the broker
  m.context.reset();
}

const std::string& Gatherer::session_id() const { return impl_->session_text; }

std::uint64_t Gatherer::malformed_messages() const { return impl_->malformed; }

Progress Gatherer::progress() const {
  const auto& c = impl_->progress;
  Progress p;
  p.total = c.total.load(std::memory_order_relaxed);
  p.done = c.done.load(std::memory_order_relaxed);
  p.failed = c.failed.load(std::memory_order_relaxed);
  p.running = c.running.load(std::memory_order_relaxed);
  const std::int64_t started = c.started_ns.load(std::memory_order_relaxed);
  const std::int64_t ended = c.ended_ns.load(std::memory_order_relaxed);
  if (started != 0) {
    const std::int64_t until = p.running || ended == 0 ? Impl::NowNs() : ended;
    p.elapsed_s = static_cast<double>(std::max<std::int64_t>(0, until - started)) / 1e9;
  }
  if (p.elapsed_s > 0) p.rate = static_cast<double>(p.done) / p.elapsed_s;
  if (p.total > 0 && p.rate > 0 && p.done <= p.total) p.eta_s = static_cast<double>(p.total - p.done) / p.rate;
  return p;
}

void Gatherer::cancel() {
  impl_->cancel_requested.store(true, std::memory_order_release);
  impl_->cancel_fd.signal();
}

}  // namespace gatherer
