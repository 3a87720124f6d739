#include "gatherer/gatherer.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <iterator>
#include <span>

#include "gatherer/broker.h"
#include "gatherer/ids.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "gatherer/transport.h"
#include "gatherer/worker.h"

namespace gatherer {
namespace {
namespace proto = protocol;
using Clock = std::chrono::steady_clock;

constexpr std::chrono::milliseconds kHeartbeat{1000};
// Statements per SUBMIT at most: big enough to amortise a message, small
// enough that the first statements start before the whole window is encoded.
constexpr std::size_t kSubmitChunk = 1024;
}  // namespace

struct Gatherer::Impl {
  Options options;
  SessionSettings settings;
  SessionId session;
  std::string session_text;
  std::string endpoint;
  std::unique_ptr<zmq::context_t> context;
  // Embedded mode only: the in-process cluster (DESIGN §2, "Embedded default").
  std::unique_ptr<Broker> broker;
  std::unique_ptr<Worker> worker;
  std::unique_ptr<zmq::socket_t> dealer;
  int cancel_fd = -1;
  std::atomic<bool> cancel_requested{false};
  std::uint64_t next_index = 0;
  Clock::time_point last_heard;

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
    return true;
  }
  void close_session();
};

Gatherer::Gatherer(Options options) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  if (options.workers < 1 || options.workers > 100'000) {
    throw Error("workers must be between 1 and 100000, got " + std::to_string(options.workers), -1,
                StatusCode::kInvalidArgument);
  }
  if (options.prefetch < 0) throw Error("prefetch must not be negative", -1, StatusCode::kInvalidArgument);
  SetLogLevel(options.log_level);
  m.options = std::move(options);
  m.settings = m.options.settings;
  m.settings.workers = static_cast<std::uint32_t>(m.options.workers);
  if (m.settings.max_attempts == 0 || m.settings.accept_min > m.settings.accept_max) {
    throw Error("invalid settings: max_attempts must be >= 1 and accept_min <= accept_max", -1,
                StatusCode::kInvalidArgument);
  }
  m.session = NewSessionId();
  m.session_text = m.session.ToString();
  m.context = std::make_unique<zmq::context_t>(1);
  if (m.options.broker.empty()) {
    // Embedded: same broker and worker code, over inproc:// in this context.
    m.endpoint = "inproc://gatherer-" + m.session_text;
    BrokerOptions bo;
    bo.endpoints = {m.endpoint};
    bo.context = m.context.get();
    m.broker = std::make_unique<Broker>(bo);
    if (Status s = m.broker->start(); !s.ok()) throw Error("embedded broker: " + s.ToString(), -1, s.code());
    WorkerOptions wo;
    wo.broker = m.endpoint;
    wo.context = m.context.get();
    wo.io_threads = m.options.embedded_io_threads;
    m.worker = std::make_unique<Worker>(wo);
    if (Status s = m.worker->start(); !s.ok()) throw Error("embedded worker: " + s.ToString(), -1, s.code());
  } else {
    m.endpoint = m.options.broker;
  }
  m.cancel_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  m.dealer = std::make_unique<zmq::socket_t>(*m.context, zmq::socket_type::dealer);
  m.dealer->set(zmq::sockopt::maxmsgsize, proto::kMaxMessageBytes);
  m.dealer->set(zmq::sockopt::linger, 0);
  m.dealer->set(zmq::sockopt::sndhwm, 100'000);
  m.dealer->set(zmq::sockopt::rcvhwm, 100'000);
  try {
    m.dealer->connect(m.endpoint);
  } catch (const zmq::error_t& e) {
    throw Error("cannot connect to broker " + m.endpoint + ": " + e.what(), -1, StatusCode::kInvalidArgument);
  }
  const auto prefetch = static_cast<std::uint32_t>(m.options.prefetch ? m.options.prefetch : m.options.workers);
  // Asynchronous: ZeroMQ queues OPEN until the broker is reachable, so the
  // client may start before the broker.
  m.send(proto::Encode(proto::Open{m.session, m.settings, prefetch}));
  m.last_heard = Clock::now();
  Logger().debug("gatherer: session {} opening on {} (window {})", m.session_text, m.endpoint, m.options.workers);
}

void Gatherer::Impl::close_session() {
  try {
    send(proto::Encode(proto::Command::kClose, proto::SessionRef{session}));
    // Wait for CLOSED so that, when the destructor returns, the broker has
    // forgotten the session and told the workers holding it (DESIGN §2).
    const auto deadline = Clock::now() + std::min<std::chrono::milliseconds>(options.connect_timeout,
                                                                              std::chrono::seconds(5));
    std::vector<zmq::message_t> frames;
    zmq::pollitem_t item{dealer->handle(), 0, ZMQ_POLLIN, 0};
    while (Clock::now() < deadline) {
      zmq::poll(&item, 1, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()));
      while (recv(frames)) {
        auto c = proto::PeekCommand(frames);
        if (c && *c == proto::Command::kClosed) {
          Logger().debug("gatherer: session {} closed", session_text);
          return;
        }
      }
    }
    Logger().warn("gatherer: broker did not confirm closing session {}", session_text);
  } catch (const std::exception& e) {
    Logger().warn("gatherer: closing session {} failed: {}", session_text, e.what());
  }
}

