// JSON string escaping for the CLI's output (json_escape.h), per RFC 8259
// §7, with SSE2 / SSSE3 where the CPU has them: the hot path of a run of big
// JSON bodies.
#include "json_escape.h"

#include <array>
#include <bit>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#include <tmmintrin.h>
#endif

namespace gatherer::cli {

bool& detail::BaselineEscaping() {
  static bool baseline = false;
  return baseline;
}

namespace {

using detail::BaselineEscaping;

// Output bytes that each input byte adds beyond itself when escaped per
// RFC 8259 §7: 0 when it is written as it is, 1 for the two-character escapes
// (\" \\ \n \r \t \b \f), 5 for \u00XX. With `latin1`, bytes >= 0x80 are
// code points U+0080..U+00FF (how HTTP/1.1 historically read obs-text), which
// keeps a line valid UTF-8 when a server sends a non-UTF-8 header value.
using EscapeTable = std::array<std::uint8_t, 256>;

constexpr EscapeTable MakeEscapeExtra(bool latin1) {
  EscapeTable t{};
  for (int c = 0; c < 256; ++c) {
    if (c < 0x20 || (latin1 && c >= 0x80)) t[c] = 5;
  }
  for (const unsigned char c : {'"', '\\', '\n', '\r', '\t', '\b', '\f'}) t[c] = 1;
  return t;
}
constexpr EscapeTable kEscapeExtraUtf8 = MakeEscapeExtra(false);
constexpr EscapeTable kEscapeExtraLatin1 = MakeEscapeExtra(true);

// The byte written after the backslash of a two-character escape, and the
// byte itself for one written as it is.
constexpr std::array<char, 256> kEscapeSecond = [] {
  std::array<char, 256> t{};
  for (int c = 0; c < 256; ++c) t[c] = static_cast<char>(c);
  t['\n'] = 'n';
  t['\r'] = 'r';
  t['\t'] = 't';
  t['\b'] = 'b';
  t['\f'] = 'f';
  return t;
}();

#if !defined(__SSE2__)
// True when one of the 8 bytes in `x` must be escaped in UTF-8 mode: below
// 0x20, '"' or '\\'. Each test is the exact "some byte is zero / is below n"
// bit trick, so a block it passes is copied whole.
inline bool BlockNeedsEscape(std::uint64_t x) {
  constexpr std::uint64_t kOnes = 0x0101010101010101ULL;
  constexpr std::uint64_t kHigh = 0x8080808080808080ULL;
  const auto has_zero = [](std::uint64_t v) { return (v - kOnes) & ~v & kHigh; };
  return (((x - kOnes * 0x20) & ~x & kHigh) | has_zero(x ^ (kOnes * '"')) | has_zero(x ^ (kOnes * '\\'))) != 0;
}
#endif

// Writes c at o, escaped; returns the end. `o` is a parameter, not a
// captured variable: a char store may alias anything in memory, so a pointer
// kept there would be reloaded after every byte written.
inline char* EscapeByte(char* o, unsigned char c, const EscapeTable& extra_of) {
  static constexpr char kHex[] = "0123456789abcdef";
  const std::uint8_t e = extra_of[c];
  if (e == 5) {
    const char esc[6] = {'\\', 'u', '0', '0', kHex[c >> 4], kHex[c & 0xf]};
    std::memcpy(o, esc, sizeof esc);
    return o + sizeof esc;
  }
  *o = '\\';  // kept only when e == 1: a plain byte overwrites it
  o += e;
  *o = kEscapeSecond[c];
  return o + 1;
}

#if defined(__SSE2__)
// 16 bytes at a time (SSE2, every x86-64): which bytes to escape in UTF-8
// mode (below 0x20, '"', '\\'), and which of them are control bytes; each
// mask byte is 0xff where true, 0 where not.
struct EscapeMasks {
  __m128i special;
  __m128i control;
};
inline EscapeMasks EscapeMasksOf(__m128i x) {
  const __m128i quote = _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')), _mm_cmpeq_epi8(x, _mm_set1_epi8('\\')));
  // x <= 0x1f, unsigned: max(x, 0x1f) == 0x1f.
  const __m128i low = _mm_set1_epi8(0x1f);
  const __m128i control = _mm_cmpeq_epi8(_mm_max_epu8(x, low), low);
  return {_mm_or_si128(quote, control), control};
}
inline unsigned Bits(__m128i mask) { return static_cast<unsigned>(_mm_movemask_epi8(mask)); }
constexpr std::size_t kEscapeChunk = 16;

// With SSSE3 (PSHUFB), a chunk that needs escaping is written without a loop
// over its escaped bytes: each half of 8 bytes goes through one shuffle that
// spreads its bytes out and puts a backslash before each escaped one, from a
// table indexed by the half's 8-bit mask, and the output moves by the
// length kept beside it. The two-character escapes of control bytes
// (\n \r \t \b \f) have their letter swapped in first; a chunk with a
// \u00XX byte goes byte by byte. A JSON body escapes every few bytes (the
// benchmark suite's 1 MiB one, every 7th), and there this is 3x as fast as
// a store per run between escaped bytes.
struct EscapeShuffle {
  std::array<std::array<std::uint8_t, 16>, 256> pattern{};
  std::array<std::uint8_t, 256> length{};
};
constexpr EscapeShuffle kEscapeShuffle = [] {
  EscapeShuffle t{};
  for (unsigned m = 0; m < 256; ++m) {
    // Source bytes 0..7 are the half, 8..15 backslashes; 0x80 writes a zero
    // past the end, which the next store or the final resize drops.
    std::size_t k = 0;
    for (std::uint8_t j = 0; j < 8; ++j) {
      if (m >> j & 1u) t.pattern[m][k++] = 8;
      t.pattern[m][k++] = j;
    }
    t.length[m] = static_cast<std::uint8_t>(k);
    while (k < 16) t.pattern[m][k++] = 0x80;
  }
  return t;
}();

// The letter of each two-character control escape by its low nibble (0 for
// the others), for PSHUFB: the control bytes below 0x10 that kEscapeSecond
// has a letter for.
constexpr std::array<char, 16> kControlLetter = [] {
  std::array<char, 16> t{};
  for (int c = 0; c < 16; ++c) t[c] = kEscapeExtraUtf8[c] == 1 ? kEscapeSecond[c] : 0;
  return t;
}();

// Writes the escaped form of in[0, chunks_end) at o with SSE2 alone;
// returns the end. `n` is the whole input's size: no read goes past it.
char* WriteEscapedSse2(char* o, const unsigned char* in, std::size_t n, std::size_t chunks_end,
                       const EscapeTable& extra_of) {
  for (std::size_t i = 0; i < chunks_end; i += kEscapeChunk) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    const unsigned special = Bits(EscapeMasksOf(x).special);
    if (special == 0) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), x);
      o += kEscapeChunk;
      continue;
    }
    // Each run is stored as 16 bytes from its first and the pointer moves by
    // its length, the next write overwriting what went past. The 16 bytes
    // are read from the input, or near its end from a copy of the chunk
    // twice over, so that no read leaves the input.
    const unsigned char* chunk = in + i;
    alignas(16) unsigned char twice[2 * kEscapeChunk];
    if (i + 2 * kEscapeChunk > n) {
      _mm_store_si128(reinterpret_cast<__m128i*>(twice), x);
      _mm_store_si128(reinterpret_cast<__m128i*>(twice + kEscapeChunk), x);
      chunk = twice;
    }
    unsigned from = 0;
    for (unsigned b = special; b != 0; b &= b - 1) {
      const auto at = static_cast<unsigned>(std::countr_zero(b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + from)));
      o += at - from;
      o = EscapeByte(o, in[i + at], extra_of);
      from = at + 1;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_loadu_si128(reinterpret_cast<const __m128i*>(chunk + from)));
    o += kEscapeChunk - from;
  }
  return o;
}

