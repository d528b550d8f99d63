#include <cuda_runtime.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "tiering/hbm/hbm_arena.h"

namespace engram {
namespace {

absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("HBM tier: ", what, ": ", cudaGetErrorString(e)));
}

class CudaHbmArena final : public HbmArena {
 public:
  ~CudaHbmArena() override {
    for (void* p : {slots_, keys_[0], keys_[1], values_[0], values_[1], active_}) {
      if (p != nullptr) cudaFree(p);
    }
    if (staging_ != nullptr) cudaFreeHost(staging_);
  }

  absl::Status Init(int device, const HbmResidency& residency, int64_t row_bytes) {
    device_ = device;
    row_bytes_ = row_bytes;
    capacity_ = residency.capacity();
    std::vector<uint64_t> keys;
    std::vector<uint32_t> values;
    residency.CopyIndex(&keys, &values, &bucket_mask_);
    if (absl::Status s = CudaStatus(cudaSetDevice(device), "cudaSetDevice"); !s.ok()) return s;
    const uint64_t slot_bytes = static_cast<uint64_t>(capacity_) * static_cast<uint64_t>(row_bytes);
    if (absl::Status s = CudaStatus(cudaMalloc(&slots_, slot_bytes), "allocating row slots"); !s.ok()) return s;
    for (int b = 0; b < 2; ++b) {
      if (absl::Status s = CudaStatus(cudaMalloc(&keys_[b], keys.size() * 8), "allocating the index"); !s.ok()) return s;
      if (absl::Status s = CudaStatus(cudaMalloc(&values_[b], values.size() * 4), "allocating the index"); !s.ok()) {
        return s;
      }
    }
    if (absl::Status s = CudaStatus(cudaMalloc(&active_, 4), "allocating the index"); !s.ok()) return s;
    device_bytes_ = slot_bytes + keys.size() * 24 + 4;
    return PublishIndex(keys, values);
  }

  absl::Status ApplyPlan(const HbmPlan& plan, RowTier* source, HbmResidency* residency) override {
    if (plan.promote.empty() && plan.demote.empty()) return absl::OkStatus();
    if (absl::Status s = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !s.ok()) return s;
    for (const HbmMove& m : plan.promote) {
      if (m.slot >= capacity_) return absl::InvalidArgumentError("HBM plan names a slot out of range");
    }
    // (1) Demotions first: the published index stops naming the slots about to be rewritten.
    if (!plan.demote.empty()) {
      residency->Apply(HbmPlan{plan.demote, {}});
      if (absl::Status s = PublishFrom(*residency); !s.ok()) return s;
    }
    if (plan.promote.empty()) return absl::OkStatus();
    // (2) The promoted rows, from the host tier through pinned memory into their slots.
    const uint64_t bytes = plan.promote.size() * static_cast<uint64_t>(row_bytes_);
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
    std::vector<uint64_t> rows;
    std::vector<uint8_t*> dests;
    for (size_t i = 0; i < plan.promote.size(); ++i) {
      rows.push_back(plan.promote[i].row);
      dests.push_back(static_cast<uint8_t*>(staging_) + i * row_bytes_);
    }
    TierCounts counts;
    if (absl::Status s = source->ReadRows(rows, dests, &counts); !s.ok()) return s;
    for (size_t i = 0; i < plan.promote.size(); ++i) {
      uint8_t* slot = static_cast<uint8_t*>(slots_) + static_cast<uint64_t>(plan.promote[i].slot) * row_bytes_;
      if (absl::Status s = CudaStatus(cudaMemcpy(slot, dests[i], row_bytes_, cudaMemcpyHostToDevice), "copying a row");
          !s.ok()) {
        return s;
      }
    }
    // (3) Now the rows are there: record and publish them.
    residency->Apply(HbmPlan{{}, plan.promote});
    return PublishFrom(*residency);
  }

  absl::StatusOr<HbmExport> Export() const override {
    HbmExport out;
    out.bucket_mask = bucket_mask_;
    out.slots = capacity_;
    out.row_bytes = row_bytes_;
    out.device = device_;
    const std::pair<void*, std::string*> parts[] = {
        {slots_, &out.slots_ipc_handle},      {keys_[0], &out.keys_ipc_handle[0]},
        {keys_[1], &out.keys_ipc_handle[1]},  {values_[0], &out.values_ipc_handle[0]},
        {values_[1], &out.values_ipc_handle[1]}, {active_, &out.active_ipc_handle}};
    for (const auto& [pointer, handle] : parts) {
      cudaIpcMemHandle_t h;
      if (absl::Status s = CudaStatus(cudaIpcGetMemHandle(&h, pointer), "cudaIpcGetMemHandle"); !s.ok()) return s;
      handle->assign(reinterpret_cast<const char*>(&h), sizeof(h));
    }
    return out;
  }

  uint64_t device_bytes() const override { return device_bytes_; }

 private:
  absl::Status PublishFrom(const HbmResidency& residency) {
    std::vector<uint64_t> keys;
    std::vector<uint32_t> values;
    uint64_t mask = 0;
    residency.CopyIndex(&keys, &values, &mask);
    if (mask != bucket_mask_) return absl::InternalError("HBM tier: the index changed size");
    return PublishIndex(keys, values);
  }

  // Writes the buffer readers are not using, then flips `active` to it (one aligned 4-byte copy).
  absl::Status PublishIndex(const std::vector<uint64_t>& keys, const std::vector<uint32_t>& values) {
    const uint32_t next = 1 - active_host_;
    if (absl::Status s = CudaStatus(cudaMemcpy(keys_[next], keys.data(), keys.size() * 8, cudaMemcpyHostToDevice),
                                    "uploading the index");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaMemcpy(values_[next], values.data(), values.size() * 4,
                                               cudaMemcpyHostToDevice),
                                    "uploading the index");
        !s.ok()) {
      return s;
    }
    if (absl::Status s = CudaStatus(cudaMemcpy(active_, &next, 4, cudaMemcpyHostToDevice), "publishing the index");
        !s.ok()) {
      return s;
    }
    active_host_ = next;
    return absl::OkStatus();
  }

  int device_ = 0;
  int64_t row_bytes_ = 0;
  uint32_t capacity_ = 0;
  uint64_t bucket_mask_ = 0;
  uint64_t device_bytes_ = 0;
  void* slots_ = nullptr;
  void* keys_[2] = {nullptr, nullptr};
  void* values_[2] = {nullptr, nullptr};
  void* active_ = nullptr;
  uint32_t active_host_ = 1;  // the first publish writes buffer 0
  void* staging_ = nullptr;
  uint64_t staging_bytes_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HbmArena>> HbmArena::Create(int device, const HbmResidency& residency,
                                                          int64_t row_bytes) {
  auto arena = std::make_unique<CudaHbmArena>();
  if (absl::Status s = arena->Init(device, residency, row_bytes); !s.ok()) return s;
  return std::unique_ptr<HbmArena>(std::move(arena));
}

}  // namespace engram
