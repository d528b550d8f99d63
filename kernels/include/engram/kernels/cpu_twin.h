// The CPU twin of the Engram kernels: dequantize rows and run the module's gating and fusion on
// the host, calling the same ENGRAM_HD functions as the CUDA kernels (engram/kernels/engram_math.h)
// and a BLAS (OpenBLAS from Debian) for the projections. Used by EngramLayer when there is no GPU
// and by the tests everywhere. Functions are thread-compatible; each call may use `threads` threads.
#ifndef ENGRAM_KERNELS_CPU_TWIN_H_
#define ENGRAM_KERNELS_CPU_TWIN_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engram/kernels/engram_math.h"
#include "engram/kernels/row_dtype.h"

namespace engram::kernels {

// The module's parameters in f32, row-major. G branches, hidden size D, embedding width M.
struct EngramWeights {
  int branches = 0;  // G
  int hidden = 0;    // D
  int embed = 0;     // M = heads * per-head dim
  std::vector<float> projection;       // [(G+1)*D][M]: key_projs.0 .. key_projs.{G-1}, then value_proj
  std::vector<float> projection_bias;  // [(G+1)*D]
  std::vector<float> key_norm;         // [G][D]  norm1.{g}.weight
  std::vector<float> query_norm;       // [G][D]  norm2.{g}.weight
  std::vector<float> conv_norm;        // [G][D]  short_conv.norms.{g}.weight
  std::vector<float> conv_taps;        // [G*D][kShortConvTaps]  short_conv.conv.weight

  // Checks every size against G, D, M; InvalidArgument naming the first that is off.
  absl::Status Validate() const;
};

struct ForwardShape {
  int batch = 0;     // B
  int seq_len = 0;   // T
  int dilation = 1;  // ShortConv dilation (the table's max_ngram)
};

// Decodes n_rows rows of `dim` elements each (RowBytesFor(dtype, dim) bytes apart) into f32.
void DequantizeRows(const uint8_t* rows, int64_t n_rows, int dim, RowDtype dtype, float* out, int threads = 1);

// Y = V + ShortConv(V) for embeddings E [B*T][M] and hidden states H [B][T][G][D] (the module's
// output before the block's residual add). `Y` is [B][T][G][D]. `threads` splits the loops; the
// BLAS's own thread count is process-wide and set by the first call.
absl::Status EngramForwardCpu(const EngramWeights& weights, const ForwardShape& shape, absl::Span<const float> embeddings,
                              absl::Span<const float> hidden, absl::Span<float> out, int threads = 1);

// DeepSeek-V4.1's Engram module (engram_math.h, DSV41.md): K streams of hidden size D, embedding
// width M, f32, row-major.
struct Dsv41Weights {
  int streams = 0;  // K (config hc_mult)
  int hidden = 0;   // D (config hidden_size)
  int embed = 0;    // M = heads * per-head dim
  float eps = 0.0f;            // RMSNorm epsilon (config rms_norm_eps)
  std::vector<float> wkv;      // [(K+1)*D][M]: wkv.weight dequantized blockwise (keys 0..K-1, then the value)
  std::vector<float> q_weight;  // [K][D]
  std::vector<float> k_weight;  // [K][D]

  absl::Status Validate() const;
};

// wkv.weight as stored (E4M3 bytes [rows][cols]) and its E8M0 block scales
// ([ceil(rows/32)][ceil(cols/32)]) -> f32 [rows][cols].
void DequantizeBlockFp8(const uint8_t* values, const uint8_t* scales, int64_t rows, int64_t cols, float* out,
                        int threads = 1);

// The updated streams: out[t][k] = H[t][k] + g_k * v for embeddings E [tokens][M], hidden states
// H [tokens][K][D] and `dead` [tokens] (1: the token id is -1, g = 0). `out` may alias `hidden`.
// Streams are f32, or bf16 (uint16_t bits; the update is computed in f32 and rounded to nearest
// even once).
absl::Status Dsv41ForwardCpu(const Dsv41Weights& weights, int64_t tokens, absl::Span<const float> embeddings,
                             absl::Span<const uint8_t> dead, absl::Span<const float> hidden, absl::Span<float> out,
                             int threads = 1);
absl::Status Dsv41ForwardCpu(const Dsv41Weights& weights, int64_t tokens, absl::Span<const float> embeddings,
                             absl::Span<const uint8_t> dead, absl::Span<const uint16_t> hidden_bf16,
                             absl::Span<uint16_t> out_bf16, int threads = 1);

// Runs fn(begin, end) over [0, n) split into about `threads` contiguous parts, on this thread and
// threads - 1 others.
template <typename Fn>
void ParallelFor(int64_t n, int threads, Fn fn);

}  // namespace engram::kernels

#include "engram/kernels/parallel_for.h"

#endif  // ENGRAM_KERNELS_CPU_TWIN_H_
