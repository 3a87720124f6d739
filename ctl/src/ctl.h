#pragma once
// gatherer-ctl's parts: one control request to a broker and its answer
// (PROTOCOL.md §3.9), and the renderings of the answers as aligned tables
// for people and as JSON for scripts.
//
// Thread-safety: a Control is used by one thread; the free functions are pure.

#include <chrono>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>
#include <zmq.hpp>

#include "gatherer/curve.h"
#include "gatherer/protocol.h"
#include "gatherer/status.h"

namespace gatherer::ctl {

// One broker's answer: a report, or DONE's message.
using Answer = std::variant<protocol::StatusReport, std::vector<protocol::WorkerRow>,
                            std::vector<protocol::SessionRow>, protocol::Done>;

class Control {
 public:
  // Connects (lazily, as ZeroMQ does) to `broker`; every request waits at
  // most `timeout` for its answer.
  // `curve`: for a broker that requires CURVE (PROTOCOL.md §1.7), the
  // broker's public key and this operator's key pair; empty = plaintext.
  Control(std::string broker, std::chrono::milliseconds timeout, std::string curve_broker_key = {},
          CurveKeyPair curve_key = {});
  ~Control();
  Control(const Control&) = delete;
  Control& operator=(const Control&) = delete;

  // Sends one request (STATUS, WORKERS, SESSIONS, CANCEL_SESSION,
  // DRAIN_WORKER or SHUTDOWN, already encoded) and returns the answer.
  // DeadlineExceeded when none came within the timeout (the message names
  // the broker), the broker's ERROR as a Status otherwise.
  Result<Answer> ask(protocol::Frames&& request);

 private:
  void reconnect();
  std::string broker_;
  std::chrono::milliseconds timeout_;
  std::string curve_broker_key_;
  CurveKeyPair curve_key_;
  zmq::context_t context_;
  std::unique_ptr<zmq::socket_t> socket_;
};

std::string Rate(std::uint64_t milli);  // "12.3"
std::string Age(std::uint64_t ms);      // "850ms", "12.4s", "3m05s", "2h01m"

std::string StatusTable(const protocol::StatusReport& r, const std::string& broker);
std::string WorkersTable(const std::vector<protocol::WorkerRow>& rows);
std::string SessionsTable(const std::vector<protocol::SessionRow>& rows);
// STATUS_REPORT's rate keys (§3.9.7): key, windows, used, throttled, pause
// left; and a heading `title`, which says when the broker's list is full
// (it lists its busiest keys only).
std::string RateKeysTable(const std::vector<protocol::RateKeyRow>& rows);
std::string RateKeysHeading(const std::string& title, const std::vector<protocol::RateKeyRow>& rows);

nlohmann::json ToJson(const protocol::StatusReport& r);
nlohmann::json ToJson(const std::vector<protocol::WorkerRow>& rows);
nlohmann::json ToJson(const std::vector<protocol::SessionRow>& rows);
nlohmann::json ToJson(const std::vector<protocol::RateKeyRow>& rows);

// Columns padded to their widest cell; numbers right-aligned.
std::string Table(const std::vector<std::string>& header, const std::vector<std::vector<std::string>>& rows);

}  // namespace gatherer::ctl
