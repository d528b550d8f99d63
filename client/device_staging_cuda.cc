#include <cuda_runtime.h>

#include <cstring>
#include <map>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/background_once.h"
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
    registered_.Clear(Unregister);  // waits for a registration still running
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
    if (absl::Status s = OnTiersDevice(*hbm); !s.ok()) return s;
    void* slots = nullptr;
    if (absl::Status s = OpenSlots(*hbm, &slots); !s.ok()) return s;
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

  absl::Status GatherDirect(MappedTable* table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                            void* device_out, void* stream) override {
    const absl::Span<const uint8_t> rows = table->layer_rows(layer);
    if (rows.empty()) return absl::NotFoundError(absl::StrCat("layer ", layer, " is not mapped"));
    const uint8_t* host_rows = nullptr;
    if (absl::Status s = Registered(rows, &host_rows); !s.ok()) return s;
    // The tier's slots when it runs on this GPU; otherwise every row comes from host memory.
    const shm::HbmLayer* hbm = table->hbm_layer(layer);
    void* slots = nullptr;
    const bool use_hbm = hbm != nullptr && hbm->kind == static_cast<uint32_t>(shm::HbmKind::kCuda) &&
                         OnTiersDevice(*hbm).ok() && OpenSlots(*hbm, &slots).ok();
    const uint64_t n = indices.size();
    auto buffer = Acquire(n * 8);  // the sources, pinned
    if (!buffer.ok()) return buffer.status();
    if (n * 8 > scratch_bytes_) {
      if (scratch_ != nullptr) cudaFree(scratch_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      if (absl::Status s = CudaStatus(cudaMalloc(&scratch_, n * 8), "cudaMalloc"); !s.ok()) return s;
      scratch_bytes_ = n * 8;
    }
    auto* sources = reinterpret_cast<uint64_t*>(buffer->data());
    auto pin = table->SplitForDeviceDirect(layer, num_tokens, indices, use_hbm, sources);
    if (!pin.ok()) return pin.status();
    const auto s = static_cast<cudaStream_t>(stream);
    absl::Status status =
        CudaStatus(cudaMemcpyAsync(scratch_, sources, n * 8, cudaMemcpyHostToDevice, s), "copying the row sources");
    if (status.ok()) {
      status = CudaStatus(static_cast<cudaError_t>(kernels::cuda::GatherDirectRows(
                              static_cast<const uint8_t*>(slots), host_rows, static_cast<int64_t>(table->row_bytes()),
                              static_cast<const uint64_t*>(scratch_), static_cast<int64_t>(n),
                              static_cast<int64_t>(pin->repeated_rows), static_cast<uint8_t*>(device_out), stream)),
                          "launching the direct gather");
    }
    if (pin->pinned) {  // released once the kernel that reads the slots has run
      auto* release = new std::pair<MappedTable*, MappedTable::DevicePin>(table, *pin);
      const cudaError_t queued = status.ok() ? cudaLaunchHostFunc(s, ReleasePin, release) : cudaErrorNotReady;
      if (queued != cudaSuccess) {
        if (status.ok()) cudaStreamSynchronize(s);
        ReleasePin(release);
        if (status.ok()) status = CudaStatus(queued, "cudaLaunchHostFunc");
        return status;
      }
    }
    if (!status.ok()) return status;
    return CudaStatus(cudaEventRecord(done_, s), "cudaEventRecord");
  }

  void ForgetMappings() override {
    cudaEventSynchronize(done_);
    registered_.Clear(Unregister);  // waits for a registration still running
    // The old daemon's HBM slots too: open handles would keep its GPU memory alive.
    for (const auto& [handle, pointer] : opened_) cudaIpcCloseMemHandle(pointer);
    opened_.clear();
  }

 private:
  absl::Status OnTiersDevice(const shm::HbmLayer& hbm) {
    int device = -1;
    if (absl::Status s = CudaStatus(cudaGetDevice(&device), "cudaGetDevice"); !s.ok()) return s;
    if (device != hbm.device) {
      return absl::FailedPreconditionError(
          absl::StrCat("the HBM tier is on GPU ", hbm.device, ", this thread's device is ", device));
    }
    return absl::OkStatus();
  }

  // The tier's slots, mapped into this process once per export (CUDA IPC).
  absl::Status OpenSlots(const shm::HbmLayer& hbm, void** slots) {
    const std::string key(hbm.ipc_slots, sizeof(hbm.ipc_slots));
    if (auto it = opened_.find(key); it != opened_.end()) {
      *slots = it->second;
      return absl::OkStatus();
    }
    cudaIpcMemHandle_t handle;
    static_assert(sizeof(handle) == sizeof(hbm.ipc_slots));
    std::memcpy(&handle, hbm.ipc_slots, sizeof(handle));
    if (absl::Status s = CudaStatus(cudaIpcOpenMemHandle(slots, handle, cudaIpcMemLazyEnablePeerAccess),
                                    "opening the HBM tier's slots");
        !s.ok()) {
      return absl::FailedPreconditionError(s.message());
    }
    opened_[key] = *slots;
    return absl::OkStatus();
  }

  // `rows` (a read-only mapping) registered with CUDA once, on a thread of its own: it pins every
  // page, seconds for a V4.1 layer, which the caller's lookup (and its client) must not wait for.
  // FailedPrecondition until that is done (the caller stages the rows meanwhile) or when CUDA
  // refused it (for good); then the mapping's device pointer.
  absl::Status Registered(absl::Span<const uint8_t> rows, const uint8_t** device) {
    int dev = 0;
    cudaGetDevice(&dev);
    const uint8_t* base = rows.data();
    const size_t bytes = rows.size();
    auto mapped = registered_.Get(
        base, absl::StrCat("registering the ", bytes >> 20, " MiB mapping with CUDA"),
        [base, bytes, dev]() -> absl::StatusOr<const uint8_t*> {
          cudaSetDevice(dev);
          int read_only = 0;
          cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, dev);
          if (read_only == 0) return absl::FailedPreconditionError("this device cannot register read-only host memory");
          void* p = const_cast<uint8_t*>(base);
          // Portable: a client may call from threads on several GPUs.
          cudaError_t e =
              cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterReadOnly | cudaHostRegisterPortable);
          const bool pinned = e == cudaSuccess;
          void* mapped = nullptr;
          if (pinned) e = cudaHostGetDevicePointer(&mapped, p, 0);
          if (e != cudaSuccess) {
            cudaGetLastError();  // not sticky: the staged paths still work
            if (pinned) cudaHostUnregister(p);
            return absl::FailedPreconditionError(
                absl::StrCat("cudaHostRegister of the mapping: ", cudaGetErrorString(e)));
          }
          return static_cast<const uint8_t*>(mapped);
        });
    if (!mapped.ok()) return mapped.status();
    *device = *mapped;
    return absl::OkStatus();
  }

  static void Unregister(const uint8_t* const& base, const uint8_t* const&) {
    cudaHostUnregister(const_cast<uint8_t*>(base));
  }

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
  BackgroundOnce<const uint8_t*, const uint8_t*> registered_;  // mapping -> its device pointer
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