// One half of a chunk: `source` holds its 8 bytes, then 8 backslashes;
// `mask` marks the bytes to escape.
__attribute__((target("ssse3"))) inline char* WriteEscapedHalf(char* o, __m128i source, unsigned mask) {
  const __m128i pattern = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kEscapeShuffle.pattern[mask].data()));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm_shuffle_epi8(source, pattern));
  return o + kEscapeShuffle.length[mask];
}

// Writes the escaped form of in[0, n) (n a multiple of 16) at o; returns the
// end. At most 16 bytes past the end are written over. Only where the CPU
// has SSSE3.
__attribute__((target("ssse3"))) char* WriteEscapedSsse3(char* o, const unsigned char* in, std::size_t n,
                                                          const EscapeTable& extra_of) {
  const __m128i backslashes = _mm_set1_epi8('\\');
  const __m128i letters = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kControlLetter.data()));
  const __m128i below_16 = _mm_set1_epi8(0x0f);
  for (std::size_t i = 0; i < n; i += kEscapeChunk) {
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    const EscapeMasks m = EscapeMasksOf(x);
    const unsigned special = Bits(m.special);
    if (special == 0) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), x);
      o += kEscapeChunk;
      continue;
    }
    if (const unsigned control = Bits(m.control); control != 0) {
      // Control bytes are below 0x20, so PSHUFB indexes by their low nibble;
      // those of 0x10..0x1f and those with no letter are \u00XX.
      const __m128i letter = _mm_shuffle_epi8(letters, x);
      const __m128i short_form = _mm_andnot_si128(_mm_cmpeq_epi8(letter, _mm_setzero_si128()),
                                                  _mm_cmpeq_epi8(_mm_max_epu8(x, below_16), below_16));
      if ((Bits(short_form) & control) != control) {
        for (std::size_t j = i; j < i + kEscapeChunk; ++j) o = EscapeByte(o, in[j], extra_of);
        continue;
      }
      x = _mm_or_si128(_mm_andnot_si128(m.control, x), _mm_and_si128(m.control, letter));
    }
    o = WriteEscapedHalf(o, _mm_unpacklo_epi64(x, backslashes), special & 0xffu);
    o = WriteEscapedHalf(o, _mm_unpackhi_epi64(x, backslashes), special >> 8);
  }
  return o;
}
#else
constexpr std::size_t kEscapeChunk = 8;
#endif

}  // namespace

