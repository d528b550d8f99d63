// Row formats: conversions against independent references (the compiler's _Float16, exhaustive
// fp8 code tables, a log2-based block scale) and the synthetic value formula.
#include "engram/kernels/row_dtype.h"

#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

TEST(RowDtypeTest, RowBytes) {
  EXPECT_EQ(RowBytesFor(RowDtype::kFp8E4m3Ue8m0x32, 256), 264);  // DeepSeek-V4.1's 264-byte rows
  EXPECT_EQ(RowBytesFor(RowDtype::kBf16, 64), 128);
  EXPECT_EQ(RowBytesFor(RowDtype::kF32, 3), 12);
  EXPECT_EQ(RowBytesFor(RowDtype::kFp8E4m3Ue8m0x32, 48), 0);  // not a multiple of 32
}

TEST(RowDtypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to the even one (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8 is halfway too: ties up to the even mantissa 0x3f82.
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(-0.5f)), -0.5f);
}

TEST(RowDtypeTest, F16MatchesTheCompilersConversion) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> mantissa(-2.0f, 2.0f);
  std::uniform_int_distribution<int> exponent(-30, 17);
  for (int i = 0; i < 200000; ++i) {
    const float f = std::ldexp(mantissa(rng), exponent(rng));
    const _Float16 reference = static_cast<_Float16>(f);
    uint16_t bits;
    std::memcpy(&bits, &reference, 2);
    ASSERT_EQ(FloatToF16(f), bits) << f;
    ASSERT_EQ(F16ToFloat(bits), static_cast<float>(reference)) << f;
  }
}

TEST(RowDtypeTest, E4m3EveryCodeRoundTrips) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;  // NaN
    const float v = E4m3ToFloat(static_cast<uint8_t>(code));
    if (v == 0.0f) continue;  // +0 / -0 both encode back to a zero
    EXPECT_EQ(FloatToE4m3(v), code) << code << " " << v;
  }
  EXPECT_EQ(E4m3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(E4m3ToFloat(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
}

TEST(RowDtypeTest, E4m3RoundsToNearestEvenAndSaturates) {
  // Between 1.0 (0x38) and 1.125 (0x39) the midpoint 1.0625 ties to even 1.0.
  EXPECT_EQ(FloatToE4m3(1.0625f), 0x38);
  EXPECT_EQ(FloatToE4m3(1.07f), 0x39);
  EXPECT_EQ(FloatToE4m3(1000.0f), 0x7e);
  EXPECT_EQ(FloatToE4m3(-1000.0f), 0xfe);
  // Brute force: the encoded value is the nearest representable value.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> any(-448.0f, 448.0f);
  for (int i = 0; i < 20000; ++i) {
    const float f = any(rng) * (i % 2 ? 1.0f : 1.0f / 64);
    const float enc = E4m3ToFloat(FloatToE4m3(f));
    for (int code = 0; code < 256; ++code) {
      if ((code & 0x7f) == 0x7f) continue;
      ASSERT_LE(std::fabs(enc - f), std::fabs(E4m3ToFloat(static_cast<uint8_t>(code)) - f)) << f;
    }
  }
}

TEST(RowDtypeTest, Fp8BlockExponentIsCeilLog2OfMaxOver448) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> any(1e-6, 1.0);
  for (int i = 0; i < 100000; ++i) {
    const float m = static_cast<float>(any(rng));
    const int reference = static_cast<int>(std::ceil(std::log2(static_cast<double>(m) / 448.0)));
    ASSERT_EQ(Fp8BlockExponent(m), reference) << m;
  }
  EXPECT_EQ(Fp8BlockExponent(448.0f), 0);
  EXPECT_EQ(Fp8BlockExponent(0.875f), -9);  // exactly 448 * 2^-9
  EXPECT_EQ(Fp8BlockExponent(0.0f), 0);
}

TEST(RowDtypeTest, EncodeDecodeRowWithinFormatPrecision) {
  std::vector<float> v(64), back(64);
  for (int j = 0; j < 64; ++j) v[j] = SyntheticValue(1, 2, 3, 64, j);
  for (RowDtype dtype : {RowDtype::kF32, RowDtype::kBf16, RowDtype::kF16, RowDtype::kFp8E4m3Ue8m0x32}) {
    std::vector<uint8_t> row(RowBytesFor(dtype, 64));
    EncodeRow(v.data(), 64, dtype, row.data());
    DecodeRow(row.data(), 64, dtype, back.data());
    // Relative step of each format (fp8: 3 mantissa bits, and the block scale keeps |v| <= 448).
    const float tol = dtype == RowDtype::kF32 ? 0 : dtype == RowDtype::kBf16 ? 1.0f / 256
                    : dtype == RowDtype::kF16 ? 1.0f / 2048 : 1.0f / 16;
    for (int j = 0; j < 64; ++j) {
      EXPECT_LE(std::fabs(back[j] - v[j]), tol * std::max(std::fabs(v[j]), 1.0f / 512)) << j;
    }
  }
}

TEST(SyntheticTest, ValuesFollowTheFormula) {
  // splitmix64(0) is a published constant of the generator.
  EXPECT_EQ(SplitMix64(0), 0xE220A8397B1DCDAFULL);
  const uint64_t bits = SplitMix64(42ULL ^ (5ULL << 56) ^ (10ULL * 8 + 3));
  EXPECT_EQ(SyntheticValue(42, 5, 10, 8, 3), static_cast<float>(static_cast<double>(bits >> 40) / 8388608.0 - 1.0));
  for (int j = 0; j < 1000; ++j) {
    const float v = SyntheticValue(1, 1, j, 64, 0);
    EXPECT_GE(v, -1.0f);
    EXPECT_LT(v, 1.0f);
  }
}

}  // namespace
}  // namespace engram
