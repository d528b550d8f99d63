// The HBM tier's slots in GPU memory (see hbm_slot_store.h). Rows arrive packed in host memory,
// go through a pinned staging buffer and are copied slot by slot on the store's own stream; the
// index is kept twice on the device (the buffers the published generations name), so a kernel
// given a pinned generation probes the same buckets a host reader would.
#include <cuda_runtime.h>

#include <cstring>

#include "absl/strings/str_cat.h"
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
      if (absl::Status s = CudaStatus(cudaMemset(keys_[b], 0, buckets * 8), "clearing the index"); !s.ok()) return s;
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
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    const uint64_t bytes = slots.size() * static_cast<uint64_t>(row_bytes_);
    if (bytes > staging_bytes_) {
      if (staging_ != nullptr) cudaFreeHost(staging_);
      staging_ = nullptr;
      staging_bytes_ = 0;
      if (absl::Status s = CudaStatus(cudaHostAlloc(&staging_, bytes, cudaHostAllocDefault), "cudaHostAlloc");
          !s.ok()) {
        return s;
      }
      staging_bytes_ = bytes;
    }
    std::memcpy(staging_, rows, bytes);
    for (size_t i = 0; i < slots.size(); ++i) {
      if (slots[i] >= slots_count_) return absl::InternalError("HBM tier: a slot out of range");
      uint8_t* dst = static_cast<uint8_t*>(slots_) + static_cast<uint64_t>(slots[i]) * row_bytes_;
      if (absl::Status s = CudaStatus(cudaMemcpyAsync(dst, static_cast<uint8_t*>(staging_) + i * row_bytes_,
                                                      row_bytes_, cudaMemcpyHostToDevice, stream_),
                                      "copying a row");
          !s.ok()) {
        return s;
      }
    }
    // The rows must be on the device before the index that names them is published.
    return CudaStatus(cudaStreamSynchronize(stream_), "copying rows");
  }

  absl::Status UploadIndex(int buffer, absl::Span<const uint64_t> keys, absl::Span<const uint32_t> values) override {
    if (buffer < 0 || buffer > 1 || keys.size() != buckets_ || values.size() != buckets_) {
      return absl::InternalError("HBM tier: index upload of the wrong shape");
    }
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(keys_[buffer], keys.data(), keys.size() * 8,
                                                    cudaMemcpyHostToDevice, stream_),
                                    "uploading the index");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaMemcpyAsync(values_[buffer], values.data(), values.size() * 4,
                                                    cudaMemcpyHostToDevice, stream_),
                                    "uploading the index");
        !s.ok()) {
      return s;
    }
    return CudaStatus(cudaStreamSynchronize(stream_), "uploading the index");
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
  void* staging_ = nullptr;
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
