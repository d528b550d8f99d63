#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/device_staging.h"
#include "engram/kernels/cuda_kernels.h"
#include "engram/shm_client.h"

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
    if (scratch_ != nullptr) cudaFree(scratch_);
    for (const auto& [handle, pointer] : opened_) cudaIpcCloseMemHandle(pointer);
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

  void Quiesce() override { cudaEventSynchronize(done_); }

  absl::Status GatherThroughHbm(MappedTable* table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                void* device_out, void* stream) override {
    const shm::HbmLayer* hbm = table->hbm_layer(layer);
    if (hbm == nullptr || hbm->kind != static_cast<uint32_t>(shm::HbmKind::kCuda)) {
      return absl::FailedPreconditionError("no GPU HBM tier on this layer");
    }
    int device = -1;
    if (absl::Status s = CudaStatus(cudaGetDevice(&device), "cudaGetDevice"); !s.ok()) return s;
    if (device != hbm->device) {
      return absl::FailedPreconditionError(
          absl::StrCat("the HBM tier is on GPU ", hbm->device, ", this thread's device is ", device));
    }
    // The tier's slots, mapped into this process once per export.
    const std::string key(hbm->ipc_slots, sizeof(hbm->ipc_slots));
    void* slots = nullptr;
    if (auto it = opened_.find(key); it != opened_.end()) {
      slots = it->second;
    } else {
      cudaIpcMemHandle_t handle;
      static_assert(sizeof(handle) == sizeof(hbm->ipc_slots));
      std::memcpy(&handle, hbm->ipc_slots, sizeof(handle));
      if (absl::Status s = CudaStatus(cudaIpcOpenMemHandle(&slots, handle, cudaIpcMemLazyEnablePeerAccess),
                                      "opening the HBM tier's slots");
          !s.ok()) {
        return absl::FailedPreconditionError(s.message());
      }
      opened_[key] = slots;
    }
    // Pinned: [sources: n uint32, padded to 256 bytes][staged rows]; the same layout on the device.
    const uint64_t n = indices.size();
    const uint64_t row_bytes = hbm->row_bytes;
    const uint64_t sources_bytes = (n * 4 + 255) / 256 * 256;
    const uint64_t bytes = sources_bytes + n * row_bytes;
    auto buffer = Acquire(bytes);
    if (!buffer.ok()) return buffer.status();
    if (bytes > scratch_bytes_) {
      if (scratch_ != nullptr) cudaFree(scratch_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      if (absl::Status s = CudaStatus(cudaMalloc(&scratch_, bytes), "cudaMalloc"); !s.ok()) return s;
      scratch_bytes_ = bytes;
    }
    auto* sources = reinterpret_cast<uint32_t*>(buffer->data());
    auto pin = table->SplitForDevice(layer, num_tokens, indices, sources, buffer->data() + sources_bytes);
    if (!pin.ok()) return pin.status();
    const auto s = static_cast<cudaStream_t>(stream);
    auto* scratch = static_cast<uint8_t*>(scratch_);
    absl::Status status = CudaStatus(
        cudaMemcpyAsync(scratch, buffer->data(), sources_bytes + pin->staged_rows * row_bytes, cudaMemcpyHostToDevice, s),
        "copying the staged rows");
    if (status.ok()) {
      status = CudaStatus(static_cast<cudaError_t>(kernels::cuda::GatherHbmRows(
                              static_cast<const uint8_t*>(slots), scratch + sources_bytes, static_cast<int64_t>(row_bytes),
                              reinterpret_cast<const uint32_t*>(scratch), static_cast<int64_t>(n),
                              static_cast<uint8_t*>(device_out), stream)),
                          "launching the HBM gather");
    }
    // The pin goes when the kernel that reads the slots has run (or at once if nothing was queued).
    auto* release = new std::pair<MappedTable*, MappedTable::DevicePin>(table, *pin);
    const cudaError_t queued = status.ok() ? cudaLaunchHostFunc(s, ReleasePin, release) : cudaErrorNotReady;
    if (queued != cudaSuccess) {
      if (status.ok()) cudaStreamSynchronize(s);  // the kernel may be queued: let it finish first
      ReleasePin(release);
      if (status.ok()) status = CudaStatus(queued, "cudaLaunchHostFunc");
      return status;
    }
    return CudaStatus(cudaEventRecord(done_, s), "cudaEventRecord");
  }

 private:
  static void CUDART_CB ReleasePin(void* data) {
    auto* release = static_cast<std::pair<MappedTable*, MappedTable::DevicePin>*>(data);
    release->first->ReleaseDevicePin(release->second);
    delete release;
  }

  void* buffer_ = nullptr;
  uint64_t capacity_ = 0;
  void* scratch_ = nullptr;
  uint64_t scratch_bytes_ = 0;
  std::map<std::string, void*> opened_;  // IPC handle bytes -> this process's pointer
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
