// EngramLayer's CUDA path: weights on the device, rows staged through pinned host memory onto the
// caller's stream, then dequantize, one cuBLAS GEMM for every projection, gate, ShortConv + fuse.
#include "client/engram_layer_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstring>

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

class EngramLayerCudaImpl final : public EngramLayerCuda {
 public:
  ~EngramLayerCudaImpl() override {
    if (staging_ != nullptr) {
      cudaEventSynchronize(staging_free_);
      cudaFreeHost(staging_);
    }
    if (staging_free_ != nullptr) cudaEventDestroy(staging_free_);
    if (blas_ != nullptr) cublasDestroy(blas_);
  }

  absl::Status Init(const kernels::EngramWeights& w, RowDtype dtype, int row_dim) {
    weights_ = w;
    dtype_ = dtype;
    row_dim_ = row_dim;
    if (cublasCreate(&blas_) != CUBLAS_STATUS_SUCCESS) return absl::InternalError("cublasCreate failed");
    if (absl::Status s = CudaStatus(cudaEventCreateWithFlags(&staging_free_, cudaEventDisableTiming), "cudaEventCreate");
        !s.ok()) {
      return s;
    }
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
    // Stage the rows: into pinned memory (after the previous copy out of it finished), then to the
    // device on the caller's stream.
    if (absl::Status s = CudaStatus(cudaEventSynchronize(staging_free_), "waiting for the staging buffer"); !s.ok()) {
      return s;
    }
    if (rows.size() > staging_bytes_) {
      if (staging_ != nullptr) cudaFreeHost(staging_);
      staging_ = nullptr;
      staging_bytes_ = 0;
      if (absl::Status s = CudaStatus(cudaHostAlloc(&staging_, rows.size(), cudaHostAllocDefault), "cudaHostAlloc");
          !s.ok()) {
        return s;
      }
      staging_bytes_ = rows.size();
    }
    std::memcpy(staging_, rows.data(), rows.size());
    for (absl::Status s : {raw_.Reserve(rows.size()), embeddings_.Reserve(static_cast<size_t>(tokens * M)),
                           projected_.Reserve(static_cast<size_t>(tokens * width)),
                           gated_.Reserve(static_cast<size_t>(tokens * G * D)),
                           conv_scale_.Reserve(static_cast<size_t>(tokens * G))}) {
      if (!s.ok()) return s;
    }
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(raw_.get(), staging_, rows.size(), cudaMemcpyHostToDevice, stream),
                                    "copying rows to the device");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaEventRecord(staging_free_, stream), "cudaEventRecord"); !s.ok()) return s;
    if (absl::Status s = Launched(kernels::cuda::Dequantize(raw_.get(), n_rows, row_dim_, dtype_, embeddings_.get(),
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
  cudaEvent_t staging_free_ = nullptr;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  DeviceArray<float> projection_, bias_, key_norm_, query_norm_, conv_norm_, conv_taps_;
  DeviceArray<uint8_t> raw_;
  DeviceArray<float> embeddings_, projected_, gated_, conv_scale_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::Create(const kernels::EngramWeights& weights,
                                                                         RowDtype dtype, int row_dim) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", e != cudaSuccess ? cudaGetErrorString(e) : "none found"));
  }
  auto layer = std::make_unique<EngramLayerCudaImpl>();
  if (absl::Status s = layer->Init(weights, dtype, row_dim); !s.ok()) return s;
  return std::unique_ptr<EngramLayerCuda>(std::move(layer));
}

}  // namespace engram
