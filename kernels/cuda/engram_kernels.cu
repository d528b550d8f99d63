// The Engram CUDA kernels. Thread mapping only: the arithmetic is engram_math.h / row_dtype.h.
#include <cuda_runtime.h>

#include "engram/kernels/cuda_kernels.h"
#include "engram/kernels/engram_math.h"
#include "engram/kernels/hbm_probe.h"
#include "engram/kernels/row_copy.h"

namespace engram::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline GateSums WarpReduce(GateSums s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.key_squares += __shfl_down_sync(0xffffffffu, s.key_squares, offset);
    s.query_squares += __shfl_down_sync(0xffffffffu, s.query_squares, offset);
    s.weighted_dot += __shfl_down_sync(0xffffffffu, s.weighted_dot, offset);
  }
  return s;
}

// Sums across the block; every thread gets the total.
__device__ GateSums BlockReduce(GateSums s) {
  __shared__ GateSums partial[kThreads / 32];
  __shared__ GateSums total;
  s = WarpReduce(s);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  if (warp == 0) {
    GateSums t = lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : GateSums{};
    t = WarpReduce(t);
    if (lane == 0) total = t;
  }
  __syncthreads();
  return total;
}

// One warp per row, in the widest words the rows' alignment allows (row_copy.h).
__global__ void GatherRowsKernel(const uint8_t* __restrict__ table, int64_t row_bytes, const uint64_t* __restrict__ rows,
                                 int64_t n, uint8_t* __restrict__ out, int width) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n) return;
  CopyRowLaneAnyWidth(width, table + rows[warp] * row_bytes, out + warp * row_bytes, row_bytes, lane, 32);
}

__global__ void GatherHbmRowsKernel(const uint8_t* __restrict__ slots, const uint8_t* __restrict__ staged,
                                    int64_t row_bytes, const uint32_t* __restrict__ sources, int64_t n,
                                    uint8_t* __restrict__ out, int width) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n) return;
  CopyRowLaneAnyWidth(width, HbmRowSource(sources[warp], slots, staged, row_bytes), out + warp * row_bytes, row_bytes,
                      lane, 32);
}

__global__ void GatherDirectRowsKernel(const uint8_t* __restrict__ slots, const uint8_t* __restrict__ host_rows,
                                       int64_t row_bytes, const uint64_t* __restrict__ sources, int64_t n,
                                       uint8_t* __restrict__ out, int width) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n || IsDirectRepeat(sources[warp])) return;  // repeats: the next kernel
  CopyRowLaneAnyWidth(width, DirectRowSource(sources[warp], slots, host_rows, row_bytes), out + warp * row_bytes,
                      row_bytes, lane, 32);
}

// The direct gather's second pass: a repeat copies the output row it names (written by the first).
__global__ void CopyDirectRepeatsKernel(int64_t row_bytes, const uint64_t* __restrict__ sources, int64_t n,
                                        uint8_t* out, int width) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n || !IsDirectRepeat(sources[warp])) return;
  CopyRowLaneAnyWidth(width, out + DirectRepeatOf(sources[warp]) * row_bytes, out + warp * row_bytes, row_bytes, lane,
                      32);
}

// The HBM tier's promotions: packed row i goes to slot slots[i]. One warp per row.
__global__ void ScatterRowsKernel(const uint8_t* __restrict__ packed, int64_t row_bytes,
                                  const uint32_t* __restrict__ slots, int64_t n, uint8_t* __restrict__ dst,
                                  int width) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n) return;
  CopyRowLaneAnyWidth(width, packed + warp * row_bytes, dst + static_cast<int64_t>(slots[warp]) * row_bytes, row_bytes,
                      lane, 32);
}

// The HBM index's changed buckets: keys[buckets[i]] = bucket_keys[i], same for values.
__global__ void ScatterIndexKernel(const uint64_t* __restrict__ buckets, const uint64_t* __restrict__ bucket_keys,
                                   const uint32_t* __restrict__ bucket_values, int64_t n, uint64_t* __restrict__ keys,
                                   uint32_t* __restrict__ values) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  keys[buckets[i]] = bucket_keys[i];
  values[buckets[i]] = bucket_values[i];
}

__global__ void DequantizeKernel(const uint8_t* __restrict__ rows, int64_t n_rows, int dim, int64_t row_bytes,
                                 RowDtype dtype, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_rows * dim) return;
  const int64_t r = i / dim;
  const int j = static_cast<int>(i % dim);
  out[i] = DecodeElement(rows + r * row_bytes, dim, dtype, j);
}

