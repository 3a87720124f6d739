#include "msgpack_reader.h"

#include <gtest/gtest.h>
#include <msgpack.hpp>

#include <cstdint>
#include <functional>
#include <limits>
#include <initializer_list>
#include <string>
#include <vector>

namespace gatherer::protocol::detail {
namespace {

using Packer = msgpack::packer<msgpack::sbuffer>;

std::string Packed(const std::function<void(Packer&)>& pack) {
  msgpack::sbuffer buf;
  Packer pk(buf);
  pack(pk);
  return std::string(buf.data(), buf.size());
}

// The reader points into `bytes`, which must outlive it.
MsgpackReader Reader(const std::string& bytes, std::uint32_t max_array = 1024, std::uint32_t max_map = 1024) {
  return MsgpackReader(bytes.data(), bytes.size(), max_array, max_map);
}
MsgpackReader Reader(std::string&&, std::uint32_t = 0, std::uint32_t = 0) = delete;

TEST(MsgpackReaderTest, ReadsEveryIntegerFormatANonNegativeValueMayTake) {
  for (const std::uint64_t v : std::initializer_list<std::uint64_t>{0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295,
                                                                   4294967296, std::numeric_limits<std::uint64_t>::max()}) {
    const std::string minimal = Packed([&](Packer& pk) { pk.pack_uint64(v); });
    auto r = Reader(minimal);
    EXPECT_EQ(r.uint<std::uint64_t>("v"), v);
    EXPECT_TRUE(r.done());
    // The wider unsigned formats, and the signed ones, of the same value.
    std::vector<std::string> forms = {Packed([&](Packer& pk) { pk.pack_fix_uint64(v); })};
    if (v <= 0xffffffffu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_uint32(static_cast<std::uint32_t>(v)); }));
    if (v <= 0xffffu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_uint16(static_cast<std::uint16_t>(v)); }));
    if (v <= 0xffu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_uint8(static_cast<std::uint8_t>(v)); }));
    if (v <= 0x7fffffffffffffffull) {
      forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_int64(static_cast<std::int64_t>(v)); }));
    }
    if (v <= 0x7fffffffu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_int32(static_cast<std::int32_t>(v)); }));
    if (v <= 0x7fffu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_int16(static_cast<std::int16_t>(v)); }));
    if (v <= 0x7fu) forms.push_back(Packed([&](Packer& pk) { pk.pack_fix_int8(static_cast<std::int8_t>(v)); }));
    for (const std::string& form : forms) {
      auto w = Reader(form);
      EXPECT_EQ(w.uint<std::uint64_t>("v"), v) << "format 0x" << std::hex << int(static_cast<unsigned char>(form[0]));
      EXPECT_TRUE(w.done());
    }
  }
  // Negative, too wide for the field, or not an integer at all.
  for (const std::string& bad : {Packed([](Packer& pk) { pk.pack(-1); }),
                                 Packed([](Packer& pk) { pk.pack_fix_int64(-5); }),
                                 Packed([](Packer& pk) { pk.pack(1.5); }), Packed([](Packer& pk) { pk.pack_nil(); }),
                                 Packed([](Packer& pk) { pk.pack(std::string("7")); })}) {
    auto r = Reader(bad);
    EXPECT_ANY_THROW(r.uint<std::uint64_t>("v"));
  }
  const std::string wide_bytes = Packed([](Packer& pk) { pk.pack(256); });
  auto wide = Reader(wide_bytes);
  EXPECT_ANY_THROW(wide.uint<std::uint8_t>("v"));
  const std::string fits_bytes = Packed([](Packer& pk) { pk.pack(255); });
  auto fits = Reader(fits_bytes);
  EXPECT_EQ(fits.uint<std::uint8_t>("v"), 255);
}

TEST(MsgpackReaderTest, ReadsStrAndBinOfEveryLengthFormatInPlace) {
  for (const std::size_t n : {0u, 31u, 32u, 255u, 256u, 65535u, 65536u}) {
    const std::string text(n, 'x');
    const std::string as_str = Packed([&](Packer& pk) { pk.pack(text); });
    auto r = Reader(as_str);
    const std::string_view s = r.str("s");
    EXPECT_EQ(s, text);
    EXPECT_EQ(s.data(), as_str.data() + (as_str.size() - n)) << "read where it lies, not copied";
    EXPECT_TRUE(r.done());
    const std::string as_bin = Packed([&](Packer& pk) {
      pk.pack_bin(static_cast<std::uint32_t>(n));
      pk.pack_bin_body(text.data(), static_cast<std::uint32_t>(n));
    });
    auto b = Reader(as_bin);
    EXPECT_EQ(b.bin("b"), text);
    EXPECT_TRUE(b.done());
    // A str is taken for a bin (§2.6), never a bin for a str.
    auto str_for_bin = Reader(as_str);
    EXPECT_EQ(str_for_bin.bin("b"), text);
    auto bin_for_str = Reader(as_bin);
    EXPECT_ANY_THROW(bin_for_str.str("s"));
  }
}

