// Stream::Run: one gather() or stream over a Gatherer's session, and the
// Gatherer's gather() and stream() that start one. A little over 600 lines:
// a run's top-up, pump, acknowledgements and hand-out are one loop over the
// same state; the plain part of it, the window and reorder ring, is
// client::Window (window.h) with tests of its own.
#include <algorithm>
#include <iterator>
#include <span>

#include "gatherer/event_loop.h"
#include "gatherer_impl.h"
#include "window.h"

namespace gatherer {
namespace {
using Clock = client::Clock;
// A run waiting this long on an unreachable broker, or on a broker with no
// worker, says so once (PROTOCOL.md §3.2.7); on an unreachable one, by half
// its broker timeout at the latest, so that a short timeout is announced
// before it ends the run.
constexpr std::chrono::milliseconds kSayWaiting{3000};
// Statements per SUBMIT at most: big enough to amortise a message, small
// enough that the first statements start before the whole window is encoded.
constexpr std::size_t kSubmitChunk = 1024;
// Statement bodies up to this size keep their buffer in the lazy source's
// ring for reuse; bigger ones are freed as soon as they are answered.
constexpr std::size_t kKeepBodyBytes = 64 * 1024;
// Body bytes taken from RESULTS before they are acknowledged within a pass:
// each body is copied out of its frame, and the frame (in the embedded mode,
// the very buffer the broker and worker keep, §3.6) is freed only once
// acknowledged, so a burst of big bodies would otherwise be held twice until
// the pass ends.
constexpr std::uint64_t kAckAfterBodyBytes = 4 << 20;
}  // namespace

// One gather() or stream: pulls statements, keeps window + prefetch of them
// unanswered at the broker, and hands results out in input or completion
// order through a client::Window (window.h, docs/architecture.md §3); this
// is the run's I/O: the source, the broker's messages, heartbeats, SYNC and
// re-opening.
//
// Owned by the thread reading the stream, like the Gatherer it drives.
struct Stream::Run {
  Gatherer::Impl& m;
  Order order;
  std::span<const Statement> fixed;  // statements from a list, or
  StatementSource source;            // statements pulled lazily
  // Lazy source only: the statements of the positions the window tracks,
  // slot pos % span, kept until answered so they can be sent again to a
  // broker that lost them (PROTOCOL.md §3.2.8). Slots are reused: no copies.
  std::vector<Statement> held;
  bool awaiting_opened = false;  // re-opened; later not_found errors are stale
  // §3.6: a SYNC is on its way (sent at sync_sent); `beat_next` is
  // base + window.sent() when the last HEARTBEAT left.
  bool sync_pending = false;
  Clock::time_point sync_sent;
  std::uint64_t beat_next = 0;
  // Said once per run what it is waiting for, when it waits long.
  Clock::time_point started;
  bool said_unreachable = false;
  bool said_no_workers = false;
  bool source_done = false;
  bool finished = false;
  // Thrown by fail() to leave pump(); the error waits in `error` until what
  // was ready has been handed out.
  struct Stopped {};
  std::optional<Error> error;
  std::optional<Error> raised;  // the first failure under cancel_on_raise
  std::function<void()> on_wait;
  // Session index of position 0 (PROTOCOL.md §3.2.2).
  std::uint64_t base = 0;
  // Positions sent and answered: window + prefetch unanswered at most,
  // span tracked (set by start()).
  client::Window window{Order::kCompletion, 1, 1};
  std::uint64_t body_bytes = 0;  // bodies of the statements sent and unanswered
  std::uint64_t unacked_body_bytes = 0;  // answer bodies taken since the last ACK
  proto::Frames frames;
  std::chrono::steady_clock::time_point next_heartbeat;
  // The broker's messages, cancel() and, with a remote broker, the link's
  // events (built by start()).
  PollSet poll;
  static constexpr std::size_t kNoLinkEvents = ~std::size_t{0};
  std::size_t link_events = kNoLinkEvents;
  // Embedded mode: the cluster's loops, which this run leads while it
  // waits (its thread polls and steps them: no broker or worker thread is
  // woken between the I/O threads and this one); let go when the run ends.
  // Declared after `poll`, which it adds the cluster's items to.
  struct Lead {
    LoopDriver* driver = nullptr;
    ~Lead() { release(); }
    void release() {
      if (driver != nullptr) driver->unlead();
      driver = nullptr;
    }
  } lead;
  // One poll step: this run's own items and, embedded, the cluster's.
  bool wait_until(Clock::time_point deadline) {
    return lead.driver != nullptr ? lead.driver->turn(deadline) : poll.wait_until(deadline);
  }

