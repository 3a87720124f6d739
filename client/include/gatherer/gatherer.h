#pragma once
// gatherer::Gatherer: hand over statements (HTTP requests), get one response
// per statement back in the statements' order.
//
//   gatherer::Gatherer g;                       // embedded broker + worker
//   g.statements = {gatherer::Get("https://api.example/a"), ...};
//   const std::vector<gatherer::Response>& r = g.gather();  // also in g.responses
//
// Thread-safety: a Gatherer is used by one thread at a time (like a
// std::vector), except cancel(), which any thread may call at any moment.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "gatherer/config.h"
#include "gatherer/statement.h"

namespace gatherer {

struct Options {
  // Broker endpoint ("tcp://10.0.0.5:5555"). Empty = embedded: a broker and a
  // worker start inside this process over inproc://, the same code paths.
  std::string broker;
  // Maximum statements in flight for this session across the whole cluster:
  // a sliding window, a new statement starts the moment one finishes.
  int workers = 25;
  // Python logging levels as in Pyot: 10 debug, 20 info, 30 warning,
  // 40 error, 50 critical. Applies to Gatherer's own log lines.
  int log_level = 10;
  // false: a failed statement's error sits at its index, the others complete.
  // true: the first failure cancels every queued and in-flight statement of
  // the session and gather() throws gatherer::Error naming the index.
  bool cancel_on_raise = false;
  // Fetch settings of the session (base URL, default headers, timeouts,
  // retries, body cap, accepted statuses). The window is `workers` above:
  // settings.workers is filled in from it, and a different value set here
  // is refused (Error invalid_argument).
  SessionSettings settings;
  // Statements queued at the broker beyond the window, so no worker waits on
  // a round trip to the client. 0 = same as `workers` (Pyot's Queue used
  // maxsize = 2 x workers). At most 100000.
  int prefetch = 0;
  // Responses a stream may hold while it waits for an earlier one (the
  // reorder buffer), and so the span of statements in flight past the oldest
  // unfinished one. Bounds a stream's memory whatever the number of
  // statements. 0 = 4 x (workers + prefetch). gather() is not bounded by it.
  int reorder_buffer = 0;
  // Response body bytes a stream holds, at most, answered but not yet handed
  // out (waiting for an earlier one in input order, or for the reader), and
  // in input order also those expected of the statements in flight (their
  // count x the mean body so far): past it no new statement is sent until
  // the reader catches up, so big bodies cost about this much and not body
  // size x (reorder_buffer + workers + prefetch). 0 = no limit. gather()
  // keeps every response anyway and is not bounded by it.
  std::uint64_t max_buffered_bytes = 64ull << 20;
  // Statement body bytes submitted and not yet answered, at most (one
  // statement is always let through, whatever its size). A body in flight is
  // held by the client, the broker and a worker, each in its own copy, so
  // this bounds what big POST bodies cost on every hop; the window still
  // bounds the count. 0 = no limit.
  std::uint64_t max_in_flight_bytes = 8ull << 20;
  // TLS files, read once when the Gatherer is made (a missing or unreadable
  // file, or one without the PEM it should hold, is an Error
  // invalid_argument naming it, before anything is sent); their PEM text goes
  // to every worker in the session settings (settings.tls_ca_pem, ...).
  // cacert: trusted CA certificates, a PEM file or a directory of them (each
  // file that holds a certificate), replacing the system's store. cert and
  // key: a client certificate and its private key, both or neither. For
  // skipping verification, proxies: settings.tls_insecure, settings.proxy.
  std::string cacert;
  std::string cert;
  std::string key;
  // Embedded mode only: I/O threads of the in-process worker (0 = one per core).
  unsigned embedded_io_threads = 0;
  // How long the destructor waits (at most 5 s) for the broker to confirm
  // that the session is closed.
  std::chrono::milliseconds connect_timeout{30'000};
  // A gather() or stream that hears nothing from the broker for this long
  // ends with an Error (code unavailable) naming the broker and how many
  // statements were left unanswered; responses already handed over stay.
  // Until then the client keeps waiting through dropped connections (ZeroMQ
  // reconnects, and the session resynchronises), and the broker may start
  // after the client. At least 150 ms; the client heartbeats (and a live
  // broker answers) at least three times within it, however long the
  // broker's own heartbeat period.
  std::chrono::milliseconds broker_timeout{60'000};
  // CURVE (PROTOCOL.md §1.7), for a broker that requires it: the broker's
  // public key and this client's key pair, each 40 Z85 characters (made by
  // `gatherer keygen`). All empty = plaintext. Not used in embedded mode
  // (inproc:// never leaves the process).
  std::string curve_broker_key;
  std::string curve_public_key;
  std::string curve_secret_key;
};

// Thrown by the public API only: invalid statements (before anything is
// sent), a failure under cancel_on_raise, a broker that never answered.
class Error : public std::runtime_error {
 public:
  // index = statement index the error is about, or -1.
  Error(const std::string& what, std::int64_t index, StatusCode code)
      : std::runtime_error(what), index_(index), code_(code) {}
  std::int64_t index() const { return index_; }
  StatusCode code() const { return code_; }

 private:
  std::int64_t index_;
  StatusCode code_;
};

// A lazy source of statements: fills `out` with the next one and returns
// true, or returns false at the end. Called on the thread that reads the
// stream, only when the window has room, so a million statements never sit in
// memory at once. `out` may hold the previous statement: assign every field
// you use (reusing it saves allocations).
using StatementSource = std::function<bool(Statement& out)>;

enum class Order {
  kInput,       // in the statements' order, each as soon as all earlier ones are done
  kCompletion,  // as they finish
};

// One response and the index of its statement.
struct Indexed {
  std::uint64_t index = 0;
  Response response;
};

class Gatherer;

// How far the current (or last) gather() or stream has got: a snapshot from
// Gatherer::progress(), cheap enough to take often and to leave on (the run
// keeps it with a few relaxed atomic increments per response).
struct Progress {
  std::uint64_t total = 0;   // statements of the run; 0 = not known (a lazy source)
  std::uint64_t done = 0;    // answered, failures included
  std::uint64_t failed = 0;  // answered with an error
  double elapsed_s = 0;      // since the run started (until it ended)
  double rate = 0;           // answered per second over elapsed_s
  // Seconds left at `rate` when total is known and rate > 0; negative otherwise.
  double eta_s = -1;
  bool running = false;
};

// A running stream of responses (see Gatherer::stream). Pull with next() or
// a range-for. Memory is bounded by the window and the reorder buffer; a slow
// reader slows the fetching instead of growing memory.
//
// Thread-safety: read by one thread. Must not outlive its Gatherer.
// Destroying an unfinished stream cancels its remaining statements.
class Stream {
 public:
  Stream(Stream&&) noexcept;
  Stream& operator=(Stream&&) noexcept;
  ~Stream();

  // The next response, or nullopt after the last one. Throws Error as
  // gather() does: an invalid statement from the source (naming its index;
  // statements before it may have been fetched), a failure under
  // cancel_on_raise, cancel(), a broker that stopped answering. Before it
  // throws, it hands out every response that was complete (in input order:
  // and next in order) when the run stopped, so a stop loses none of them.
  std::optional<Indexed> next();

  // Called on the reading thread each time next() is about to block waiting
  // for the broker — nothing ready to hand out, no message waiting — e.g. to
  // flush output written so far, so that a slow stream's lines are seen as
  // they come while a fast one is still written in big chunks.
  void on_wait(std::function<void()> callback);

  class iterator {
   public:
    using iterator_category = std::input_iterator_tag;
    using value_type = Indexed;
    using difference_type = std::ptrdiff_t;
    Indexed& operator*() { return *current_; }
    Indexed* operator->() { return &*current_; }
    iterator& operator++() {
      current_ = stream_->next();
      return *this;
    }
    void operator++(int) { ++*this; }
    bool operator==(std::default_sentinel_t) const { return !current_.has_value(); }

   private:
    friend class Stream;
    explicit iterator(Stream* s) : stream_(s), current_(s->next()) {}
    Stream* stream_;
    std::optional<Indexed> current_;
  };
  iterator begin() { return iterator(this); }
  std::default_sentinel_t end() { return {}; }

  struct Run;

 private:
  friend class Gatherer;
  explicit Stream(std::unique_ptr<Run> run);
  std::unique_ptr<Run> run_;
};

class Gatherer {
 public:
  // Opens a session (uuid4) on the broker. Throws Error if the options are
  // invalid. Connecting is asynchronous; the broker may appear later.
  explicit Gatherer(Options options = {});
  // Closes the session on the broker and on every worker holding it (also
  // when unwinding from an exception), then stops an embedded cluster.
  ~Gatherer();
  Gatherer(const Gatherer&) = delete;
  Gatherer& operator=(const Gatherer&) = delete;

  // The statements of the next gather(); kept after it (as in Pyot).
  std::vector<Statement> statements;
  // One response per statement, in the statements' order, after gather().
  std::vector<Response> responses;

  // Validates every statement (throws Error naming the first bad index before
  // anything is sent), fetches them all and returns `responses`. May be
  // called again with new statements. When it throws after fetching began
  // (cancel_on_raise, cancel(), an unreachable broker), `responses` holds
  // every response that had completed, and default ones elsewhere.
  const std::vector<Response>& gather();

  // Streams the responses of statements pulled lazily from `source`, in
  // `order`. Statements are validated as they are pulled. One stream or
  // gather() at a time per Gatherer (Error failed_precondition otherwise).
  Stream stream(StatementSource source, Order order = Order::kInput);
  // Streams the responses of `list`, validated up front like gather(). The
  // list must outlive the stream; it is read, never copied.
  Stream stream(const std::vector<Statement>& list, Order order = Order::kInput);

  // Cancels the running gather() or stream from any thread: queued and in-flight
  // statements are dropped everywhere; gather() throws Error (code cancelled).
  void cancel();

  // The session id, uuid4 text.
  const std::string& session_id() const;

  // The run's progress; callable from any thread (e.g. a progress bar's).
  Progress progress() const;

  // Messages from the broker dropped as malformed (PROTOCOL.md §2.4); they
  // are also logged, at most one line per second.
  std::uint64_t malformed_messages() const;

 private:
  friend struct Stream::Run;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Checks one statement against the session settings without sending it:
// method token, absolute http(s) URL or a path with a base_url, header names
// and values free of CR/LF, body within kMaxStatementBody. Shared by
// gather() and the CLI.
Status ValidateStatement(const Statement& statement, const SessionSettings& settings);

}  // namespace gatherer
