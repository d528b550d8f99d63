#include "engram/kernels/cpu_twin.h"

#include <cblas.h>

#include <mutex>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "engram/kernels/engram_math.h"

namespace engram::kernels {
namespace {

absl::Status CheckSize(const char* name, size_t actual, size_t expected) {
  if (actual == expected) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name, " has ", actual, " values; ", expected, " expected"));
}

// OpenBLAS's thread count is process-wide and must not change under a running sgemm on another
// thread: the first call sets it, later calls keep it.
void SetBlasThreads(int threads) {
  static std::once_flag once;
  std::call_once(once, [threads] { openblas_set_num_threads(threads); });
}

}  // namespace

absl::Status EngramWeights::Validate() const {
  if (branches < 1 || hidden < 1 || embed < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("weights need branches, hidden and embed >= 1 (have ", branches, ", ", hidden, ", ", embed, ")"));
  }
  const size_t g = static_cast<size_t>(branches), d = static_cast<size_t>(hidden), m = static_cast<size_t>(embed);
  if (absl::Status s = CheckSize("projection", projection.size(), (g + 1) * d * m); !s.ok()) return s;
  if (absl::Status s = CheckSize("projection_bias", projection_bias.size(), (g + 1) * d); !s.ok()) return s;
  if (absl::Status s = CheckSize("key_norm", key_norm.size(), g * d); !s.ok()) return s;
  if (absl::Status s = CheckSize("query_norm", query_norm.size(), g * d); !s.ok()) return s;
  if (absl::Status s = CheckSize("conv_norm", conv_norm.size(), g * d); !s.ok()) return s;
  return CheckSize("conv_taps", conv_taps.size(), g * d * kShortConvTaps);
}

void DequantizeRows(const uint8_t* rows, int64_t n_rows, int dim, RowDtype dtype, float* out, int threads) {
  const int64_t row_bytes = RowBytesFor(dtype, dim);
  ParallelFor(n_rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) DecodeRow(rows + r * row_bytes, dim, dtype, out + r * dim);
  });
}

absl::Status EngramForwardCpu(const EngramWeights& w, const ForwardShape& shape, absl::Span<const float> embeddings,
                              absl::Span<const float> hidden, absl::Span<float> out, int threads) {
  if (absl::Status s = w.Validate(); !s.ok()) return s;
  if (shape.batch < 1 || shape.seq_len < 1 || shape.dilation < 1) {
    return absl::InvalidArgumentError(absl::StrCat("shape B=", shape.batch, " T=", shape.seq_len, " dilation=",
                                                   shape.dilation, ": each must be at least 1"));
  }
  const int G = w.branches, D = w.hidden, M = w.embed, T = shape.seq_len;
  const int64_t tokens = static_cast<int64_t>(shape.batch) * T;
  const int64_t width = static_cast<int64_t>(G + 1) * D;  // projection columns
  if (absl::Status s = CheckSize("embeddings", embeddings.size(), tokens * M); !s.ok()) return s;
  if (absl::Status s = CheckSize("hidden states", hidden.size(), tokens * G * D); !s.ok()) return s;
  if (absl::Status s = CheckSize("output", out.size(), tokens * G * D); !s.ok()) return s;
  threads = std::max(1, threads);

  // P = E W^T (keys of every branch and the value in one GEMM); the bias is added below.
  thread_local std::vector<float> projected, gated, conv_scale;
  projected.resize(static_cast<size_t>(tokens * width));
  gated.resize(static_cast<size_t>(tokens * G * D));
  conv_scale.resize(static_cast<size_t>(tokens * G));
  SetBlasThreads(threads);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens), static_cast<int>(width), M, 1.0f,
              embeddings.data(), M, w.projection.data(), M, 0.0f, projected.data(), static_cast<int>(width));

  // Gate every (token, branch); V = a * v; and the RMS scale ShortConv's norm will need.
  float* P = projected.data();
  float* V = gated.data();
  float* R = conv_scale.data();
  const float* bias = w.projection_bias.data();
  ParallelFor(tokens, threads, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      float* p = P + bt * width;
      for (int64_t c = 0; c < width; ++c) p[c] += bias[c];
      const float* value = p + static_cast<int64_t>(G) * D;
      for (int g = 0; g < G; ++g) {
        const float* key = p + static_cast<int64_t>(g) * D;
        const float* h = hidden.data() + (bt * G + g) * D;
        const float* w1 = w.key_norm.data() + static_cast<int64_t>(g) * D;
        const float* w2 = w.query_norm.data() + static_cast<int64_t>(g) * D;
        GateSums sums;
        for (int d = 0; d < D; ++d) GateAccumulate(key[d], h[d], w1[d], w2[d], &sums);
        const float a = GateFromSums(sums, D, kF32Epsilon);
        float* v = V + (bt * G + g) * D;
        float squares = 0.0f;
        for (int d = 0; d < D; ++d) {
          v[d] = a * value[d];
          squares += v[d] * v[d];
        }
        R[bt * G + g] = RmsScale(squares, D, kShortConvNormEps);
      }
    }
  });

  // Y = V + SiLU(causal depthwise conv of the normed V).
  const int dilation = shape.dilation;
  ParallelFor(tokens, threads, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T;
      const int t = static_cast<int>(bt % T);
      for (int g = 0; g < G; ++g) {
        const float* norm_w = w.conv_norm.data() + static_cast<int64_t>(g) * D;
        for (int d = 0; d < D; ++d) {
          const int64_t c = static_cast<int64_t>(g) * D + d;
          const float conv = ShortConvAt(t, dilation, w.conv_taps.data() + c * kShortConvTaps, [&](int source) {
            const int64_t at = (b * T + source) * G + g;
            return V[at * D + d] * R[at] * norm_w[d];
          });
          const int64_t i = (bt * G + g) * D + d;
          out[static_cast<size_t>(i)] = FuseOutput(V[i], conv);
        }
      }
    }
  });
  return absl::OkStatus();
}

