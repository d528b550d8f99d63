// The HBM tier's slots in GPU memory (see hbm_slot_store.h). Rows arrive packed in host memory,
// go through a pinned staging buffer in one copy and a kernel scatters them into their slots, on
// the store's own stream; the index is kept twice on the device (the buffers the published
// generations name), empty at start and then updated bucket by bucket as publications change it, so
// a kernel given a pinned generation probes the same buckets a host reader would.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engram/kernels/cuda_kernels.h"
#include "tiering/hbm/hbm_slot_store.h"

namespace engram {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("HBM tier: ", what, ": ", cudaGetErrorString(e)));
}

class CudaSlotStore final : public HbmSlotStore {
 public:
  ~CudaSlotStore() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    for (void* p : {slots_, keys_[0], keys_[1], values_[0], values_[1]}) {
      if (p != nullptr) cudaFree(p);
    }
    if (staging_ != nullptr) cudaFreeHost(staging_);
    if (scratch_ != nullptr) cudaFree(scratch_);
  }

  absl::Status Init(int device, uint32_t slots, int64_t row_bytes, uint64_t buckets) {
    device_ = device;
    slots_count_ = slots;
    row_bytes_ = row_bytes;
    buckets_ = buckets;
    if (absl::Status s = CudaStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
    if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "creating a stream");
        !s.ok()) {
      return s;
    }
    const uint64_t slot_bytes = static_cast<uint64_t>(slots) * static_cast<uint64_t>(row_bytes);
    if (absl::Status s = CudaStatus(cudaMalloc(&slots_, slot_bytes), "allocating row slots"); !s.ok()) return s;
    for (int b = 0; b < 2; ++b) {
      if (absl::Status s = CudaStatus(cudaMalloc(&keys_[b], buckets * 8), "allocating the index"); !s.ok()) return s;
      if (absl::Status s = CudaStatus(cudaMalloc(&values_[b], buckets * 4), "allocating the index"); !s.ok()) {
        return s;
      }
      // Empty: no keys, every slot "none" (0xffffffff, kernels::kNoSlot).
      if (absl::Status s = CudaStatus(cudaMemset(keys_[b], 0, buckets * 8), "clearing the index"); !s.ok()) return s;
      if (absl::Status s = CudaStatus(cudaMemset(values_[b], 0xff, buckets * 4), "clearing the index"); !s.ok()) {
        return s;
      }
    }
    bytes_ = slot_bytes + buckets * 24;
    return absl::OkStatus();
  }

  HbmStoreKind kind() const override { return HbmStoreKind::kCuda; }
  uint32_t slots() const override { return slots_count_; }
  int64_t row_bytes() const override { return row_bytes_; }
  uint64_t bytes() const override { return bytes_; }
  std::string description() const override { return absl::StrCat("GPU ", device_, " memory"); }

  absl::Status WriteRows(absl::Span<const uint32_t> slots, const uint8_t* rows) override {
    if (slots.empty()) return absl::OkStatus();
    for (uint32_t slot : slots) {
      if (slot >= slots_count_) return absl::InternalError("HBM tier: a slot out of range");
    }
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    // One copy of the packed rows and their slot numbers, one kernel scattering them into slots.
    const uint64_t n = slots.size();
    const uint64_t row_part = (n * static_cast<uint64_t>(row_bytes_) + 15) / 16 * 16;
    if (absl::Status s = Reserve(row_part + n * 4); !s.ok()) return s;
    std::memcpy(staging_, rows, n * static_cast<uint64_t>(row_bytes_));
    std::memcpy(static_cast<uint8_t*>(staging_) + row_part, slots.data(), n * 4);
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(scratch_, staging_, row_part + n * 4, cudaMemcpyHostToDevice,
                                                    stream_),
                                    "copying rows");
        !s.ok()) {
      return s;
    }
    const auto* packed = static_cast<const uint8_t*>(scratch_);
    if (absl::Status s = CudaStatus(static_cast<cudaError_t>(kernels::cuda::ScatterRows(
                                        packed, row_bytes_, reinterpret_cast<const uint32_t*>(packed + row_part),
                                        static_cast<int64_t>(n), static_cast<uint8_t*>(slots_), stream_)),
                                    "launching the row scatter");
        !s.ok()) {
      return s;
    }
    // The rows must be on the device before the index that names them is published.
    return CudaStatus(cudaStreamSynchronize(stream_), "copying rows");
  }

  absl::Status UpdateIndex(int buffer, absl::Span<const uint64_t> buckets, const uint64_t* keys,
                           const uint32_t* values) override {
    if (buffer < 0 || buffer > 1) return absl::InternalError("HBM tier: index buffer out of range");
    if (buckets.empty()) return absl::OkStatus();
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    const uint64_t n = buckets.size();
    if (absl::Status s = Reserve(n * 20); !s.ok()) return s;
    auto* b = static_cast<uint64_t*>(staging_);
    uint64_t* k = b + n;
    auto* v = reinterpret_cast<uint32_t*>(k + n);
    for (uint64_t i = 0; i < n; ++i) {
      if (buckets[i] >= buckets_) return absl::InternalError("HBM tier: an index bucket out of range");
      b[i] = buckets[i];
      k[i] = keys[buckets[i]];
      v[i] = values[buckets[i]];
    }
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(scratch_, staging_, n * 20, cudaMemcpyHostToDevice, stream_),
                                    "uploading index changes");
        !s.ok()) {
      return s;
    }
    const auto* db = static_cast<const uint64_t*>(scratch_);
    if (absl::Status s = CudaStatus(static_cast<cudaError_t>(kernels::cuda::ScatterIndex(
                                        db, db + n, reinterpret_cast<const uint32_t*>(db + 2 * n),
                                        static_cast<int64_t>(n), static_cast<uint64_t*>(keys_[buffer]),
                                        static_cast<uint32_t*>(values_[buffer]), stream_)),
                                    "launching the index scatter");
        !s.ok()) {
      return s;
    }
    return CudaStatus(cudaStreamSynchronize(stream_), "uploading index changes");
  }

  // Pinned host staging and a device scratch buffer of at least `bytes` each (they grow, never
  // shrink: a step's promotions are bounded).
  absl::Status Reserve(uint64_t bytes) {
    if (bytes <= staging_bytes_) return absl::OkStatus();
    bytes = std::max(bytes, 2 * staging_bytes_);  // grow geometrically: a reallocation syncs the device
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    if (staging_ != nullptr) cudaFreeHost(staging_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    staging_ = scratch_ = nullptr;
    staging_bytes_ = 0;
    if (absl::Status s = CudaStatus(cudaHostAlloc(&staging_, bytes, cudaHostAllocDefault), "cudaHostAlloc"); !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaMalloc(&scratch_, bytes), "allocating the upload buffer"); !s.ok()) return s;
    staging_bytes_ = bytes;
    return absl::OkStatus();
  }

  absl::StatusOr<HbmIpcHandles> ExportIpc() const override {
    HbmIpcHandles out;
    out.device = device_;
    const std::pair<void*, std::string*> parts[] = {{slots_, &out.slots},         {keys_[0], &out.keys[0]},
                                                    {keys_[1], &out.keys[1]},     {values_[0], &out.values[0]},
                                                    {values_[1], &out.values[1]}};
    for (const auto& [pointer, handle] : parts) {
      cudaIpcMemHandle_t h;
      if (absl::Status s = CudaStatus(cudaIpcGetMemHandle(&h, pointer), "cudaIpcGetMemHandle"); !s.ok()) return s;
      handle->assign(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    return out;
  }

 private:
  int device_ = 0;
  uint32_t slots_count_ = 0;
  int64_t row_bytes_ = 0;
  uint64_t buckets_ = 0;
  uint64_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  void* slots_ = nullptr;
  void* keys_[2] = {nullptr, nullptr};
  void* values_[2] = {nullptr, nullptr};
  void* staging_ = nullptr;  // pinned host memory, staging_bytes_
  void* scratch_ = nullptr;  // device memory, staging_bytes_
  uint64_t staging_bytes_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HbmSlotStore>> CreateCudaSlotStore(int device, uint32_t slots, int64_t row_bytes,
                                                                  uint64_t buckets) {
  auto store = std::make_unique<CudaSlotStore>();
  if (absl::Status s = store->Init(device, slots, row_bytes, buckets); !s.ok()) return s;
  return std::unique_ptr<HbmSlotStore>(std::move(store));
}

}  // namespace engram
