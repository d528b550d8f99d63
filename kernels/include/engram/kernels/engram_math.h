// The Engram module's math, one element or one reduction at a time, as ENGRAM_HD functions: the
// CUDA kernels and the CPU twin both call these, so the two cannot drift apart. Kernels and loops
// decide only which thread or iteration handles which element.
//
// Shapes (row-major, f32): hidden states H and output Y are [B][T][G][D]; gathered embeddings E
// are [B*T][M] (a layer's heads concatenated in head order, dequantized); the fused projection
// P = E * [Wk_0; ...; Wk_{G-1}; Wv]^T + bias is [B*T][(G+1)*D]: branch g's key projection in
// columns [g*D, (g+1)*D), the value projection in the last D.
//
// Per token and branch g (k = key projection, h = H[b,t,g,:]):
//   s  = <RMSNorm1_g(k), RMSNorm2_g(h)> / sqrt(D)   with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w
//   a  = sigmoid(sign(s) * sqrt(max(|s|, 1e-6)))
//   V  = a * v
// ShortConv over T, per channel c = g*D + d: RMSNorm_g (eps 1e-5) of V over D, a depthwise causal
// convolution with kernel 4 and dilation max_ngram (zero history before t = 0), then SiLU.
//   Y  = V + ShortConv(V)
#ifndef ENGRAM_KERNELS_ENGRAM_MATH_H_
#define ENGRAM_KERNELS_ENGRAM_MATH_H_

#include <cmath>
#include <cstdint>

#include "engram/kernels/row_dtype.h"

namespace engram::kernels {

inline constexpr float kGateScoreFloor = 1e-6f;
inline constexpr float kShortConvNormEps = 1e-5f;
inline constexpr int kShortConvTaps = 4;
// RMSNorm1/RMSNorm2 use the compute type's machine epsilon (f32 here), as PyTorch's RMSNorm does
// when given no eps.
inline constexpr float kF32Epsilon = 1.1920928955078125e-07f;

// One element of a row (the dequantize step for thread-per-element kernels): element j of a row
// of `dim` elements.
ENGRAM_HD inline float DecodeElement(const uint8_t* row, int dim, RowDtype dtype, int j) {
  switch (dtype) {
    case RowDtype::kF32: {
      uint32_t u = 0;
      for (int k = 0; k < 4; ++k) u |= static_cast<uint32_t>(row[4 * j + k]) << (8 * k);
      return BitsToFloat(u);
    }
    case RowDtype::kBf16:
      return Bf16ToFloat(static_cast<uint16_t>(row[2 * j] | (row[2 * j + 1] << 8)));
    case RowDtype::kF16:
      return F16ToFloat(static_cast<uint16_t>(row[2 * j] | (row[2 * j + 1] << 8)));
    case RowDtype::kFp8E4m3Ue8m0x32:
      return E4m3ToFloat(row[j]) * Ue8m0ToScale(row[dim + j / kFp8BlockSize]);
  }
  return 0.0f;
}

// 1 / sqrt(mean of squares + eps): the RMSNorm scale of a vector of n elements.
ENGRAM_HD inline float RmsScale(float sum_of_squares, int n, float eps) {
  return 1.0f / sqrtf(sum_of_squares / static_cast<float>(n) + eps);
}

// The three sums the gate of one (token, branch) needs, accumulated element by element (in any
// order and split across any number of threads: partial sums add).
struct GateSums {
  float key_squares = 0.0f;    // sum k_i^2
  float query_squares = 0.0f;  // sum h_i^2
  float weighted_dot = 0.0f;   // sum k_i * w1_i * h_i * w2_i
};

ENGRAM_HD inline void GateAccumulate(float k, float h, float w1, float w2, GateSums* sums) {
  sums->key_squares += k * k;
  sums->query_squares += h * h;
  sums->weighted_dot += (k * w1) * (h * w2);
}

ENGRAM_HD inline GateSums GateSumsAdd(GateSums a, const GateSums& b) {
  a.key_squares += b.key_squares;
  a.query_squares += b.query_squares;
  a.weighted_dot += b.weighted_dot;
  return a;
}

ENGRAM_HD inline float Sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

ENGRAM_HD inline float SiLU(float x) { return x * Sigmoid(x); }

// The gate a in (0, 1) from the sums over the D elements of one (token, branch).
ENGRAM_HD inline float GateFromSums(const GateSums& sums, int d, float eps) {
  const float score = sums.weighted_dot * RmsScale(sums.key_squares, d, eps) * RmsScale(sums.query_squares, d, eps) /
                      sqrtf(static_cast<float>(d));
  const float magnitude = sqrtf(fmaxf(fabsf(score), kGateScoreFloor));
  const float signed_root = score > 0.0f ? magnitude : (score < 0.0f ? -magnitude : 0.0f);
  return Sigmoid(signed_root);
}

// ShortConv at time t of one channel: `normed(t')` is the RMS-normed value of that channel at
// t' (only called for 0 <= t' <= t), `taps` the channel's kernel_size weights (PyTorch Conv1d
// order: the last tap multiplies time t). Returns the convolution before SiLU.
template <typename NormedAt>
ENGRAM_HD inline float ShortConvAt(int t, int dilation, const float* taps, NormedAt normed) {
  float acc = 0.0f;
  for (int k = 0; k < kShortConvTaps; ++k) {
    const int source = t - (kShortConvTaps - 1 - k) * dilation;
    if (source >= 0) acc += taps[k] * normed(source);
  }
  return acc;
}

// One output element: the gated value plus the activated convolution.
ENGRAM_HD inline float FuseOutput(float gated_value, float conv) { return gated_value + SiLU(conv); }

// ---- DeepSeek-V4.1's module (no ShortConv) -------------------------------------------------
// One fused projection kv = W_kv * E [(K+1)*D] gives a key per hyper-connection stream k
// (columns [k*D, (k+1)*D)) and one value shared by every stream (the last D). Per token and
// stream, with h = H[t, k, :]:
//   d   = <RMSNorm(key_k) * k_weight[k], RMSNorm(h) * q_weight[k]> / sqrt(D)   (eps: the config's)
//   g_k = sigmoid(sign(d) * sqrt(max(|d|, 1e-6))),  0 at a dead position (token id -1)
//   h  <- h + g_k * v
// The sums are GateSums with (key, h, k_weight, q_weight): the same reduction as the demo's gate.

ENGRAM_HD inline float Dsv41Gate(const GateSums& sums, int d, float eps, bool dead) {
  return dead ? 0.0f : GateFromSums(sums, d, eps);
}

ENGRAM_HD inline float Dsv41Update(float h, float gate, float value) { return h + gate * value; }

// A block-quantized weight matrix's element: E4M3 byte times the E8M0 scale of its 32x32 block
// (scales [ceil(rows/32)][ceil(cols/32)], row-major).
ENGRAM_HD inline float BlockQuantizedWeight(uint8_t value, const uint8_t* scales, int64_t scale_cols, int64_t row,
                                            int64_t col) {
  return E4m3ToFloat(value) * Ue8m0ToScale(scales[(row / kFp8BlockSize) * scale_cols + col / kFp8BlockSize]);
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_ENGRAM_MATH_H_