absl::Status Dsv41Weights::Validate() const {
  if (streams < 1 || hidden < 1 || embed < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("V4.1 weights need streams, hidden and embed >= 1 (have ", streams, ", ", hidden, ", ", embed, ")"));
  }
  if (!(eps >= 0.0f) || !std::isfinite(eps)) {
    return absl::InvalidArgumentError(absl::StrCat("rms_norm_eps ", eps, " is not a finite number >= 0"));
  }
  const size_t k = static_cast<size_t>(streams), d = static_cast<size_t>(hidden), m = static_cast<size_t>(embed);
  if (absl::Status s = CheckSize("wkv", wkv.size(), (k + 1) * d * m); !s.ok()) return s;
  if (absl::Status s = CheckSize("q_weight", q_weight.size(), k * d); !s.ok()) return s;
  return CheckSize("k_weight", k_weight.size(), k * d);
}

void DequantizeBlockFp8(const uint8_t* values, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        int threads) {
  const int64_t scale_cols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  ParallelFor(rows, threads, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        out[r * cols + c] = BlockQuantizedWeight(values[r * cols + c], scales, scale_cols, r, c);
      }
    }
  });
}

namespace {

inline float LoadStream(float x) { return x; }
inline float LoadStream(uint16_t x) { return Bf16ToFloat(x); }
inline void StoreStream(float x, float* to) { *to = x; }
inline void StoreStream(float x, uint16_t* to) { *to = FloatToBf16(x); }

template <typename Stream>
absl::Status Dsv41Forward(const Dsv41Weights& w, int64_t tokens, absl::Span<const float> embeddings,
                          absl::Span<const uint8_t> dead, absl::Span<const Stream> hidden, absl::Span<Stream> out,
                          int threads) {
  if (absl::Status s = w.Validate(); !s.ok()) return s;
  if (tokens < 1) return absl::InvalidArgumentError(absl::StrCat(tokens, " tokens: at least 1 needed"));
  const int K = w.streams, D = w.hidden, M = w.embed;
  const int64_t width = static_cast<int64_t>(K + 1) * D;
  if (absl::Status s = CheckSize("embeddings", embeddings.size(), tokens * M); !s.ok()) return s;
  if (absl::Status s = CheckSize("dead-position mask", dead.size(), tokens); !s.ok()) return s;
  if (absl::Status s = CheckSize("hidden states", hidden.size(), tokens * K * D); !s.ok()) return s;
  if (absl::Status s = CheckSize("output", out.size(), tokens * K * D); !s.ok()) return s;
  threads = std::max(1, threads);

  // kv = E W^T: every key and the value in one GEMM.
  thread_local std::vector<float> projected;
  projected.resize(static_cast<size_t>(tokens * width));
  SetBlasThreads(threads);
  if (tokens == 1) {
    // Decode of one sequence: a matrix-vector product, which OpenBLAS's sgemm (0.3.21) does not
    // route to its faster gemv by itself; the call reads the whole projection once either way.
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(width), M, 1.0f, w.wkv.data(), M, embeddings.data(), 1,
                0.0f, projected.data(), 1);
  } else {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens), static_cast<int>(width), M, 1.0f,
                embeddings.data(), M, w.wkv.data(), M, 0.0f, projected.data(), static_cast<int>(width));
  }

  const float* P = projected.data();
  ParallelFor(tokens, threads, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* kv = P + t * width;
      const float* value = kv + static_cast<int64_t>(K) * D;
      for (int k = 0; k < K; ++k) {
        const float* key = kv + static_cast<int64_t>(k) * D;
        const Stream* h = hidden.data() + (t * K + k) * D;
        const float* kw = w.k_weight.data() + static_cast<int64_t>(k) * D;
        const float* qw = w.q_weight.data() + static_cast<int64_t>(k) * D;
        GateSums sums;
        for (int d = 0; d < D; ++d) GateAccumulate(key[d], LoadStream(h[d]), kw[d], qw[d], &sums);
        const float g = Dsv41Gate(sums, D, w.eps, dead[static_cast<size_t>(t)] != 0);
        Stream* o = out.data() + (t * K + k) * D;
        for (int d = 0; d < D; ++d) StoreStream(Dsv41Update(LoadStream(h[d]), g, value[d]), &o[d]);
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace

absl::Status Dsv41ForwardCpu(const Dsv41Weights& weights, int64_t tokens, absl::Span<const float> embeddings,
                             absl::Span<const uint8_t> dead, absl::Span<const float> hidden, absl::Span<float> out,
                             int threads) {
  return Dsv41Forward<float>(weights, tokens, embeddings, dead, hidden, out, threads);
}

absl::Status Dsv41ForwardCpu(const Dsv41Weights& weights, int64_t tokens, absl::Span<const float> embeddings,
                             absl::Span<const uint8_t> dead, absl::Span<const uint16_t> hidden_bf16,
                             absl::Span<uint16_t> out_bf16, int threads) {
  return Dsv41Forward<uint16_t>(weights, tokens, embeddings, dead, hidden_bf16, out_bf16, threads);
}

}  // namespace engram::kernels
