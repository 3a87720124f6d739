#include "ctl.h"

#include <algorithm>

#include <fmt/format.h>

#include "gatherer/ids.h"
#include "gatherer/transport.h"

namespace gatherer::ctl {

namespace proto = protocol;

Control::Control(std::string broker, std::chrono::milliseconds timeout, std::string curve_broker_key,
                 CurveKeyPair curve_key)
    : broker_(std::move(broker)),
      timeout_(timeout),
      curve_broker_key_(std::move(curve_broker_key)),
      curve_key_(std::move(curve_key)),
      context_(1) {}

Control::~Control() { socket_.reset(); }

// A fresh DEALER under an operator's routing id (§3.9: 'o' + 16 random
// bytes), never waiting at close for what it could not send.
void Control::reconnect() {
  socket_ = std::make_unique<zmq::socket_t>(context_, zmq::socket_type::dealer);
  socket_->set(zmq::sockopt::linger, 0);
  socket_->set(zmq::sockopt::maxmsgsize, proto::kMaxMessageBytes);
  socket_->set(zmq::sockopt::routing_id, "o" + std::string(NewSessionId().raw()));
  if (!curve_broker_key_.empty()) MakeCurveClient(*socket_, curve_key_, curve_broker_key_);
  socket_->connect(broker_);
}

Result<Answer> Control::ask(proto::Frames&& request) {
  try {
    if (!socket_) reconnect();
  } catch (const zmq::error_t& e) {
    return Unexpected(InvalidArgument("cannot connect to " + broker_ + ": " + e.what()));
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout_;
  const auto left = [&] {
    return std::max(std::chrono::milliseconds(0), std::chrono::duration_cast<std::chrono::milliseconds>(
                                                      deadline - std::chrono::steady_clock::now()));
  };
  const auto silent = [&] {
    // An answer that comes later must not be taken for the next request's.
    socket_.reset();
    return Unexpected(DeadlineExceeded(fmt::format("broker {} did not answer within {} ms", broker_, timeout_.count())));
  };
  zmq::pollitem_t out[] = {{socket_->handle(), 0, ZMQ_POLLOUT, 0}};
  if (zmq::poll(out, 1, left()) == 0) return silent();
  if (proto::SendMessage(*socket_, {}, request) != proto::SendResult::kSent) return silent();
  proto::Frames frames;
  while (true) {
    zmq::pollitem_t in[] = {{socket_->handle(), 0, ZMQ_POLLIN, 0}};
    if (zmq::poll(in, 1, left()) == 0) return silent();
    if (!proto::ReceiveMessage(*socket_, frames)) continue;
    auto command = proto::PeekCommand(frames);
    if (!command) return Unexpected(InvalidArgument("bad answer from " + broker_ + ": " + command.error().message()));
    switch (*command) {
      case proto::Command::kStatusReport: {
        auto r = proto::DecodeStatusReport(frames);
        if (!r) return Unexpected(r.error());
        return Answer{std::move(*r)};
      }
      case proto::Command::kWorkersReport: {
        auto r = proto::DecodeWorkersReport(frames);
        if (!r) return Unexpected(r.error());
        return Answer{std::move(*r)};
      }
      case proto::Command::kSessionsReport: {
        auto r = proto::DecodeSessionsReport(frames);
        if (!r) return Unexpected(r.error());
        return Answer{std::move(*r)};
      }
      case proto::Command::kDone: {
        auto r = proto::DecodeDone(frames);
        if (!r) return Unexpected(r.error());
        return Answer{std::move(*r)};
      }
      case proto::Command::kError: {
        auto e = proto::DecodeError(frames);
        if (!e) return Unexpected(e.error());
        return Unexpected(Status(e->code, e->message));
      }
      default:
        continue;  // a broker heartbeat or other stray message: not an answer
    }
  }
}

std::string Rate(std::uint64_t milli) { return fmt::format("{:.1f}", static_cast<double>(milli) / 1000.0); }

std::string Age(std::uint64_t ms) {
  if (ms < 1000) return fmt::format("{}ms", ms);
  if (ms < 60'000) return fmt::format("{:.1f}s", static_cast<double>(ms) / 1000.0);
  const std::uint64_t s = ms / 1000;
  if (s < 3600) return fmt::format("{}m{:02}s", s / 60, s % 60);
  return fmt::format("{}h{:02}m", s / 3600, (s % 3600) / 60);
}

std::string Table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> width(header.size());
  std::vector<bool> numeric(header.size(), true);
  for (std::size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& row : rows) {
    for (std::size_t c = 0; c < row.size() && c < width.size(); ++c) {
      width[c] = std::max(width[c], row[c].size());
      // Numbers (one '.' at most) are right-aligned; addresses and names are not.
      const std::string& v = row[c];
      if (v.empty() || v.find_first_not_of("0123456789.") != std::string::npos ||
          std::count(v.begin(), v.end(), '.') > 1) {
        numeric[c] = false;
      }
    }
  }
  std::string out;
  const auto line = [&](const std::vector<std::string>& cells) {
    std::string l;
    for (std::size_t c = 0; c < width.size(); ++c) {
      const std::string& cell = c < cells.size() ? cells[c] : std::string();
      const std::string pad(width[c] - std::min(width[c], cell.size()), ' ');
      l += numeric[c] && !rows.empty() ? pad + cell : cell + pad;
      if (c + 1 < width.size()) l += "  ";
    }
    while (!l.empty() && l.back() == ' ') l.pop_back();
    out += l + "\n";
  };
  line(header);
  for (const auto& row : rows) line(row);
  return out;
}

std::string StatusTable(const proto::StatusReport& r, const std::string& broker) {
  const auto n = [](std::uint64_t v) { return std::to_string(v); };
  std::vector<std::vector<std::string>> rows = {
      {"broker", broker},
      {"version", r.version},
      {"uptime", Age(r.uptime_ms)},
      {"sessions", n(r.sessions)},
      {"workers", n(r.workers)},
      {"queued", n(r.queued)},
      {"in flight", n(r.in_flight)},
      {"done", n(r.done)},
      {"failed", n(r.failed)},
      {"retried", n(r.retried)},
      {"re-dispatched", n(r.redispatched)},
      {"rate 10s", Rate(r.rate_10s_milli) + "/s"},
      {"rate 1m", Rate(r.rate_1m_milli) + "/s"},
  };
  std::string out;
  for (const auto& row : rows) out += fmt::format("{:<14}{}\n", row[0], row[1]);
  if (!r.rate_keys.empty()) {
    out += '\n';
    out += RateKeysHeading("rate limits", r.rate_keys);
    out += RateKeysTable(r.rate_keys);
  }
  return out;
}

std::string RateKeysHeading(const std::string& title, const std::vector<proto::RateKeyRow>& rows) {
  // The broker lists its busiest keys only (§3.9.7): say so when the list is full.
  if (rows.size() < proto::kMaxStatusRateKeys) return fmt::format("{}\n", title);
  return fmt::format("{} (the {} busiest keys)\n", title, proto::kMaxStatusRateKeys);
}

std::string RateKeysTable(const std::vector<proto::RateKeyRow>& rows) {
  std::vector<std::vector<std::string>> cells;
  for (const auto& k : rows) {
    // A key holds a name a client chose (a rule's): no control character of
    // it reaches the operator's terminal.
    std::string key = k.key;
    for (char& c : key) {
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
    }
    cells.push_back({std::move(key), k.windows.empty() ? "-" : FormatRateWindows(k.windows), std::to_string(k.used),
                     std::to_string(k.throttled), k.paused_ms == 0 ? "-" : Age(k.paused_ms)});
  }
  return Table({"KEY", "WINDOWS", "USED", "THROTTLED", "PAUSED"}, cells);
}

std::string WorkersTable(const std::vector<proto::WorkerRow>& rows) {
  std::vector<std::vector<std::string>> cells;
  for (const auto& w : rows) {
    cells.push_back({w.worker_id, w.host, std::to_string(w.pid), std::to_string(w.slots), std::to_string(w.in_flight),
                     std::to_string(w.done), std::to_string(w.failed), Age(w.heartbeat_age_ms), w.state});
  }
  return Table({"ID", "HOST", "PID", "SLOTS", "IN FLIGHT", "DONE", "FAILED", "HEARTBEAT", "STATE"}, cells);
}

std::string SessionsTable(const std::vector<proto::SessionRow>& rows) {
  std::vector<std::vector<std::string>> cells;
  for (const auto& s : rows) {
    cells.push_back({s.session.ToString(), s.client_host, std::to_string(s.window), std::to_string(s.queued),
                     std::to_string(s.in_flight), std::to_string(s.done), std::to_string(s.failed), Age(s.age_ms),
                     Rate(s.rate_milli)});
  }
  return Table({"SESSION", "CLIENT", "WINDOW", "QUEUED", "IN FLIGHT", "DONE", "FAILED", "AGE", "RATE/S"}, cells);
}

nlohmann::json ToJson(const proto::StatusReport& r) {
  return {{"version", r.version},
          {"uptime_ms", r.uptime_ms},
          {"sessions", r.sessions},
          {"workers", r.workers},
          {"queued", r.queued},
          {"in_flight", r.in_flight},
          {"done", r.done},
          {"failed", r.failed},
          {"retried", r.retried},
          {"redispatched", r.redispatched},
          {"rate_10s", static_cast<double>(r.rate_10s_milli) / 1000.0},
          {"rate_1m", static_cast<double>(r.rate_1m_milli) / 1000.0},
          {"rate_keys", ToJson(r.rate_keys)}};
}

nlohmann::json ToJson(const std::vector<proto::RateKeyRow>& rows) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& k : rows) {
    a.push_back({{"key", k.key},
                 {"windows", FormatRateWindows(k.windows)},
                 {"used", k.used},
                 {"throttled", k.throttled},
                 {"paused_ms", k.paused_ms}});
  }
  return a;
}

nlohmann::json ToJson(const std::vector<proto::WorkerRow>& rows) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& w : rows) {
    a.push_back({{"id", w.worker_id},
                 {"host", w.host},
                 {"pid", w.pid},
                 {"slots", w.slots},
                 {"in_flight", w.in_flight},
                 {"done", w.done},
                 {"failed", w.failed},
                 {"heartbeat_age_ms", w.heartbeat_age_ms},
                 {"state", w.state}});
  }
  return a;
}

nlohmann::json ToJson(const std::vector<proto::SessionRow>& rows) {
  nlohmann::json a = nlohmann::json::array();
  for (const auto& s : rows) {
    a.push_back({{"id", s.session.ToString()},
                 {"client", s.client_host},
                 {"window", s.window},
                 {"queued", s.queued},
                 {"in_flight", s.in_flight},
                 {"done", s.done},
                 {"failed", s.failed},
                 {"age_ms", s.age_ms},
                 {"rate", static_cast<double>(s.rate_milli) / 1000.0}});
  }
  return a;
}

}  // namespace gatherer::ctl
