// Row element formats and their conversions, shared by the CUDA kernels and their CPU twin.
//
// Every function here is ENGRAM_HD (host and device) and pure. The daemon treats rows as opaque
// bytes; these conversions are used where rows are made (engramctl pack create), checked (tests)
// and consumed (the client's dequantize step).
//
// Formats: f32; bf16 and f16 (round-to-nearest-even from f32); fp8_e4m3_ue8m0x32, DeepSeek-V4.1's
// layout: `dim` OCP E4M3 bytes (bias 7, max 448, no infinities) followed by dim/32 one-byte
// power-of-two scales (ue8m0: scale = 2^(byte - 127)), one per block of 32 elements.
#ifndef ENGRAM_KERNELS_ROW_DTYPE_H_
#define ENGRAM_KERNELS_ROW_DTYPE_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ENGRAM_HD __host__ __device__
#else
#define ENGRAM_HD
#endif

namespace engram {

enum class RowDtype : uint8_t { kF32 = 0, kBf16 = 1, kF16 = 2, kFp8E4m3Ue8m0x32 = 3 };

inline constexpr int kFp8BlockSize = 32;
inline constexpr float kE4m3Max = 448.0f;

// Bytes of one row of `dim` elements; 0 when `dim` does not fit the format (fp8 needs dim % 32 == 0).
ENGRAM_HD inline int64_t RowBytesFor(RowDtype dtype, int64_t dim) {
  switch (dtype) {
    case RowDtype::kF32: return dim * 4;
    case RowDtype::kBf16:
    case RowDtype::kF16: return dim * 2;
    case RowDtype::kFp8E4m3Ue8m0x32:
      return dim % kFp8BlockSize == 0 ? dim + dim / kFp8BlockSize : 0;
  }
  return 0;
}

ENGRAM_HD inline uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

ENGRAM_HD inline float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- bf16 ----
ENGRAM_HD inline uint16_t FloatToBf16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

ENGRAM_HD inline float Bf16ToFloat(uint16_t h) { return BitsToFloat(static_cast<uint32_t>(h) << 16); }

// ---- f16 (IEEE binary16) ----
ENGRAM_HD inline uint16_t FloatToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag >= 0x7f800000u) return sign | (mag > 0x7f800000u ? 0x7e00 : 0x7c00);
  if (mag >= 0x477ff000u) return sign | 0x7c00;  // rounds past 65504: infinity
  const uint32_t exp32 = mag >> 23;
  if (exp32 < 113) {  // below 2^-14: f16 subnormal (unit 2^-24) or zero
    const uint32_t mant = (mag & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp32;  // >= 14
    if (exp32 == 0 || shift > 24) return sign;
    uint32_t n = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (n & 1u))) ++n;
    return sign | static_cast<uint16_t>(n);
  }
  uint32_t h = ((exp32 - 112) << 10) | ((mag & 0x7fffffu) >> 13);
  const uint32_t rem = mag & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

ENGRAM_HD inline float F16ToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp16 = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp16 == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24
    return (h & 0x8000u) ? -v : v;
  }
  if (exp16 == 31) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  return BitsToFloat(sign | ((exp16 + 112) << 23) | (mant << 13));
}

// ---- fp8 E4M3 (OCP "E4M3FN": bias 7, largest finite 448, 0x7f/0xff are NaN) ----
// Rounds to nearest even; magnitudes above 448 saturate to 448.
ENGRAM_HD inline uint8_t FloatToE4m3(float f) {
  const uint8_t sign = (FloatBits(f) >> 24) & 0x80u;
  float a = fabsf(f);
  if (a != a) return 0x7f;
  if (a == 0.0f) return sign;
  int e2;
  frexpf(a, &e2);           // a = m * 2^e2, m in [0.5, 1)
  int exponent = e2 - 1;    // a in [2^exponent, 2^(exponent+1))
  if (exponent < -6) exponent = -6;  // subnormal range shares the quantum 2^-9
  const float quantum = ldexpf(1.0f, exponent - 3);
  float v = rintf(a / quantum) * quantum;  // exact scaling; rintf rounds half to even
  if (v > kE4m3Max) v = kE4m3Max;
  if (v == 0.0f) return sign;
  if (v < 0.015625f) {  // 2^-6: subnormal, value = mant * 2^-9
    return sign | static_cast<uint8_t>(v * 512.0f);
  }
  frexpf(v, &e2);
  const int ev = e2 - 1;
  const int mant = static_cast<int>(ldexpf(v, -ev) * 8.0f) - 8;
  return sign | static_cast<uint8_t>(((ev + 7) << 3) | mant);
}

