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

}  // namespace engram::kernels