// One block per (token, branch).
__global__ void GateAndValueKernel(const float* __restrict__ projected, const float* __restrict__ bias,
                                   const float* __restrict__ hidden, const float* __restrict__ key_norm,
                                   const float* __restrict__ query_norm, int branches, int d_size,
                                   float* __restrict__ gated, float* __restrict__ conv_scale) {
  const int64_t token = blockIdx.x / branches;
  const int g = static_cast<int>(blockIdx.x % branches);
  const int64_t width = static_cast<int64_t>(branches + 1) * d_size;
  const float* p = projected + token * width;
  const float* h = hidden + (token * branches + g) * d_size;
  GateSums sums;
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    const int64_t c = static_cast<int64_t>(g) * d_size + d;
    GateAccumulate(p[c] + bias[c], h[d], key_norm[c], query_norm[c], &sums);
  }
  const float a = GateFromSums(BlockReduce(sums), d_size, kF32Epsilon);
  float* v = gated + (token * branches + g) * d_size;
  const int64_t value_base = static_cast<int64_t>(branches) * d_size;
  GateSums squares;  // only key_squares used: the sum of V^2 for ShortConv's norm
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    const float value = a * (p[value_base + d] + bias[value_base + d]);
    v[d] = value;
    squares.key_squares += value * value;
  }
  const GateSums total = BlockReduce(squares);
  if (threadIdx.x == 0) conv_scale[token * branches + g] = RmsScale(total.key_squares, d_size, kShortConvNormEps);
}

// One thread per output element.
__global__ void ShortConvFuseKernel(const float* __restrict__ gated, const float* __restrict__ conv_scale,
                                    const float* __restrict__ conv_norm, const float* __restrict__ conv_taps,
                                    int seq_len, int branches, int d_size, int dilation, int64_t n,
                                    float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int d = static_cast<int>(i % d_size);
  const int64_t bt_g = i / d_size;
  const int g = static_cast<int>(bt_g % branches);
  const int64_t bt = bt_g / branches;
  const int64_t b = bt / seq_len;
  const int t = static_cast<int>(bt % seq_len);
  const int64_t c = static_cast<int64_t>(g) * d_size + d;
  const float norm_w = conv_norm[c];
  const float conv = ShortConvAt(t, dilation, conv_taps + c * kShortConvTaps, [&](int source) {
    const int64_t at = (b * seq_len + source) * branches + g;
    return gated[at * d_size + d] * conv_scale[at] * norm_w;
  });
  out[i] = FuseOutput(gated[i], conv);
}

__device__ inline float LoadStream(float x) { return x; }
__device__ inline float LoadStream(uint16_t x) { return Bf16ToFloat(x); }
__device__ inline void StoreStream(float x, float* to) { *to = x; }
__device__ inline void StoreStream(float x, uint16_t* to) { *to = FloatToBf16(x); }

// V4.1: one block per (token, stream). Every thread reads its elements of h in the first loop and
// writes the same elements in the second, so `out` may alias `hidden`.
template <typename Stream>
__global__ void Dsv41GateUpdateKernel(const float* __restrict__ projected, const Stream* hidden,
                                      const float* __restrict__ k_weight, const float* __restrict__ q_weight,
                                      const uint8_t* __restrict__ dead, int streams, int d_size, float eps,
                                      Stream* out) {
  const int64_t token = blockIdx.x / streams;
  const int k = static_cast<int>(blockIdx.x % streams);
  const int64_t width = static_cast<int64_t>(streams + 1) * d_size;
  const float* key = projected + token * width + static_cast<int64_t>(k) * d_size;
  const float* value = projected + token * width + static_cast<int64_t>(streams) * d_size;
  const int64_t base = (token * streams + k) * d_size;
  const float* kw = k_weight + static_cast<int64_t>(k) * d_size;
  const float* qw = q_weight + static_cast<int64_t>(k) * d_size;
  GateSums sums;
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    GateAccumulate(key[d], LoadStream(hidden[base + d]), kw[d], qw[d], &sums);
  }
  const float g = Dsv41Gate(BlockReduce(sums), d_size, eps, dead[token] != 0);
  for (int d = threadIdx.x; d < d_size; d += blockDim.x) {
    StoreStream(Dsv41Update(LoadStream(hidden[base + d]), g, value[d]), &out[base + d]);
  }
}

__global__ void ResidualAddKernel(const float* hidden, const float* y, int64_t n, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = hidden[i] + y[i];
}

unsigned Blocks(int64_t work, int per_block) { return static_cast<unsigned>((work + per_block - 1) / per_block); }

int Launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

int GatherRows(const uint8_t* table, int64_t row_bytes, const uint64_t* rows, int64_t n, uint8_t* out, void* stream) {
  if (n == 0) return 0;
  const int width = RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(out));
  GatherRowsKernel<<<Blocks(n * 32, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table, row_bytes,
                                                                                                rows, n, out, width);
  return Launched();
}