  Run(Gatherer::Impl& impl, Order o) : m(impl), order(o) {}

  std::optional<Indexed> next();
  void top_up();
  void send_range(std::uint64_t from, std::size_t count);
  void reopen();
  void sync(const char* why);
  void on_synced(const proto::Synced& synced);
  bool lost_a_submit(std::uint64_t broker_next) const;
  const Statement& statement_at(std::uint64_t pos) const {
    return source ? held[pos % window.span()] : fixed[static_cast<std::size_t>(pos)];
  }
  void pump();
  void ack();
  void accept(proto::WireResult& result);
  void raise_if_failed() {
    if (!raised) return;
    m.log().info("gatherer: statement {} failed, cancelling session {} (cancel_on_raise)", raised->index(),
                 m.session_text);
    fail(raised->what(), raised->index(), raised->code());
  }
  [[noreturn]] void fail(const std::string& what, std::int64_t index, StatusCode code);
  void start(std::size_t span_positions);
};

void Stream::Run::start(std::size_t span_positions) {
  if (m.running) throw Error("a gather() or stream is already running on this Gatherer", -1,
                             StatusCode::kFailedPrecondition);
  m.running = true;
  m.progress.total.store(source ? 0 : fixed.size(), std::memory_order_relaxed);
  m.progress.done.store(0, std::memory_order_relaxed);
  m.progress.failed.store(0, std::memory_order_relaxed);
  m.progress.started_ns.store(Gatherer::Impl::NowNs(), std::memory_order_relaxed);
  m.progress.ended_ns.store(0, std::memory_order_relaxed);
  m.progress.running.store(true, std::memory_order_relaxed);
  window = client::Window(order, span_positions, static_cast<std::size_t>(m.options.workers) + m.prefetch);
  // Indices are session-wide, so late results of an earlier, cancelled run
  // fall below `base` and are dropped.
  base = m.next_index;
  next_heartbeat = Clock::now() + m.heartbeat;
  started = Clock::now();
  m.last_heard = Clock::now();  // idle time before this run does not count
  m.watch->reconnected();  // a reconnect between runs lost nothing of this one
  // A cancel() between runs is for no run: forget it, descriptor included,
  // or this run's every poll would return at once (a spinning loop).
  m.cancel_requested.store(false, std::memory_order_release);
  m.cancel_fd.drain();
  poll.add(*m.dealer);
  poll.add(m.cancel_fd);
  if (m.cluster) {
    // Its inproc connection never drops: no link events to watch.
    m.cluster->driver().lead(poll);
    lead.driver = &m.cluster->driver();
  } else {
    link_events = poll.add(m.watch->events());
  }
}

void Stream::Run::fail(const std::string& what, std::int64_t index, StatusCode code) {
  // Whatever is still queued or in flight is dropped everywhere, at once.
  if (window.unanswered_count() > 0) {
    try {
      m.cancel_on_broker();
    } catch (const Error&) {
    }
  }
  m.running = false;
  m.end_progress();
  lead.release();
  // next() hands out what was complete (and next in order) first, then
  // throws this: a stop loses no finished response.
  error.emplace(what, index, code);
  throw Stopped{};
}

// Sends as many statements as the window, the prefetch and the span allow.
void Stream::Run::top_up() {
  while (!source_done) {
    std::size_t k = std::min(window.room(), kSubmitChunk);
    if (k == 0) return;
    // Options::max_buffered_bytes: answered bodies waiting for an earlier
    // position, and in input order the bodies still in flight (which land
    // here when they arrive), hold back new statements. Never blocks: what is
    // held or in flight was sent, and at least one statement is in flight or
    // ready. In completion order nothing is held here (next() hands out every
    // ready response before it pumps), so gather() is never bounded by it.
    if (m.options.max_buffered_bytes != 0) {
      std::uint64_t bytes = window.held_bytes();
      if (order == Order::kInput) bytes += window.expected_unanswered_bytes();
      if (bytes >= m.options.max_buffered_bytes) return;
      // And only as many as the rest of the budget holds bodies of (one
      // more at most), not a whole window at once when all came back.
      if (const std::uint64_t mean = window.mean_body_bytes(); order == Order::kInput && mean != 0) {
        const std::uint64_t fit = (m.options.max_buffered_bytes - bytes + mean - 1) / mean;
        k = static_cast<std::size_t>(std::min<std::uint64_t>(k, fit));
      }
    }
    const std::uint64_t pulled = window.sent();
    // Options::max_in_flight_bytes: stop once the bodies in flight reach it
    // (at most one statement past it, and always one when none is in flight).
    const std::uint64_t budget = m.options.max_in_flight_bytes;
    auto over_budget = [&](std::size_t taken) {
      return budget != 0 && body_bytes >= budget && (pulled + taken > window.answered());
    };
    std::size_t got = 0;
    if (source) {
      if (held.empty()) held.resize(window.span());
      while (got < k && !over_budget(got)) {
        Statement& out = held[(pulled + got) % window.span()];
        if (!source(out)) {
          source_done = true;
          break;
        }
        if (Status st = ValidateStatement(out, m.settings); !st.ok()) {
          // The ones pulled in this round were not sent yet: only earlier
          // rounds need cancelling, which fail() does.
          const std::uint64_t index = pulled + got;
          fail("statement " + std::to_string(index) + " is invalid: " + st.message(),
               static_cast<std::int64_t>(index), st.code());
        }
        body_bytes += out.body.size();
        ++got;
      }
    } else {
      const std::size_t left = fixed.size() - static_cast<std::size_t>(pulled);
      const std::size_t most = std::min(k, left);
      while (got < most && !over_budget(got)) body_bytes += fixed[static_cast<std::size_t>(pulled + got++)].body.size();
      if (got == left) source_done = true;
    }
    if (got == 0) return;
    send_range(pulled, got);
    window.send(got);
    m.next_index = base + window.sent();
  }
}

// SUBMITs positions [from, from + count), straight from the caller's list or
// the held ring (in at most two pieces where the ring wraps).
void Stream::Run::send_range(std::uint64_t from, std::size_t count) {
  if (!source) {
    m.send(proto::EncodeSubmit(m.session, base + from, fixed.subspan(static_cast<std::size_t>(from), count)));
    return;
  }
  const std::size_t span = window.span();
  while (count > 0) {
    const std::size_t at = static_cast<std::size_t>(from % span);
    const std::size_t n = std::min(count, span - at);
    m.send(proto::EncodeSubmit(m.session, base + from, std::span<const Statement>(held.data() + at, n)));
    from += n;
    count -= n;
  }
}

// The broker does not know the session: it restarted, or expired the session
// of an idle client. Open it again under the same id and send every
// statement not yet answered; answers already received stay (PROTOCOL.md
// §3.2.8). Duplicates from the old broker's workers are dropped by index.
// A non-idempotent statement may have reached its server before the broker
// was lost: it fails as "outcome unknown" instead of being sent again
// (docs/architecture.md §1).
void Stream::Run::reopen() {
  m.log().warn("gatherer: broker lost session {}; re-opening it and resubmitting {} statements", m.session_text,
                window.unanswered_count());
  m.send(proto::Encode(proto::Open{m.session, m.settings, m.prefetch}));
  awaiting_opened = true;
  // Runs of consecutive idempotent positions, kSubmitChunk at most each.
  std::uint64_t start = 0;
  std::size_t run = 0;
  auto flush = [&] {
    if (run > 0) send_range(start, run);
    run = 0;
  };
  window.for_each_unanswered([&](std::uint64_t p) {
    if (!IsIdempotent(statement_at(p))) {
      flush();
      proto::WireResult unknown;
      unknown.index = base + p;
      unknown.response.error = ResponseError{
          StatusCode::kUnknown, "outcome unknown: the broker lost the session while this " + statement_at(p).method +
                                    " was submitted; not sent again (non-idempotent)"};
      accept(unknown);
      return;
    }
    if (run > 0 && (p != start + run || run == kSubmitChunk)) flush();
    if (run == 0) start = p;
    ++run;
  });
  flush();
  raise_if_failed();
}

void Stream::Run::accept(proto::WireResult& r) {
  if (r.index < base) return;  // an earlier run's
  const std::uint64_t pos = r.index - base;
  // Never sent, or answered already: exactly-once delivery (docs/architecture.md §1).
  if (!window.unanswered(pos)) return;
  const Response& got = r.response;
  m.progress.done.fetch_add(1, std::memory_order_relaxed);
  if (!got.ok()) m.progress.failed.fetch_add(1, std::memory_order_relaxed);
  if (!got.ok() && m.options.cancel_on_raise) {
    // The other messages waiting are taken first (raise_if_failed() stops
    // the run after them), so results that came with the failure are not lost.
    if (!raised) {
      raised.emplace("statement " + std::to_string(pos) + " failed: " + std::string(StatusCodeName(got.error->code)) +
                         ": " + got.error->message,
                     static_cast<std::int64_t>(pos), got.error->code);
    }
    window.drop(pos);
    return;
  }
  body_bytes -= std::min<std::uint64_t>(body_bytes, statement_at(pos).body.size());
  // An answered statement of a lazy source is never sent again: a big body
  // is freed now rather than when its slot is reused, so what is held stays
  // bounded by the window, not by the span (small ones keep their buffers
  // for the next statement).
  if (source) {
    std::string& body = held[pos % window.span()].body;
    if (body.capacity() > kKeepBodyBytes) std::string().swap(body);
  }
  window.answer(pos, std::move(r.response));
}

// A cumulative ACK of every RESULTS taken so far, if any is new (§3.6).
void Stream::Run::ack() {
  unacked_body_bytes = 0;
  if (m.results_seq <= m.acked_seq) return;
  m.send(proto::Encode(proto::Ack{m.session, m.results_seq}));
  m.acked_seq = m.results_seq;
}

// §3.6: asks the broker for what this run may have lost on a dropped
// connection: RESULTS past results_seq are sent again, and SYNCED names the
// unanswered statements it never received.
void Stream::Run::sync(const char* why) {
  if (awaiting_opened) return;  // re-opening resubmits everything anyway
  proto::Sync msg{m.session, m.results_seq, {}};
  std::uint64_t listed = 0;
  window.for_each_unanswered([&](std::uint64_t p) {
    proto::AppendIndex(msg.unanswered, base + p);
    ++listed;
  });
  m.log().info("gatherer: session {}: resynchronising with broker {} ({}; {} statements unanswered)", m.session_text,
                m.endpoint, why, listed);
  m.send(proto::Encode(msg));
  m.acked_seq = std::max(m.acked_seq, m.results_seq);
  sync_pending = true;
  sync_sent = Clock::now();
}

// The statements the broker never received are submitted again, POSTs
// included: they cannot have run (§3.6).
void Stream::Run::on_synced(const proto::Synced& synced) {
  sync_pending = false;
  // What the broker still kept came again before SYNCED; RESULTS up to its
  // seq that it no longer keeps were dropped there on purpose (a CANCEL), so
  // none is missing any more and the acknowledgements move on (§3.6.4).
  if (!awaiting_opened) m.results_seq = std::max(m.results_seq, synced.seq);
  std::uint64_t again = 0;
  for (const auto& r : synced.missing) {
    std::uint64_t start = 0;
    std::size_t run = 0;
    auto flush = [&] {
      if (run > 0) send_range(start, run);
      again += run;
      run = 0;
    };
    for (std::uint64_t i = r.first; i < r.first + r.count; ++i) {
      if (i < base) continue;
      const std::uint64_t p = i - base;
      if (!window.unanswered(p)) {
        flush();
        continue;
      }
      if (run == 0) start = p;
      if (p != start + run) {
        flush();
        start = p;
      }
      ++run;
    }
    flush();
  }
  if (again > 0) {
    m.log().info("gatherer: session {}: {} statements the broker never received submitted again", m.session_text,
                  again);
  }
}

// True when a statement submitted before the last HEARTBEAT is unanswered
// and the broker's answer shows it never arrived (its index is at or past
// one past the highest the broker received).
bool Stream::Run::lost_a_submit(std::uint64_t broker_next) const {
  if (beat_next <= base) return false;
  const auto p = window.highest_unanswered_below(beat_next - base);
  return p && base + *p >= broker_next;
}

// Sends what fits, waits for the broker (up to the next heartbeat), and
// takes in every message waiting.
void Stream::Run::pump() {
  top_up();
  bool ready = false;
  if (on_wait) {
    // Only when it would really block: the reader's chance to flush output
    // (with the cluster let go of, should the output block).
    ready = wait_until(Clock::time_point::min()) && poll.any_ready();
    if (!ready) on_wait();
  }
  if (!ready && !wait_until(next_heartbeat)) {
    fail("the client's ZeroMQ context was terminated", -1, StatusCode::kCancelled);
  }
  if (m.cancel_requested.exchange(false, std::memory_order_acq_rel)) {
    m.log().info("gatherer: session {} cancelled by the caller", m.session_text);
    fail("gather cancelled", -1, StatusCode::kCancelled);
  }
  // §3.6: a new connection: what was in flight on the old one may be lost.
  if (link_events != kNoLinkEvents && poll.ready(link_events) && m.watch->reconnected()) sync("reconnected");
  // A refused handshake is not a flaky link: waiting out the broker timeout
  // would only hide it (PROTOCOL.md §1.7).
  if (!m.watch->refused().empty()) {
    fail("cannot connect to broker " + m.endpoint + ": " + m.watch->refused(), -1, StatusCode::kPermissionDenied);
  }
  while (m.recv(frames)) {
    auto command = proto::PeekCommand(frames);
    if (!command) {
      m.bad("message", command.error());
      continue;
    }
    if (*command == proto::Command::kResults) {
      auto results = proto::DecodeResults(frames);
      if (!results) {
        m.bad("RESULTS", results.error());
        continue;
      }
      if (results->session != m.session) continue;
      // Taken first, so a SYNC it prompts does not list them (§3.6.5).
      for (auto& r : results->results) {
        unacked_body_bytes += r.response.body.size();
        accept(r);
      }
      if (!awaiting_opened) {
        if (results->seq == m.results_seq + 1) {
          m.results_seq = results->seq;
        } else if (results->seq > m.results_seq + 1 && !sync_pending) {
          sync("a RESULTS message was lost");
        }
      }
      if (unacked_body_bytes >= kAckAfterBodyBytes) ack();
    } else if (*command == proto::Command::kOpened) {
      auto opened = proto::DecodeOpened(frames);
      if (!opened) {
        m.bad("OPENED", opened.error());
        continue;
      }
      if (opened->session == m.session) {
        m.adopt(*opened);
        // The broker's period holds from now, not from the next beat of the
        // one used before OPENED.
        next_heartbeat = std::min(next_heartbeat, Clock::now() + m.heartbeat);
      }
      if (opened->session == m.session && awaiting_opened) {
        // A new session at the broker numbers its RESULTS from 1.
        awaiting_opened = false;
        m.results_seq = m.acked_seq = 0;
      }
    } else if (*command == proto::Command::kSynced) {
      auto synced = proto::DecodeSynced(frames);
      if (!synced) {
        m.bad("SYNCED", synced.error());
        continue;
      }
      if (synced->session == m.session) on_synced(*synced);
    } else if (*command == proto::Command::kHeartbeat) {
      auto beat = proto::DecodeBrokerHeartbeat(frames);
      if (!beat) {
        m.bad("HEARTBEAT", beat.error());
        continue;
      }
      // §3.6: everything the broker sent before this answer has arrived, and
      // everything this client sent before its HEARTBEAT has been read.
      if (beat->session == m.session && !sync_pending && !awaiting_opened) {
        if (beat->seq > m.results_seq) sync("the broker's heartbeat names RESULTS that never arrived");
        else if (lost_a_submit(beat->next_index)) sync("the broker's heartbeat shows a SUBMIT that never arrived");
      }
      if (beat->session == m.session && beat->workers == 0 && window.unanswered_count() > 0 && !said_no_workers &&
          Clock::now() - started > kSayWaiting) {
        said_no_workers = true;
        m.log().warn("gatherer: broker {} has no worker connected; waiting for one ({} statements submitted)",
                      m.endpoint, window.unanswered_count());
      }
    } else if (*command == proto::Command::kError) {
      auto e = proto::DecodeError(frames);
      if (!e) {
        m.bad("ERROR", e.error());
        continue;
      }
      if (e->session && *e->session != m.session) continue;
      if (e->code == StatusCode::kNotFound && e->session) {
        // Errors about messages sent before the re-open are stale.
        if (!awaiting_opened) reopen();
        continue;
      }
      fail("broker refused: " + std::string(StatusCodeName(e->code)) + ": " + e->message, -1, e->code);
    }
    // CLOSED only proves the broker is alive.
  }
  // Every message waiting was taken first: what came with a failure under
  // cancel_on_raise is handed out before the error.
  raise_if_failed();
  // One cumulative ACK per pass, so the broker forgets what arrived (§3.6).
  ack();
  const auto now = Clock::now();
  if (now >= next_heartbeat) {
    next_heartbeat = now + m.heartbeat;
    if (now - m.last_heard > m.options.broker_timeout) {
      const auto silent = std::chrono::duration_cast<std::chrono::milliseconds>(now - m.last_heard);
      fail("broker " + m.endpoint + " unreachable for " + std::to_string(silent.count() / 1000) + " s (timeout " +
               std::to_string(m.options.broker_timeout.count() / 1000) + " s); " + std::to_string(window.unanswered_count()) +
               " statements submitted and unanswered, " + std::to_string(window.answered()) + " answered" +
               (m.options.curve_broker_key.empty()
                    ? std::string()
                    : "; with CURVE, a wrong broker public key looks just like this: check it"),
           -1, StatusCode::kUnavailable);
    }
    if (!said_unreachable && now - m.last_heard > std::min<std::chrono::milliseconds>(
                                                      kSayWaiting, m.options.broker_timeout / 2)) {
      said_unreachable = true;
      m.log().warn("gatherer: broker {} not reachable yet; waiting up to {} s", m.endpoint,
                    m.options.broker_timeout.count() / 1000);
    }
    // A SYNC whose answer was lost with a connection is asked again.
    if (sync_pending && now - sync_sent > 2 * m.heartbeat) {
      sync_pending = false;
      sync("no answer to the last SYNC");
    }
    beat_next = base + window.sent();
    m.send(proto::Encode(proto::ClientBeat{m.session}));
  }
}

std::optional<Indexed> Stream::Run::next() {
  while (!finished) {
    if (auto out = window.next()) return out;
    if (error) {
      finished = true;
      Error e = std::move(*error);
      error.reset();
      throw e;
    }
    if (source_done && window.unanswered_count() == 0) {
      finished = true;
      m.running = false;
      m.end_progress();
      lead.release();
      break;
    }
    try {
      pump();
    } catch (const Stopped&) {
      // fail() recorded the error; the loop hands out what is ready first.
    }
  }
  return std::nullopt;
}

Stream::Stream(std::unique_ptr<Run> run) : run_(std::move(run)) {}
Stream::Stream(Stream&&) noexcept = default;
Stream& Stream::operator=(Stream&&) noexcept = default;

Stream::~Stream() {
  if (!run_ || run_->finished || run_->error) return;
  // Abandoned: the rest is cancelled so nothing keeps running for nobody.
  run_->m.running = false;
  run_->m.end_progress();
  if (run_->window.unanswered_count() > 0) {
    try {
      run_->m.cancel_on_broker();
    } catch (const Error&) {
    }
  }
}

std::optional<Indexed> Stream::next() { return run_ ? run_->next() : std::nullopt; }

void Stream::on_wait(std::function<void()> callback) {
  if (run_) run_->on_wait = std::move(callback);
}

namespace {
void ValidateAll(const std::vector<Statement>& list, const SessionSettings& settings) {
  // Every statement is checked before anything is sent.
  for (std::size_t i = 0; i < list.size(); ++i) {
    if (Status s = ValidateStatement(list[i], settings); !s.ok()) {
      throw Error("statement " + std::to_string(i) + " is invalid: " + s.message(), static_cast<std::int64_t>(i),
                  s.code());
    }
  }
}

std::size_t ReorderSpan(const Options& o) {
  if (o.reorder_buffer > 0) return static_cast<std::size_t>(o.reorder_buffer);
  return 4 * static_cast<std::size_t>(o.workers + (o.prefetch ? o.prefetch : o.workers));
}
}  // namespace

Stream Gatherer::stream(StatementSource source, Order order) {
  auto run = std::make_unique<Stream::Run>(*impl_, order);
  run->source = std::move(source);
  run->start(ReorderSpan(impl_->options));
  return Stream(std::move(run));
}

Stream Gatherer::stream(const std::vector<Statement>& list, Order order) {
  ValidateAll(list, impl_->settings);
  auto run = std::make_unique<Stream::Run>(*impl_, order);
  run->fixed = list;
  run->source_done = list.empty();
  run->start(ReorderSpan(impl_->options));
  return Stream(std::move(run));
}

const std::vector<Response>& Gatherer::gather() {
  ValidateAll(statements, impl_->settings);
  responses.clear();
  responses.resize(statements.size());
  // Completion order over a span of all n positions: every response lands at
  // its index at once, and one slow statement holds back nothing (the
  // sliding window), since the caller keeps all n responses anyway.
  Stream::Run run(*impl_, Order::kCompletion);
  run.fixed = statements;
  run.source_done = statements.empty();
  run.start(statements.size());
  try {
    while (auto item = run.next()) responses[item->index] = std::move(item->response);
  } catch (...) {
    impl_->running = false;
    impl_->end_progress();
    throw;
  }
  return responses;
}

}  // namespace gatherer
