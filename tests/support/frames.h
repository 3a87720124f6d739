#pragma once
// GTR/2 messages as tests write them by hand: a command with whatever
// header a test packs (to say what the encoders never would), msgpack
// strings and binaries, RESULTS for a list of indices, a result with a rate
// report of the test's making, sample session settings, and the command of
// a received message. Used by the protocol spec tests, common/src/protocol_test.cc
// and the fuzz seed writer (tests/fuzz/make_seeds.cc), which links no gtest:
// nothing here needs it.
//
// Thread-safety: plain functions.

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <msgpack.hpp>
#include <zmq.hpp>

#include "gatherer/ids.h"
#include "gatherer/protocol.h"

namespace gatherer::protocol {

// gtest prints a Command by name instead of as raw bytes.
inline void PrintTo(Command command, std::ostream* os) { *os << CommandName(command); }

}  // namespace gatherer::protocol

namespace gatherer::testing {

using Packer = msgpack::packer<msgpack::sbuffer>;

// The command of a message, or nullopt for none (an empty result of a
// receive that timed out) or a malformed one.
inline std::optional<protocol::Command> CommandOf(const protocol::Frames& frames) {
  auto c = protocol::PeekCommand(frames);
  if (!c) return std::nullopt;
  return *c;
}

// Session settings with every field a round trip must keep set off its
// default: the encoders and decoders cannot pass by accident.
inline SessionSettings SampleSettings() {
  SessionSettings s;
  s.workers = 50;
  s.base_url = "http://127.0.0.1:8080";
  s.headers = {{"Authorization", "Bearer token"}, {"X-A", "1"}};
  s.timeout_ms = 1500;
  s.max_attempts = 2;
  s.max_body_bytes = 1 << 20;
  s.accept_min = 200;
  s.accept_max = 299;
  return s;
}

// A message of `command` whose header is whatever `pack` writes.
inline protocol::Frames Raw(protocol::Command command, const std::function<void(Packer&)>& pack) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pack(pk);
  protocol::Frames frames;
  frames.emplace_back(protocol::kSignature.data(), protocol::kSignature.size());
  const auto byte = static_cast<std::uint8_t>(command);
  frames.emplace_back(&byte, 1);
  frames.emplace_back(buf.data(), buf.size());
  return frames;
}

inline void PackBin(Packer& pk, std::string_view bytes) {
  pk.pack_bin(static_cast<std::uint32_t>(bytes.size()));
  pk.pack_bin_body(bytes.data(), static_cast<std::uint32_t>(bytes.size()));
}

inline void PackStr(Packer& pk, std::string_view text) {
  pk.pack_str(static_cast<std::uint32_t>(text.size()));
  pk.pack_str_body(text.data(), static_cast<std::uint32_t>(text.size()));
}

// Appends bytes to a message's header frame (a second msgpack value, say).
inline void AppendToHeader(protocol::Frames& frames, std::string_view bytes) {
  std::string header(static_cast<const char*>(frames[2].data()), frames[2].size());
  header += bytes;
  frames[2] = zmq::message_t(header.data(), header.size());
}

// RESULTS numbered `seq` for `indices`: status 200, body "<prefix><index>" each.
inline protocol::Frames ResultsFor(const SessionId& sid, std::uint64_t seq, const std::vector<std::uint64_t>& indices,
                                   const std::string& prefix = "body") {
  protocol::Results r{sid, seq, {}};
  for (auto i : indices) {
    protocol::WireResult wr;
    wr.index = i;
    wr.response.status = 200;
    wr.response.body = prefix;
    wr.response.body += std::to_string(i);
    r.results.push_back(std::move(wr));
  }
  return protocol::Encode(std::move(r));
}

// The list frame of a RESULTS message holding one result, index 0 with
// `status`: no headers, no error, attempt 1, 1 µs, worker "w", and a 9th
// element (the rate report, PROTOCOL.md §3.8.6) that `report` packs.
inline std::string OneResultWithReport(std::uint32_t status, const std::function<void(Packer&)>& report) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pk.pack_array(1);
  pk.pack_array(9);
  pk.pack(std::uint64_t{0});
  pk.pack(status);
  pk.pack_array(0);
  pk.pack(std::uint8_t{0});
  PackStr(pk, "");
  pk.pack(std::uint32_t{1});
  pk.pack(std::uint64_t{1});
  PackStr(pk, "w");
  report(pk);
  return std::string(buf.data(), buf.size());
}

}  // namespace gatherer::testing
