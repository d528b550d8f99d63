// Launch wrappers of the Engram CUDA kernels (kernels/cuda/engram_kernels.cu). Plain C++ on the
// caller's side: pointers are device pointers (or mapped, pinned host memory where noted), streams
// are cudaStream_t passed as void*, and each wrapper returns the cudaError_t of its launch as an
// int (0: launched). Every kernel's arithmetic is in engram_math.h / row_dtype.h, shared with the
// CPU twin; the kernels only map threads to elements and reduce across a block.
// Built only when the CUDA toolkit is (ENGRAM_HAVE_CUDA).
#ifndef ENGRAM_KERNELS_CUDA_KERNELS_H_
#define ENGRAM_KERNELS_CUDA_KERNELS_H_

#include <cstdint>

#include "engram/kernels/row_dtype.h"

namespace engram::kernels::cuda {

// out[i] = table row rows[i], for i in [0, n). `table` may be device slots or mapped pinned host
// memory (cudaHostRegister'ed, cudaHostGetDevicePointer). In the widest words rows allow (row_copy.h).
int GatherRows(const uint8_t* table, int64_t row_bytes, const uint64_t* rows, int64_t n, uint8_t* out, void* stream);

// out[i] = the row sources[i] names (hbm_probe.h: HbmRowSource): a slot of an HBM tier's `slots`
// or a row of `staged`. Both are device memory (the slots usually mapped from engramd by CUDA IPC).
int GatherHbmRows(const uint8_t* slots, const uint8_t* staged, int64_t row_bytes, const uint32_t* sources, int64_t n,
                  uint8_t* out, void* stream);

// out[i] = the row sources[i] names (hbm_probe.h: DirectRowSource): a slot of `slots` (device
// memory; may be null when no source names one) or a row of `host_rows`, host memory the GPU
// reads over PCIe (a cudaHostRegister'ed mapping, its device pointer). `repeats` sources are
// kDirectRepeat (a row an earlier output row reads): when there are any, a second kernel copies
// them from that row, on the device (hbm_probe.h: ReplayDirectGather is the twin).
int GatherDirectRows(const uint8_t* slots, const uint8_t* host_rows, int64_t row_bytes, const uint64_t* sources,
                     int64_t n, int64_t repeats, uint8_t* out, void* stream);

// The HBM tier's writes (engramd): packed row i (device memory) -> dst slot slots[i]; and the
// index's changed buckets, keys[buckets[i]] = bucket_keys[i], values[buckets[i]] = bucket_values[i].
int ScatterRows(const uint8_t* packed, int64_t row_bytes, const uint32_t* slots, int64_t n, uint8_t* dst,
                void* stream);
int ScatterIndex(const uint64_t* buckets, const uint64_t* bucket_keys, const uint32_t* bucket_values, int64_t n,
                 uint64_t* keys, uint32_t* values, void* stream);

// n_rows rows of `dim` elements (RowBytesFor(dtype, dim) bytes each) -> f32 [n_rows][dim].
int Dequantize(const uint8_t* rows, int64_t n_rows, int dim, RowDtype dtype, float* out, void* stream);

// Per (token, branch): adds the projection bias, gates with RMSNorm1/RMSNorm2 (eps: f32
// epsilon), writes V = a * (value + value bias) [tokens][G][D] and ShortConv's RMS scale of V
// [tokens][G]. `projected` is [tokens][(G+1)*D] (keys of each branch, then the value).
int GateAndValue(const float* projected, const float* projection_bias, const float* hidden, const float* key_norm,
                 const float* query_norm, int64_t tokens, int branches, int hidden_size, float* gated,
                 float* conv_scale, void* stream);

// out = V + SiLU(causal depthwise conv of RMSNorm(V)), [B][T][G][D].
int ShortConvFuse(const float* gated, const float* conv_scale, const float* conv_norm, const float* conv_taps,
                  int batch, int seq_len, int branches, int hidden_size, int dilation, float* out, void* stream);

// DeepSeek-V4.1: per (token, stream) the gate from key k and the stream (RMSNorm eps `eps`, 0 where
// dead[token] != 0), then out = hidden + g * value. `projected` is [tokens][(K+1)*D] (keys, then the
// shared value); hidden and out [tokens][K][D] of f32, or bf16 bits when `bf16_streams`; out may
// alias hidden.
int Dsv41GateUpdate(const float* projected, const void* hidden, const float* k_weight, const float* q_weight,
                    const uint8_t* dead, int64_t tokens, int streams, int hidden_size, float eps, bool bf16_streams,
                    void* out, void* stream);

// out[i] = hidden[i] + y[i]: the block's residual add (out may alias either input).
int ResidualAdd(const float* hidden, const float* y, int64_t n, float* out, void* stream);

}  // namespace engram::kernels::cuda

#endif  // ENGRAM_KERNELS_CUDA_KERNELS_H_
