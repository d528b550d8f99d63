// EngramLayer's CUDA path: weights on the device, rows staged through pinned host memory onto the
// caller's stream, then dequantize, one cuBLAS GEMM for every projection, gate, ShortConv + fuse.
#include "client/engram_layer_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "engram/kernels/cuda_kernels.h"

namespace engram {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

absl::Status Launched(int code, const char* kernel) { return CudaStatus(static_cast<cudaError_t>(code), kernel); }

// A device allocation that grows (never shrinks) as batches need.
template <typename T>
class DeviceArray {
 public:
  ~DeviceArray() {
    if (data_ != nullptr) cudaFree(data_);
  }
  absl::Status Reserve(size_t n) {
    if (n <= capacity_) return absl::OkStatus();
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr;
    capacity_ = 0;
    if (absl::Status s = CudaStatus(cudaMalloc(&data_, n * sizeof(T)), "cudaMalloc"); !s.ok()) return s;
    capacity_ = n;
    return absl::OkStatus();
  }
  absl::Status Upload(const std::vector<T>& host) {
    if (absl::Status s = Reserve(host.size()); !s.ok()) return s;
    return CudaStatus(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
  }
  T* get() const { return data_; }

 private:
  T* data_ = nullptr;
  size_t capacity_ = 0;
};

// Host bytes (rows, masks) onto the device on the caller's stream through one pinned buffer, which
// is reused only after the previous copy out of it has finished.
class RowStaging {
 public:
  ~RowStaging() {
    if (staging_ != nullptr) {
      cudaEventSynchronize(staging_free_);
      cudaFreeHost(staging_);
    }
    if (staging_free_ != nullptr) cudaEventDestroy(staging_free_);
  }
  absl::Status Init() {
    return CudaStatus(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming), "cudaEventCreate");
  }
  // The concatenation of `parts` on the device (valid on `stream` from now on).
  absl::StatusOr<uint8_t*> Stage(std::initializer_list<absl::Span<const uint8_t>> parts, cudaStream_t stream) {
    size_t bytes = 0;
    for (const auto& p : parts) bytes += p.size();
    if (absl::Status s = CudaStatus(cudaEventSynchronize(staging_free_), "waiting for the staging buffer"); !s.ok()) {
      return s;
    }
    if (bytes > staging_bytes_) {
      if (staging_ != nullptr) cudaFreeHost(staging_);
      staging_ = nullptr;
      staging_bytes_ = 0;
      if (absl::Status s = CudaStatus(cudaHostAlloc(&staging_, bytes, cudaHostAllocDefault), "cudaHostAlloc"); !s.ok()) {
        return s;
      }
      staging_bytes_ = bytes;
    }
    size_t at = 0;
    for (const auto& p : parts) {
      if (!p.empty()) std::memcpy(static_cast<uint8_t*>(staging_) + at, p.data(), p.size());
      at += p.size();
    }
    if (absl::Status s = device_.Reserve(std::max<size_t>(bytes, 1)); !s.ok()) return s;
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(device_.get(), staging_, bytes, cudaMemcpyHostToDevice, stream),
                                    "copying rows to the device");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaEventRecord(staging_free_, stream), "cudaEventRecord"); !s.ok()) return s;
    return device_.get();
  }

 private:
  cudaEvent_t staging_free_ = nullptr;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  DeviceArray<uint8_t> device_;
};

