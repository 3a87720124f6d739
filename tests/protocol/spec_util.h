#pragma once
// Shared by the spec tests of tests/protocol: a temporary ipc:// directory,
// a count of log lines and a count of the connections a bound endpoint holds
// open; hand-written messages and readable gtest output for commands come
// with frames.h.
//
// Thread-safety: plain functions and values; an IpcDir belongs to one test.

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <functional>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <string_view>
#include <system_error>

#include <msgpack.hpp>
#include <spdlog/sinks/base_sink.h>
#include <zmq.hpp>

#include "gatherer/ids.h"
#include "gatherer/log.h"
#include "gatherer/protocol.h"
#include "frames.h"
#include "proc_net.h"

namespace gatherer::testing {

// Counts the lines Gatherer logs that contain `needle`, for the one clause
// that prescribes logging (2.4: malformed messages are logged, rate-limited).
// Must be created before, and destroyed after, every thread that may log
// (the logger's sink list is not synchronised); counting is thread-safe.
class LogCapture {
 public:
  explicit LogCapture(std::string needle) : sink_(std::make_shared<Sink>(std::move(needle))) {
    Logger().sinks().push_back(sink_);
  }
  ~LogCapture() {
    auto& sinks = Logger().sinks();
    sinks.erase(std::remove(sinks.begin(), sinks.end(), sink_), sinks.end());
  }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  std::uint64_t lines() const { return sink_->lines.load(); }

 private:
  struct Sink : spdlog::sinks::base_sink<std::mutex> {
    explicit Sink(std::string n) : needle(std::move(n)) {}
    void sink_it_(const spdlog::details::log_msg& msg) override {
      if (std::string_view(msg.payload.data(), msg.payload.size()).find(needle) != std::string_view::npos) {
        lines.fetch_add(1);
      }
    }
    void flush_() override {}
    const std::string needle;
    std::atomic<std::uint64_t> lines{0};
  };
  std::shared_ptr<Sink> sink_;
};

// "tcp://127.0.0.1:*" for the parameter "tcp"; for "ipc" an ipc:// path in
// a fresh directory (removed with the object), short enough for sun_path.
class IpcDir {
 public:
  IpcDir() = default;
  ~IpcDir() {
    std::error_code ec;
    if (!dir_.empty()) std::filesystem::remove_all(dir_, ec);
  }
  IpcDir(const IpcDir&) = delete;
  IpcDir& operator=(const IpcDir&) = delete;

  std::string endpoint(const std::string& transport, const std::string& name = "b.sock") {
    if (transport != "ipc") return "tcp://127.0.0.1:*";
    if (dir_.empty()) {
      dir_ = std::filesystem::temp_directory_path() / ("gtr-" + NewSessionId().ToString().substr(0, 8));
      std::filesystem::create_directories(dir_);
    }
    return "ipc://" + (dir_ / name).string();
  }

 private:
  std::filesystem::path dir_;
};


// The connections accepted at `endpoint` ("tcp://127.0.0.1:<port>" or
// "ipc://<path>", as bound) whose socket a process still holds open, read
// from /proc/net/tcp or /proc/net/unix. A test that closes a peer waits for
// this to drop: the side that accepted the connection has then closed it as
// well, so its ROUTER refuses messages to that peer (PROTOCOL.md §1.2) rather
// than queueing them on a connection about to go. -1 for other transports.
inline int AcceptedConnections(const std::string& endpoint) {
  int n = 0;
  std::string line;
  if (endpoint.rfind("tcp://", 0) == 0) {
    const auto port = static_cast<std::uint16_t>(std::stoul(endpoint.substr(endpoint.rfind(':') + 1)));
    ForEachTcpSocket([&](std::uint16_t local, const std::string& st, const std::string& inode) {
      if (local == port && st != "0A" && inode != "0") ++n;  // not the listener, still held
      return true;
    });
    return n;
  }
  if (endpoint.rfind("ipc://", 0) == 0) {
    const std::string path = endpoint.substr(6);
    std::ifstream unix_sockets("/proc/net/unix");
    std::getline(unix_sockets, line);  // header
    while (std::getline(unix_sockets, line)) {
      // "Num RefCount Protocol Flags Type St Inode Path": an accepted socket
      // shows the path it was accepted on, in state 03 (connected); the
      // listening one is in state 01, a connecting one has no path.
      std::istringstream in(line);
      std::string num, refs, protocol, flags, type, st, inode, name;
      if (!(in >> num >> refs >> protocol >> flags >> type >> st >> inode >> name)) continue;
      if (name == path && st == "03") ++n;
    }
    return n;
  }
  return -1;
}

}  // namespace gatherer::testing
