#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "client/device_staging.h"

namespace engram {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

class PinnedStaging final : public DeviceStaging {
 public:
  ~PinnedStaging() override {
    if (done_ != nullptr) cudaEventSynchronize(done_);
    if (buffer_ != nullptr) cudaFreeHost(buffer_);
    if (done_ != nullptr) cudaEventDestroy(done_);
  }
  absl::Status Init() { return CudaStatus(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming), "cudaEventCreate"); }
  absl::StatusOr<absl::Span<uint8_t>> Acquire(uint64_t bytes) override {
    if (absl::Status s = CudaStatus(cudaEventSynchronize(done_), "waiting for the previous copy"); !s.ok()) return s;
    if (bytes > capacity_) {
      if (buffer_ != nullptr) cudaFreeHost(buffer_);
      buffer_ = nullptr;
      capacity_ = 0;
      if (absl::Status s = CudaStatus(cudaHostAlloc(&buffer_, bytes, cudaHostAllocDefault), "cudaHostAlloc"); !s.ok()) {
        return s;
      }
      capacity_ = bytes;
    }
    return absl::Span<uint8_t>(static_cast<uint8_t*>(buffer_), bytes);
  }
  absl::Status CopyToDevice(void* device_out, uint64_t bytes, void* stream) override {
    const auto s = static_cast<cudaStream_t>(stream);
    if (absl::Status st = CudaStatus(cudaMemcpyAsync(device_out, buffer_, bytes, cudaMemcpyHostToDevice, s),
                                     "copying rows to the device");
        !st.ok()) {
      return st;
    }
    return CudaStatus(cudaEventRecord(done_, s), "cudaEventRecord");
  }

 private:
  void* buffer_ = nullptr;
  uint64_t capacity_ = 0;
  cudaEvent_t done_ = nullptr;
};

}  // namespace

absl::StatusOr<std::unique_ptr<DeviceStaging>> DeviceStaging::Create() {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device: ", e != cudaSuccess ? cudaGetErrorString(e) : "none found"));
  }
  auto staging = std::make_unique<PinnedStaging>();
  if (absl::Status s = staging->Init(); !s.ok()) return s;
  return std::unique_ptr<DeviceStaging>(std::move(staging));
}

}  // namespace engram