ENGRAM_HD inline float E4m3ToFloat(uint8_t b) {
  const int exp = (b >> 3) & 0xf;
  const int mant = b & 0x7;
  float v;
  if (exp == 0xf && mant == 0x7) {
    v = NAN;
  } else if (exp == 0) {
    v = ldexpf(static_cast<float>(mant), -9);
  } else {
    v = ldexpf(1.0f + static_cast<float>(mant) / 8.0f, exp - 7);
  }
  return (b & 0x80u) ? -v : v;
}

// The block scale exponent e = ceil(log2(max_abs / 448)), computed exactly: with max_abs = m*2^E,
// m in [0.5, 1) and 448 = 0.875*2^9, e = E - 9 when m <= 0.875, else E - 8. A block of zeros gets
// e = 0 (scale 1). The result is clamped to what one ue8m0 byte can hold.
ENGRAM_HD inline int Fp8BlockExponent(float max_abs) {
  if (!(max_abs > 0.0f)) return 0;
  int e2;
  const float m = frexpf(max_abs, &e2);
  int e = (m <= 0.875f) ? e2 - 9 : e2 - 8;
  if (e < -127) e = -127;
  if (e > 127) e = 127;
  return e;
}

ENGRAM_HD inline float Ue8m0ToScale(uint8_t b) { return ldexpf(1.0f, static_cast<int>(b) - 127); }

// Encodes `dim` floats into one row of `dtype`. REQUIRES: RowBytesFor(dtype, dim) > 0.
ENGRAM_HD inline void EncodeRow(const float* values, int dim, RowDtype dtype, uint8_t* out) {
  switch (dtype) {
    case RowDtype::kF32:
      for (int j = 0; j < dim; ++j) {
        const uint32_t u = FloatBits(values[j]);
        for (int k = 0; k < 4; ++k) out[4 * j + k] = static_cast<uint8_t>(u >> (8 * k));
      }
      return;
    case RowDtype::kBf16:
    case RowDtype::kF16:
      for (int j = 0; j < dim; ++j) {
        const uint16_t h = dtype == RowDtype::kBf16 ? FloatToBf16(values[j]) : FloatToF16(values[j]);
        out[2 * j] = static_cast<uint8_t>(h);
        out[2 * j + 1] = static_cast<uint8_t>(h >> 8);
      }
      return;
    case RowDtype::kFp8E4m3Ue8m0x32:
      for (int block = 0; block < dim / kFp8BlockSize; ++block) {
        const float* v = values + block * kFp8BlockSize;
        float max_abs = 0.0f;
        for (int j = 0; j < kFp8BlockSize; ++j) max_abs = fmaxf(max_abs, fabsf(v[j]));
        const int e = Fp8BlockExponent(max_abs);
        out[dim + block] = static_cast<uint8_t>(e + 127);
        for (int j = 0; j < kFp8BlockSize; ++j) {
          out[block * kFp8BlockSize + j] = FloatToE4m3(ldexpf(v[j], -e));
        }
      }
      return;
  }
}

// Decodes one row of `dtype` into `dim` floats (the dequantize step).
ENGRAM_HD inline void DecodeRow(const uint8_t* row, int dim, RowDtype dtype, float* out) {
  switch (dtype) {
    case RowDtype::kF32:
      for (int j = 0; j < dim; ++j) {
        uint32_t u = 0;
        for (int k = 0; k < 4; ++k) u |= static_cast<uint32_t>(row[4 * j + k]) << (8 * k);
        out[j] = BitsToFloat(u);
      }
      return;
    case RowDtype::kBf16:
    case RowDtype::kF16:
      for (int j = 0; j < dim; ++j) {
        const uint16_t h = static_cast<uint16_t>(row[2 * j] | (row[2 * j + 1] << 8));
        out[j] = dtype == RowDtype::kBf16 ? Bf16ToFloat(h) : F16ToFloat(h);
      }
      return;
    case RowDtype::kFp8E4m3Ue8m0x32:
      for (int j = 0; j < dim; ++j) {
        out[j] = E4m3ToFloat(row[j]) * Ue8m0ToScale(row[dim + j / kFp8BlockSize]);
      }
      return;
  }
}

}  // namespace engram

#endif  // ENGRAM_KERNELS_ROW_DTYPE_H_
