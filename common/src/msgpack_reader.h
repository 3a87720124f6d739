#pragma once
// A forward-only reader over one msgpack value in a frame, for the decoders
// that run once or twice per statement (DISPATCH and SUBMIT statements,
// RESULTS): each field is read in place, where it lies, with no object tree,
// zone or allocation between the frame and the decoded struct. msgpack-c's
// object unpacking stays for every other message and for the rare fields of
// these (rate reports), which the reader hands to it (`object`).
//
// Any format msgpack-c unpacks reads the same way here: a non-negative
// integer in a signed format is an unsigned one, str is accepted where bin is
// expected. Lengths are checked against the bytes left before anything is
// read or allocated, nesting that `skip` walks is bounded, and a malformed
// value calls ReaderFail, which throws what the decoders turn into an error
// reply. protocol.cc defines ReaderFail and is the reader's only user.

#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>

#include <msgpack.hpp>

namespace gatherer::protocol::detail {

[[noreturn]] void ReaderFail(const char* what);

class MsgpackReader {
 public:
  // Arrays longer than max_array, and maps of more than max_map pairs, are
  // malformed whatever the bytes left (the limits of PROTOCOL.md §5).
  MsgpackReader(const void* data, std::size_t size, std::uint32_t max_array, std::uint32_t max_map)
      : p_(static_cast<const unsigned char*>(data)), end_(p_ + size), max_array_(max_array), max_map_(max_map) {}

  bool done() const { return p_ == end_; }
  // Where the next value starts: with a later position, the bytes of the
  // values read in between.
  const char* position() const { return reinterpret_cast<const char*>(p_); }
  std::size_t left() const { return static_cast<std::size_t>(end_ - p_); }

  // An array of at least min_size elements; returns its size.
  std::uint32_t array(std::uint32_t min_size, const char* what) {
    const unsigned char t = peek(what);
    std::uint32_t n = 0;
    if (t >= 0x90 && t <= 0x9f) {
      ++p_;
      n = t & 0x0fu;
    } else if (t == 0xdc || t == 0xdd) {
      n = static_cast<std::uint32_t>(sized(t == 0xdc ? 2 : 4, what));  // array 16, array 32
    } else {
      ReaderFail(what);
    }
    // Every element takes a byte at least: a count beyond what is left is a
    // lie, refused before anyone sizes a container from it.
    if (n < min_size || n > left() || n > max_array_) ReaderFail(what);
    return n;
  }

  // A non-negative integer that fits T.
  template <typename T>
  T uint(const char* what) {
    const unsigned char t = peek(what);
    std::uint64_t v = 0;
    if (t <= 0x7f) {
      ++p_;
      v = t;
    } else if (t >= 0xcc && t <= 0xcf) {
      v = sized(1u << (t - 0xcc), what);  // uint 8, 16, 32, 64
    } else if (t >= 0xd0 && t <= 0xd3) {
      // int 8, 16, 32, 64: sign-extended from its width.
      const unsigned width = 1u << (t - 0xd0);
      const std::uint64_t raw = sized(width, what);
      const unsigned shift = 64 - 8 * width;
      const auto s = static_cast<std::int64_t>(raw << shift) >> shift;
      if (s < 0) ReaderFail(what);
      v = static_cast<std::uint64_t>(s);
    } else {
      ReaderFail(what);
    }
    if (v > std::numeric_limits<T>::max()) ReaderFail(what);
    return static_cast<T>(v);
  }

  std::string_view str(const char* what) {
    const unsigned char t = peek(what);
    std::size_t n = 0;
    if (t >= 0xa0 && t <= 0xbf) {
      ++p_;
      n = t & 0x1fu;
    } else if (t >= 0xd9 && t <= 0xdb) {
      n = sized(1u << (t - 0xd9), what);  // str 8, 16, 32
    } else {
      ReaderFail(what);
    }
    return bytes(n, what);
  }

  // bin, or str in its place.
  std::string_view bin(const char* what) {
    const unsigned char t = peek(what);
    if (t < 0xc4 || t > 0xc6) return str(what);
    return bytes(sized(1u << (t - 0xc4), what), what);  // bin 8, 16, 32
  }

  // Takes a nil if one is next.
  bool nil() {
    if (p_ == end_ || *p_ != 0xc0) return false;
    ++p_;
    return true;
  }

  // A boolean, or nil (nullopt).
  std::optional<bool> boolean_or_nil(const char* what) {
    const unsigned char t = peek(what);
    ++p_;
    if (t == 0xc2 || t == 0xc3) return t == 0xc3;
    if (t == 0xc0) return std::nullopt;
    ReaderFail(what);
  }

  // The next value as msgpack-c unpacks it, for fields read too rarely to be
  // worth reading in place. Strings and bins reference the frame.
  msgpack::object_handle object(const msgpack::unpack_limit& limits) {
    std::size_t offset = 0;
    auto handle = msgpack::unpack(reinterpret_cast<const char*>(p_), left(), offset, &InPlace, nullptr, limits);
    p_ += offset;
    return handle;
  }

  // Steps over the next value of any kind (fields a newer peer adds), in
  // which at most `containers` arrays and maps may nest (the first counts).
  void skip(int containers) {
    const char* what = "malformed value";
    const unsigned char t = peek(what);
    const bool container = (t >= 0x80 && t <= 0x9f) || (t >= 0xdc && t <= 0xdf);
    if (container && containers <= 0) ReaderFail("msgpack nested too deeply");
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
      ++p_;
    } else if (t >= 0xca && t <= 0xd3) {
      // float 32/64, uint 8-64, int 8-64
      static constexpr unsigned char kWidth[] = {4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
      ++p_;
      bytes(kWidth[t - 0xca], what);
    } else if ((t >= 0xa0 && t <= 0xbf) || (t >= 0xd9 && t <= 0xdb)) {
      str(what);
    } else if (t >= 0xc4 && t <= 0xc6) {
      bin(what);
    } else if ((t >= 0x90 && t <= 0x9f) || t == 0xdc || t == 0xdd) {
      for (std::uint32_t n = array(0, what); n > 0; --n) skip(containers - 1);
    } else if (container) {
      std::uint64_t n = t & 0x0fu;  // fixmap
      if (t <= 0x8f) {
        ++p_;
      } else {
        n = sized(t == 0xde ? 2 : 4, what);  // map 16, map 32
      }
      if (n > left() / 2 || n > max_map_) ReaderFail(what);
      for (std::uint64_t k = 0; k < 2 * n; ++k) skip(containers - 1);
    } else {
      ReaderFail("unsupported msgpack type");  // ext, and the never-used 0xc1
    }
  }

 private:
  static bool InPlace(msgpack::type::object_type, std::size_t, void*) { return true; }

  unsigned char peek(const char* what) {
    if (p_ == end_) ReaderFail(what);
    return *p_;
  }

  // Steps over a format byte, then reads the big-endian field of `width`
  // bytes (1, 2, 4 or 8) after it.
  std::uint64_t sized(unsigned width, const char* what) {
    ++p_;
    if (left() < width) ReaderFail(what);
    std::uint64_t v = 0;
    for (unsigned i = 0; i < width; ++i) v = v << 8 | p_[i];
    p_ += width;
    return v;
  }

  std::string_view bytes(std::size_t n, const char* what) {
    if (n > left()) ReaderFail(what);
    std::string_view s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }

  const unsigned char* p_;
  const unsigned char* end_;
  std::uint32_t max_array_;
  std::uint32_t max_map_;
};

}  // namespace gatherer::protocol::detail