int GatherHbmRows(const uint8_t* slots, const uint8_t* staged, int64_t row_bytes, const uint32_t* sources, int64_t n,
                  uint8_t* out, void* stream) {
  if (n == 0) return 0;
  const int width = RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(slots) | reinterpret_cast<uintptr_t>(staged) |
                                                  reinterpret_cast<uintptr_t>(out));
  GatherHbmRowsKernel<<<Blocks(n * 32, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      slots, staged, row_bytes, sources, n, out, width);
  return Launched();
}

int GatherDirectRows(const uint8_t* slots, const uint8_t* host_rows, int64_t row_bytes, const uint64_t* sources,
                     int64_t n, int64_t repeats, uint8_t* out, void* stream) {
  if (n == 0) return 0;
  const int width = RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(slots) | reinterpret_cast<uintptr_t>(host_rows) |
                                                  reinterpret_cast<uintptr_t>(out));
  GatherDirectRowsKernel<<<Blocks(n * 32, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      slots, host_rows, row_bytes, sources, n, out, width);
  if (repeats == 0) return Launched();
  if (const int err = Launched(); err != 0) return err;
  CopyDirectRepeatsKernel<<<Blocks(n * 32, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      row_bytes, sources, n, out, RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(out)));
  return Launched();
}

int ScatterRows(const uint8_t* packed, int64_t row_bytes, const uint32_t* slots, int64_t n, uint8_t* dst,
                void* stream) {
  if (n == 0) return 0;
  const int width = RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(packed) | reinterpret_cast<uintptr_t>(dst));
  ScatterRowsKernel<<<Blocks(n * 32, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, row_bytes, slots, n, dst, width);
  return Launched();
}

int ScatterIndex(const uint64_t* buckets, const uint64_t* bucket_keys, const uint32_t* bucket_values, int64_t n,
                 uint64_t* keys, uint32_t* values, void* stream) {
  if (n == 0) return 0;
  ScatterIndexKernel<<<Blocks(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      buckets, bucket_keys, bucket_values, n, keys, values);
  return Launched();
}

int Dequantize(const uint8_t* rows, int64_t n_rows, int dim, RowDtype dtype, float* out, void* stream) {
  if (n_rows == 0) return 0;
  DequantizeKernel<<<Blocks(n_rows * dim, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      rows, n_rows, dim, RowBytesFor(dtype, dim), dtype, out);
  return Launched();
}

int GateAndValue(const float* projected, const float* projection_bias, const float* hidden, const float* key_norm,
                 const float* query_norm, int64_t tokens, int branches, int hidden_size, float* gated,
                 float* conv_scale, void* stream) {
  if (tokens == 0) return 0;
  GateAndValueKernel<<<static_cast<unsigned>(tokens * branches), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      projected, projection_bias, hidden, key_norm, query_norm, branches, hidden_size, gated, conv_scale);
  return Launched();
}

int ShortConvFuse(const float* gated, const float* conv_scale, const float* conv_norm, const float* conv_taps,
                  int batch, int seq_len, int branches, int hidden_size, int dilation, float* out, void* stream) {
  const int64_t n = static_cast<int64_t>(batch) * seq_len * branches * hidden_size;
  if (n == 0) return 0;
  ShortConvFuseKernel<<<Blocks(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      gated, conv_scale, conv_norm, conv_taps, seq_len, branches, hidden_size, dilation, n, out);
  return Launched();
}

int Dsv41GateUpdate(const float* projected, const void* hidden, const float* k_weight, const float* q_weight,
                    const uint8_t* dead, int64_t tokens, int streams, int hidden_size, float eps, bool bf16_streams,
                    void* out, void* stream) {
  if (tokens == 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  const auto blocks = static_cast<unsigned>(tokens * streams);
  if (bf16_streams) {
    Dsv41GateUpdateKernel<uint16_t><<<blocks, kThreads, 0, s>>>(projected, static_cast<const uint16_t*>(hidden),
                                                                k_weight, q_weight, dead, streams, hidden_size, eps,
                                                                static_cast<uint16_t*>(out));
  } else {
    Dsv41GateUpdateKernel<float><<<blocks, kThreads, 0, s>>>(projected, static_cast<const float*>(hidden), k_weight,
                                                             q_weight, dead, streams, hidden_size, eps,
                                                             static_cast<float*>(out));
  }
  return Launched();
}

int ResidualAdd(const float* hidden, const float* y, int64_t n, float* out, void* stream) {
  if (n == 0) return 0;
  ResidualAddKernel<<<Blocks(n, kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(hidden, y, n, out);
  return Launched();
}

}  // namespace engram::kernels::cuda