class EngramLayerCudaImpl final : public EngramLayerCuda {
 public:
  ~EngramLayerCudaImpl() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
  }

  absl::Status Init(const kernels::EngramWeights& w, RowDtype dtype, int row_dim) {
    weights_ = w;
    dtype_ = dtype;
    row_dim_ = row_dim;
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) return absl::InternalError("cublasCreate failed");
    if (absl::Status s = staging_.Init(); !s.ok()) return s;
    for (auto [device, host] : {std::pair{&projection_, &w.projection}, {&bias_, &w.projection_bias},
                                {&key_norm_, &w.key_norm}, {&query_norm_, &w.query_norm},
                                {&conv_norm_, &w.conv_norm}, {&conv_taps_, &w.conv_taps}}) {
      if (absl::Status s = device->Upload(*host); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status Forward(absl::Span<const uint8_t> rows, int64_t n_rows, const kernels::ForwardShape& shape,
                       absl::Span<const float> hidden, absl::Span<float> out, void* stream_ptr) override {
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    const int G = weights_.branches, D = weights_.hidden, M = weights_.embed;
    const int64_t tokens = static_cast<int64_t>(shape.batch) * shape.seq_len;
    const int64_t width = static_cast<int64_t>(G + 1) * D;
    if (hidden.size() != static_cast<size_t>(tokens * G * D) || out.size() != hidden.size()) {
      return absl::InvalidArgumentError(absl::StrCat("hidden states and output must hold ", tokens * G * D, " values"));
    }
    for (absl::Status s : {embeddings_.Reserve(static_cast<size_t>(tokens * M)),
                           projected_.Reserve(static_cast<size_t>(tokens * width)),
                           gated_.Reserve(static_cast<size_t>(tokens * G * D)),
                           conv_scale_.Reserve(static_cast<size_t>(tokens * G))}) {
      if (!s.ok()) return s;
    }
    auto raw = staging_.Stage({rows}, stream);
    if (!raw.ok()) return raw.status();
    if (absl::Status s = Launched(kernels::cuda::Dequantize(*raw, n_rows, row_dim_, dtype_, embeddings_.get(),
                                                            stream),
                                  "dequantize kernel");
        !s.ok()) {
      return s;
    }
    // Row-major P[tokens][width] = E[tokens][M] * W[width][M]^T, in cuBLAS's column-major terms.
    const float one = 1.0f, zero = 0.0f;
    cublasSetStream(blas_, stream);
    if (cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(width), static_cast<int>(tokens), M, &one,
                    projection_.get(), M, embeddings_.get(), M, &zero, projected_.get(),
                    static_cast<int>(width)) != CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError("cublasSgemm failed for the key/value projections");
    }
    if (absl::Status s = Launched(kernels::cuda::GateAndValue(projected_.get(), bias_.get(), hidden.data(),
                                                              key_norm_.get(), query_norm_.get(), tokens, G, D,
                                                              gated_.get(), conv_scale_.get(), stream),
                                  "gate kernel");
        !s.ok()) {
      return s;
    }
    return Launched(kernels::cuda::ShortConvFuse(gated_.get(), conv_scale_.get(), conv_norm_.get(), conv_taps_.get(),
                                                 shape.batch, shape.seq_len, G, D, shape.dilation, out.data(), stream),
                    "ShortConv kernel");
  }

  absl::Status ForwardHostBuffers(absl::Span<const uint8_t> rows, int64_t n_rows, const kernels::ForwardShape& shape,
                                  absl::Span<const float> hidden, absl::Span<float> out) override {
    if (absl::Status s = host_in_.Reserve(hidden.size()); !s.ok()) return s;
    if (absl::Status s = host_out_.Reserve(out.size()); !s.ok()) return s;
    if (absl::Status s = CudaStatus(cudaMemcpy(host_in_.get(), hidden.data(), hidden.size() * 4, cudaMemcpyHostToDevice),
                                    "copying hidden states to the device");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = Forward(rows, n_rows, shape, absl::Span<const float>(host_in_.get(), hidden.size()),
                                 absl::Span<float>(host_out_.get(), out.size()), nullptr);
        !s.ok()) {
      return s;
    }
    return CudaStatus(cudaMemcpy(out.data(), host_out_.get(), out.size() * 4, cudaMemcpyDeviceToHost),
                      "copying the output back");
  }

 private:
  DeviceArray<float> host_in_, host_out_;  // device copies for ForwardHostBuffers
  kernels::EngramWeights weights_;
  RowDtype dtype_ = RowDtype::kBf16;
  int row_dim_ = 0;
  cublasHandle_t blas_ = nullptr;
  RowStaging staging_;
  DeviceArray<float> projection_, bias_, key_norm_, query_norm_, conv_norm_, conv_taps_;
  DeviceArray<float> embeddings_, projected_, gated_, conv_scale_;
};