TEST(MsgpackReaderTest, ArrayCountsBeyondTheBytesLeftOrTheLimitAreRefused) {
  const std::string three_bytes = Packed([](Packer& pk) {
    pk.pack_array(3);
    pk.pack(1);
    pk.pack(2);
    pk.pack(3);
  });
  auto three = Reader(three_bytes);
  const std::string two = Packed([](Packer& pk) { pk.pack_array(2); });
  EXPECT_ANY_THROW(Reader(two).array(3, "too short"));
  EXPECT_EQ(three.array(3, "a"), 3u);
  // Claims 2^32-1 elements with none behind it: refused before anything is sized from it.
  const std::string lie_bytes = Packed([](Packer& pk) {
    pk.pack_array(0xffffffffu);
    pk.pack(1);
  });
  auto lie = Reader(lie_bytes);
  EXPECT_ANY_THROW(lie.array(0, "lie"));
  const std::string twenty = Packed([](Packer& pk) {
    pk.pack_array(20);
    for (int i = 0; i < 20; ++i) pk.pack(i);
  });
  EXPECT_EQ(Reader(twenty, 20).array(0, "at the limit"), 20u);
  auto over = Reader(twenty, 19);
  EXPECT_ANY_THROW(over.array(0, "over the limit"));
}

TEST(MsgpackReaderTest, BooleanOrNil) {
  const std::string r_bytes = Packed([](Packer& pk) {
    pk.pack(true);
    pk.pack(false);
    pk.pack_nil();
    pk.pack(1);
  });
  auto r = Reader(r_bytes);
  EXPECT_EQ(r.boolean_or_nil("b"), std::optional<bool>(true));
  EXPECT_EQ(r.boolean_or_nil("b"), std::optional<bool>(false));
  EXPECT_EQ(r.boolean_or_nil("b"), std::nullopt);
  EXPECT_ANY_THROW(r.boolean_or_nil("b"));
  const std::string n_bytes = Packed([](Packer& pk) {
    pk.pack_nil();
    pk.pack(0);
  });
  auto n = Reader(n_bytes);
  EXPECT_TRUE(n.nil());
  EXPECT_FALSE(n.nil()) << "a 0 is not nil, and is left in place";
  EXPECT_EQ(n.uint<int>("v"), 0);
}

// Everything a newer peer might add after the fields a decoder knows.
std::string EveryKind(int containers) {
  return Packed([&](Packer& pk) {
    pk.pack_map(3);
    pk.pack(std::string("numbers"));
    pk.pack_array(10);
    for (const std::int64_t v : std::initializer_list<std::int64_t>{0, -1, -33, -200, -40000, -3000000000}) pk.pack(v);
    pk.pack(1.5f);
    pk.pack(2.5);
    pk.pack(std::numeric_limits<std::uint64_t>::max());
    pk.pack(300);
    pk.pack(std::string("misc"));
    pk.pack_array(5);
    pk.pack_nil();
    pk.pack(true);
    pk.pack(false);
    pk.pack(std::string(300, 's'));
    pk.pack_bin(3);
    pk.pack_bin_body("abc", 3);
    pk.pack(std::string("deep"));
    for (int d = 2; d <= containers; ++d) pk.pack_array(1);
    pk.pack(1);
  });
}

TEST(MsgpackReaderTest, SkipStepsOverEveryKindOfValueWithinTheNestingAllowed) {
  // The map is one container, "deep"'s arrays the rest: 8 in all at most.
  const std::string eight = EveryKind(8);
  auto r = Reader(eight);
  r.skip(8);
  EXPECT_TRUE(r.done());
  auto fewer = Reader(eight);
  EXPECT_ANY_THROW(fewer.skip(7));
  const std::string nine_deep = EveryKind(9);
  auto nine = Reader(nine_deep);
  EXPECT_ANY_THROW(nine.skip(8));
  // Scalars need no nesting to spare.
  const std::string scalar_bytes = Packed([](Packer& pk) { pk.pack(std::string("x")); });
  auto scalar = Reader(scalar_bytes);
  scalar.skip(0);
  EXPECT_TRUE(scalar.done());
  // ext types are not part of the protocol.
  const std::string ext = Packed([](Packer& pk) {
    pk.pack_ext(1, 5);
    pk.pack_ext_body("a", 1);
  });
  auto e = Reader(ext);
  EXPECT_ANY_THROW(e.skip(8));
}

TEST(MsgpackReaderTest, EveryTruncationIsRefusedWithoutReadingPastTheEnd) {
  const std::string whole = EveryKind(8);
  for (std::size_t n = 0; n < whole.size(); ++n) {
    // A copy of exactly n bytes, so that AddressSanitizer sees a read past it.
    const std::string cut = whole.substr(0, n);
    auto r = Reader(cut);
    EXPECT_ANY_THROW(r.skip(8)) << n << " of " << whole.size() << " bytes";
  }
}

}  // namespace
}  // namespace gatherer::protocol::detail
