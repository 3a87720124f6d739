// gatherer-ctl: asks a running gatherer-broker what it is doing and tells it
// what to do (PROTOCOL.md §3.9): status, workers, sessions, cancel SESSION,
// drain WORKER, shutdown, and top (a live view). Aligned tables by default,
// --json for scripts. Exit status 0 on success; 1 when the broker refuses or
// does not answer within --timeout; 2 on bad usage.
#include <poll.h>
#include <termios.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "ctl.h"
#include "gatherer/ids.h"

namespace {

namespace proto = gatherer::protocol;
using gatherer::ctl::Answer;

std::atomic<bool> interrupted{false};
void OnInterrupt(int) { interrupted.store(true); }

// One line of JSON. Names a client chose (a rate rule's, in a key) may hold
// invalid UTF-8: it is replaced (U+FFFD) rather than ending the process.
std::string Dump(const nlohmann::json& j) {
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
}

int Fail(const gatherer::Status& s) {
  std::fprintf(stderr, "gatherer-ctl: %s\n", s.ToString().c_str());
  return 1;
}

// Puts the terminal in non-canonical, no-echo mode for `top` (Ctrl-C still
// raises SIGINT) and restores it on destruction.
class RawTerminal {
 public:
  RawTerminal() {
    if (!isatty(STDIN_FILENO) || tcgetattr(STDIN_FILENO, &saved_) != 0) return;
    termios raw = saved_;
    raw.c_lflag &= static_cast<tcflag_t>(~(ICANON | ECHO));
    raw.c_cc[VMIN] = 0;
    raw.c_cc[VTIME] = 0;
    active_ = tcsetattr(STDIN_FILENO, TCSANOW, &raw) == 0;
  }
  ~RawTerminal() {
    if (active_) tcsetattr(STDIN_FILENO, TCSANOW, &saved_);
  }