// DeepSeek-V4.1: dequantize the rows, kv = W_kv E (one cuBLAS GEMM), then gate and update every
// stream in one kernel.
class Dsv41LayerCudaImpl final : public EngramLayerCuda {
 public:
  ~Dsv41LayerCudaImpl() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
  }

  absl::Status Init(const kernels::Dsv41Weights& w, RowDtype dtype, int row_dim) {
    streams_ = w.streams;
    hidden_ = w.hidden;
    embed_ = w.embed;
    eps_ = w.eps;
    dtype_ = dtype;
    row_dim_ = row_dim;
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) return absl::InternalError("cublasCreate failed");
    if (absl::Status s = staging_.Init(); !s.ok()) return s;
    for (auto [device, host] : {std::pair{&wkv_, &w.wkv}, {&q_weight_, &w.q_weight}, {&k_weight_, &w.k_weight}}) {
      if (absl::Status s = device->Upload(*host); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

  absl::Status ForwardDsv41(absl::Span<const uint8_t> rows, int64_t n_rows, absl::Span<const uint8_t> dead,
                            const void* hidden, void* out, size_t values, bool bf16_streams, void* stream_ptr,
                            bool host_buffers) override {
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    const int64_t tokens = static_cast<int64_t>(dead.size());
    const int64_t width = static_cast<int64_t>(streams_ + 1) * hidden_;
    const size_t element_bytes = bf16_streams ? 2 : 4;
    if (values != static_cast<size_t>(tokens * streams_ * hidden_)) {
      return absl::InvalidArgumentError(absl::StrCat("hidden states must hold ", tokens * streams_ * hidden_, " values"));
    }
    const void* in = hidden;
    void* dst = out;
    if (host_buffers) {
      if (absl::Status s = host_streams_.Reserve(values * element_bytes); !s.ok()) return s;
      if (absl::Status s = CudaStatus(cudaMemcpy(host_streams_.get(), hidden, values * element_bytes,
                                                 cudaMemcpyHostToDevice),
                                      "copying hidden states to the device");
          !s.ok()) {
        return s;
      }
      in = dst = host_streams_.get();
    }
    for (absl::Status s : {embeddings_.Reserve(static_cast<size_t>(tokens * embed_)),
                           projected_.Reserve(static_cast<size_t>(tokens * width))}) {
      if (!s.ok()) return s;
    }
    auto staged = staging_.Stage({rows, dead}, stream);
    if (!staged.ok()) return staged.status();
    const uint8_t* dead_device = *staged + rows.size();
    if (absl::Status s = Launched(kernels::cuda::Dequantize(*staged, n_rows, row_dim_, dtype_, embeddings_.get(),
                                                            stream),
                                  "dequantize kernel");
        !s.ok()) {
      return s;
    }
    const float one = 1.0f, zero = 0.0f;
    cublasSetStream(blas_, stream);
    if (cublasSgemm(blas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(width), static_cast<int>(tokens), embed_, &one,
                    wkv_.get(), embed_, embeddings_.get(), embed_, &zero, projected_.get(),
                    static_cast<int>(width)) != CUBLAS_STATUS_SUCCESS) {
      return absl::InternalError("cublasSgemm failed for the wkv projection");
    }
    if (absl::Status s = Launched(kernels::cuda::Dsv41GateUpdate(projected_.get(), in, k_weight_.get(),
                                                                 q_weight_.get(), dead_device, tokens, streams_,
                                                                 hidden_, eps_, bf16_streams, dst, stream),
                                  "V4.1 gate kernel");
        !s.ok()) {
      return s;
    }
    if (!host_buffers) return absl::OkStatus();
    return CudaStatus(cudaMemcpy(out, host_streams_.get(), values * element_bytes, cudaMemcpyDeviceToHost),
                      "copying the streams back");
  }

 private:
  int streams_ = 0, hidden_ = 0, embed_ = 0;
  float eps_ = 0.0f;
  RowDtype dtype_ = RowDtype::kBf16;
  int row_dim_ = 0;
  cublasHandle_t blas_ = nullptr;
  RowStaging staging_;
  DeviceArray<float> wkv_, q_weight_, k_weight_;
  DeviceArray<float> embeddings_, projected_;
  DeviceArray<uint8_t> host_streams_;  // device copy of the streams for host buffers
};

absl::Status HaveDevice() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", e != cudaSuccess ? cudaGetErrorString(e) : "none found"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::CreateDsv41(const kernels::Dsv41Weights& weights,
                                                                              RowDtype dtype, int row_dim) {
  if (absl::Status s = HaveDevice(); !s.ok()) return s;
  auto layer = std::make_unique<Dsv41LayerCudaImpl>();
  if (absl::Status s = layer->Init(weights, dtype, row_dim); !s.ok()) return s;
  return std::unique_ptr<EngramLayerCuda>(std::move(layer));
}

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::Create(const kernels::EngramWeights& weights,
                                                                         RowDtype dtype, int row_dim) {
  if (absl::Status s = HaveDevice(); !s.ok()) return s;
  auto layer = std::make_unique<EngramLayerCudaImpl>();
  if (absl::Status s = layer->Init(weights, dtype, row_dim); !s.ok()) return s;
  return std::unique_ptr<EngramLayerCuda>(std::move(layer));
}

}  // namespace engram
