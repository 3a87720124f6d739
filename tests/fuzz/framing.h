#pragma once
// How protocol_fuzzer turns one fuzz input (a flat byte string) into a
// ZeroMQ multipart message, and how the seed generator does the reverse:
//
//   input = frame*
//   frame = length (2 bytes, little-endian) + data (length bytes)
//
// A last frame whose data is cut short keeps the bytes that remain; a lone
// trailing byte is ignored. Two length bytes reach every header size the
// decoders see in a seed-sized input, and a small edit adds, drops or
// resizes a frame, so the fuzzer explores frame counts (§2.4, §3.4.2) as
// easily as header bytes.
//
// Thread-safety: free functions over values.

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "gatherer/protocol.h"

namespace gatherer::fuzz {

inline protocol::Frames SplitFrames(std::span<const std::uint8_t> input) {
  protocol::Frames frames;
  std::size_t at = 0;
  while (at + 2 <= input.size()) {
    std::size_t length = input[at] | (std::size_t{input[at + 1]} << 8);
    at += 2;
    if (length > input.size() - at) length = input.size() - at;
    frames.emplace_back(input.data() + at, length);
    at += length;
  }
  return frames;
}

// The input SplitFrames turns back into `frames`. Frames must be under 64 KiB.
inline std::string JoinFrames(const protocol::Frames& frames) {
  std::string out;
  for (const auto& f : frames) {
    out += static_cast<char>(f.size() & 0xff);
    out += static_cast<char>((f.size() >> 8) & 0xff);
    out.append(static_cast<const char*>(f.data()), f.size());
  }
  return out;
}

}  // namespace gatherer::fuzz