Gatherer::~Gatherer() {
  Impl& m = *impl_;
  m.close_session();
  m.dealer.reset();
  if (m.worker) m.worker->stop();
  if (m.broker) m.broker->stop();
  m.worker.reset();
  m.broker.reset();
  m.context.reset();
  if (m.cancel_fd >= 0) close(m.cancel_fd);
}

const std::string& Gatherer::session_id() const { return impl_->session_text; }

void Gatherer::cancel() {
  impl_->cancel_requested.store(true, std::memory_order_release);
  const std::uint64_t one = 1;
  (void)!write(impl_->cancel_fd, &one, sizeof(one));
}

const std::vector<Response>& Gatherer::gather() {
  Impl& m = *impl_;
  const std::size_t n = statements.size();
  // DESIGN §2: every statement is checked before anything is sent.
  for (std::size_t i = 0; i < n; ++i) {
    if (Status s = ValidateStatement(statements[i], m.settings); !s.ok()) {
      throw Error("statement " + std::to_string(i) + " is invalid: " + s.message(), static_cast<std::int64_t>(i),
                  s.code());
    }
  }
  responses.clear();
  responses.resize(n);
  if (n == 0) return responses;

  // Indices are session-wide, so results of an earlier, cancelled gather()
  // that arrive late fall outside [base, base + n) and are dropped.
  const std::uint64_t base = m.next_index;
  m.next_index += n;
  const std::size_t window = static_cast<std::size_t>(m.options.workers);
  const std::size_t limit = window + static_cast<std::size_t>(m.options.prefetch ? m.options.prefetch : m.options.workers);
  std::vector<bool> have(n, false);
  std::size_t sent = 0, received = 0;
  std::vector<zmq::message_t> frames;
  zmq::pollitem_t items[] = {{m.dealer->handle(), 0, ZMQ_POLLIN, 0}, {nullptr, m.cancel_fd, ZMQ_POLLIN, 0}};
  auto next_heartbeat = Clock::now() + kHeartbeat;
  const std::span<const Statement> all(statements);
  m.last_heard = Clock::now();  // the idle time before this gather() does not count

  while (received < n) {
    // Keep window + prefetch unanswered: the broker always has the next
    // statements at hand when one finishes (a sliding window, DESIGN §3).
    while (sent < n && sent - received < limit) {
      const std::size_t k = std::min({limit - (sent - received), n - sent, kSubmitChunk});
      m.send(proto::EncodeSubmit(m.session, base + sent, all.subspan(sent, k)));
      sent += k;
    }
    const auto now = Clock::now();
    const auto wait = std::max(std::chrono::milliseconds(0),
                               std::chrono::duration_cast<std::chrono::milliseconds>(next_heartbeat - now));
    zmq::poll(items, 2, wait);
    if (m.cancel_requested.exchange(false, std::memory_order_acq_rel)) {
      std::uint64_t drained;
      (void)!read(m.cancel_fd, &drained, sizeof(drained));
      m.cancel_on_broker();
      Logger().warn("gatherer: session {} cancelled by the caller", m.session_text);
      throw Error("gather cancelled", -1, StatusCode::kCancelled);
    }
    while (m.recv(frames)) {
      auto command = proto::PeekCommand(frames);
      if (!command) {
        Logger().warn("gatherer: dropped malformed message from broker: {}", command.error().ToString());
        continue;
      }
      if (*command == proto::Command::kResults) {
        auto results = proto::DecodeResults(frames);
        if (!results) {
          Logger().warn("gatherer: dropped malformed RESULTS: {}", results.error().ToString());
          continue;
        }
        if (results->session != m.session) continue;
        for (auto& r : results->results) {
          if (r.index < base || r.index >= base + n) continue;  // earlier gather()
          const std::size_t pos = r.index - base;
          if (have[pos]) continue;  // duplicate: exactly-once delivery (DESIGN §5.2)
          have[pos] = true;
          ++received;
          responses[pos] = std::move(r.response);
          const Response& got = responses[pos];
          if (got.ok()) continue;
          Logger().debug("gatherer: statement {} failed: {}: {}", pos, StatusCodeName(got.error->code),
                         got.error->message);
          if (m.options.cancel_on_raise) {
            m.cancel_on_broker();
            Logger().warn("gatherer: statement {} failed, cancelling session {} (cancel_on_raise)", pos,
                          m.session_text);
            throw Error("statement " + std::to_string(pos) + " failed: " +
                            std::string(StatusCodeName(got.error->code)) + ": " + got.error->message,
                        static_cast<std::int64_t>(pos), got.error->code);
          }
        }
      } else if (*command == proto::Command::kError) {
        auto e = proto::DecodeError(frames);
        if (!e) continue;
        if (e->session && *e->session != m.session) continue;
        throw Error("broker refused: " + std::string(StatusCodeName(e->code)) + ": " + e->message, -1, e->code);
      }
      // OPENED, CLOSED and HEARTBEAT only prove the broker is alive.
    }
    if (Clock::now() >= next_heartbeat) {
      next_heartbeat = Clock::now() + kHeartbeat;
      if (Clock::now() - m.last_heard > m.options.connect_timeout) {
        throw Error("broker " + m.endpoint + " has not answered for " +
                        std::to_string(m.options.connect_timeout.count()) + " ms",
                    -1, StatusCode::kUnavailable);
      }
      m.send(proto::EncodeHeartbeat());
    }
  }
  return responses;
}

}  // namespace gatherer