bool WrittenAsItIs(std::string_view s) {
  for (const char c : s) {
    if (kEscapeExtraLatin1[static_cast<unsigned char>(c)] != 0) return false;
  }
  return true;
}

// Sized once from a first pass, then written. On x86-64, 16 bytes at a time:
// a clean chunk is stored whole, and one that needs escaping goes through
// two shuffles (SSSE3) or, with SSE2 alone, one 16-byte store per run
// between escaped bytes (the output keeps a chunk of slack for either,
// trimmed at the end). Elsewhere 8 bytes at a time with the bit tricks above.
// A JSON body escapes every few bytes, and this is the CLI's largest cost
// per byte of output (byte by byte, about half the CPU of a run of 1 MiB
// JSON bodies).
void AppendJsonEscaped(std::string& out, std::string_view s, bool latin1) {
  const EscapeTable& extra_of = latin1 ? kEscapeExtraLatin1 : kEscapeExtraUtf8;
  const auto* in = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  // Whole chunks only in UTF-8 mode; latin1 (header values) goes byte by byte.
  const std::size_t chunks_end = latin1 ? 0 : n - n % kEscapeChunk;
  std::size_t extra = 0;
#if defined(__SSE2__)
  // Escaped bytes counted per byte lane (each mask byte is -1), summed every
  // 255 chunks before a lane can wrap; no popcount (not in baseline x86-64).
  const __m128i zero = _mm_setzero_si128();
  __m128i lanes = zero;
  const auto add_lanes = [&] {
    const __m128i sums = _mm_sad_epu8(lanes, zero);
    extra += static_cast<std::size_t>(_mm_cvtsi128_si64(sums)) +
             static_cast<std::size_t>(_mm_cvtsi128_si64(_mm_unpackhi_epi64(sums, sums)));
    lanes = zero;
  };
  unsigned in_lanes = 0;
  for (std::size_t i = 0; i < chunks_end; i += kEscapeChunk) {
    const EscapeMasks m = EscapeMasksOf(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    lanes = _mm_sub_epi8(lanes, m.special);
    if (++in_lanes == 255) {
      add_lanes();
      in_lanes = 0;
    }
    // \u00XX for control bytes other than \n \r \t \b \f: 4 more.
    for (unsigned c = Bits(m.control); c != 0; c &= c - 1) extra += extra_of[in[i + std::countr_zero(c)]] - 1u;
  }
  add_lanes();
#else
  const auto clean_block = [&](std::size_t i) {
    std::uint64_t x;
    std::memcpy(&x, in + i, sizeof x);
    return !BlockNeedsEscape(x);
  };
  for (std::size_t i = 0; i < chunks_end; i += kEscapeChunk) {
    if (clean_block(i)) continue;
    for (std::size_t j = i; j < i + kEscapeChunk; ++j) extra += extra_of[in[j]];
  }
#endif
  for (std::size_t i = chunks_end; i < n; ++i) extra += extra_of[in[i]];

  const std::size_t start = out.size();
  if (extra == 0) {
    out.append(s);
    return;
  }
  const std::size_t end = start + n + extra;
  out.resize(end + kEscapeChunk);
  char* o = out.data() + start;
#if defined(__SSE2__)
  static const bool kHasSsse3 = __builtin_cpu_supports("ssse3");
  if (kHasSsse3 && !BaselineEscaping()) {
    o = WriteEscapedSsse3(o, in, chunks_end, extra_of);
  } else {
    o = WriteEscapedSse2(o, in, n, chunks_end, extra_of);
  }
#else
  for (std::size_t i = 0; i < chunks_end; i += kEscapeChunk) {
    if (clean_block(i)) {
      std::memcpy(o, in + i, kEscapeChunk);
      o += kEscapeChunk;
      continue;
    }
    for (std::size_t j = i; j < i + kEscapeChunk; ++j) o = EscapeByte(o, in[j], extra_of);
  }
#endif
  for (std::size_t i = chunks_end; i < n; ++i) o = EscapeByte(o, in[i], extra_of);
  out.resize(end);
}

}  // namespace gatherer::cli