 private:
  termios saved_{};
  bool active_ = false;
};

int Top(gatherer::ctl::Control& control, const std::string& broker, std::chrono::milliseconds interval) {
  struct sigaction sa {};
  sa.sa_handler = OnInterrupt;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  RawTerminal raw;
  const bool tty = isatty(STDOUT_FILENO);
  bool input_open = true;
  while (!interrupted.load()) {
    auto status = control.ask(proto::EncodeEmpty(proto::Command::kStatus));
    auto workers = status ? control.ask(proto::EncodeEmpty(proto::Command::kListWorkers)) : status;
    auto sessions = workers ? control.ask(proto::EncodeEmpty(proto::Command::kListSessions)) : workers;
    std::string screen = tty ? "\x1b[H\x1b[2J" : "";
    screen += fmt::format("gatherer-ctl top — {} — every {} ms — q or Ctrl-C quits\n\n", broker, interval.count());
    if (!sessions) {
      screen += "broker not answering: " + sessions.error().ToString() + "\n";
    } else {
      const auto& s = std::get<proto::StatusReport>(*status);
      screen += fmt::format(
          "up {}  sessions {}  workers {}  queued {}  in flight {}  done {}  failed {}  retried {}  "
          "re-dispatched {}  rate {}/s (10s) {}/s (1m)\n\nWORKERS\n",
          gatherer::ctl::Age(s.uptime_ms), s.sessions, s.workers, s.queued, s.in_flight, s.done, s.failed, s.retried,
          s.redispatched, gatherer::ctl::Rate(s.rate_10s_milli), gatherer::ctl::Rate(s.rate_1m_milli));
      screen += gatherer::ctl::WorkersTable(std::get<std::vector<proto::WorkerRow>>(*workers));
      screen += "\nSESSIONS\n";
      screen += gatherer::ctl::SessionsTable(std::get<std::vector<proto::SessionRow>>(*sessions));
      if (!s.rate_keys.empty()) {
        screen += '\n';
        screen += gatherer::ctl::RateKeysHeading("RATE LIMITS", s.rate_keys);
        screen += gatherer::ctl::RateKeysTable(s.rate_keys);
      }
    }
    std::fputs(screen.c_str(), stdout);
    std::fflush(stdout);
    // Wait for the next refresh, a key, or a signal.
    const auto until = std::chrono::steady_clock::now() + interval;
    while (!interrupted.load()) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
      if (left <= 0) break;
      pollfd p{STDIN_FILENO, POLLIN, 0};
      const int n = poll(&p, input_open ? 1 : 0, static_cast<int>(std::min<long>(left, 100)));
      if (n > 0 && (p.revents & (POLLIN | POLLHUP))) {
        char c = 0;
        const ssize_t got = read(STDIN_FILENO, &c, 1);
        if (got == 1 && (c == 'q' || c == 'Q' || c == 3)) return 0;
        if (got == 0) input_open = false;  // stdin closed: only a signal quits now
      }
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string broker = "tcp://127.0.0.1:5555";
  int timeout_ms = 3000;
  bool json = false;
  CLI::App app{"gatherer-ctl: inspect and steer a running gatherer-broker"};
  app.add_option("--broker", broker, "Broker endpoint (default tcp://127.0.0.1:5555)")->envname("GATHERER_BROKER");
  std::string curve_broker_key, curve_key;
  app.add_option("--curve-broker-key", curve_broker_key,
                 "CURVE: the broker's public key (40 Z85 characters or a .pub file); needs --curve-key")
      ->envname("GATHERER_CURVE_BROKER_KEY");
  app.add_option("--curve-key", curve_key,
                 "CURVE: this operator's key pair file; the broker must list its public key in --curve-operators")
      ->envname("GATHERER_CURVE_KEY");
  app.add_option("--timeout", timeout_ms, "Milliseconds to wait for the broker's answer (default 3000)")
      ->check(CLI::Range(1, 3'600'000));
  app.add_flag("--json", json, "JSON output for scripts");
  app.require_subcommand(1);
  auto* status = app.add_subcommand(
      "status", "Version, uptime, sessions, workers, statement counts and rates, and the busiest rate-limit keys");
  auto* workers = app.add_subcommand("workers", "Each worker: id, host, pid, slots, in flight, done, state");
  auto* sessions = app.add_subcommand("sessions", "Each session: id, client, window, queued, in flight, rate");
  std::string session_text;
  auto* cancel = app.add_subcommand("cancel", "Cancel a session (its client's run ends with an error)");
  cancel->add_option("SESSION", session_text, "Session id")->required();
  std::string worker_id;
  auto* drain = app.add_subcommand("drain", "Drain a worker: it finishes what it holds, takes nothing new, exits");
  drain->add_option("WORKER", worker_id, "Worker id")->required();
  auto* shutdown = app.add_subcommand("shutdown", "Drain the broker as on SIGTERM");
  int interval_ms = 1000;
  auto* top = app.add_subcommand("top", "Live view of workers and sessions; q or Ctrl-C quits");
  top->add_option("--interval", interval_ms, "Refresh period in ms (default 1000)")->check(CLI::Range(50, 60'000));
  CLI11_PARSE(app, argc, argv);

  auto curve = gatherer::ReadCurveClientKeys(curve_broker_key, curve_key);
  if (!curve) {
    std::fprintf(stderr, "gatherer-ctl: %s\n", curve.error().message().c_str());
    return 2;
  }
  gatherer::ctl::Control control(broker, std::chrono::milliseconds(timeout_ms), curve->broker_public_key, curve->own);
  if (top->parsed()) return Top(control, broker, std::chrono::milliseconds(interval_ms));

  proto::Frames request;
  if (status->parsed()) request = proto::EncodeEmpty(proto::Command::kStatus);
  if (workers->parsed()) request = proto::EncodeEmpty(proto::Command::kListWorkers);
  if (sessions->parsed()) request = proto::EncodeEmpty(proto::Command::kListSessions);
  if (shutdown->parsed()) request = proto::EncodeEmpty(proto::Command::kShutdown);
  if (drain->parsed()) request = proto::Encode(proto::WorkerName{worker_id});
  if (cancel->parsed()) {
    auto id = gatherer::ParseSessionId(session_text);
    if (!id) {
      std::fprintf(stderr, "gatherer-ctl: cancel: %s\n", id.error().message().c_str());
      return 2;
    }
    request = proto::Encode(proto::Command::kCancelSession, proto::SessionRef{*id});
  }
  auto answer = control.ask(std::move(request));
  if (!answer) return Fail(answer.error());
  std::string out;
  if (auto* r = std::get_if<proto::StatusReport>(&*answer)) {
    out = json ? Dump(gatherer::ctl::ToJson(*r)) : gatherer::ctl::StatusTable(*r, broker);
  } else if (auto* w = std::get_if<std::vector<proto::WorkerRow>>(&*answer)) {
    out = json ? Dump(gatherer::ctl::ToJson(*w)) : gatherer::ctl::WorkersTable(*w);
  } else if (auto* s = std::get_if<std::vector<proto::SessionRow>>(&*answer)) {
    out = json ? Dump(gatherer::ctl::ToJson(*s)) : gatherer::ctl::SessionsTable(*s);
  } else {
    const auto& done = std::get<proto::Done>(*answer);
    out = json ? Dump({{"ok", true}, {"message", done.message}}) : done.message + "\n";
  }
  std::fputs(out.c_str(), stdout);
  return 0;
}
