// The HBM tier's slots in a host memfd (see hbm_slot_store.h): for machines without a GPU, so the
// tier's protocol runs end to end, and clients map the slots read-only like a mapped table.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "tiering/memfd_seals.h"
#include "absl/strings/str_cat.h"
#include "tiering/hbm/hbm_slot_store.h"

namespace engram {
namespace {

class HostSlotStore final : public HbmSlotStore {
 public:
  ~HostSlotStore() override {
    if (base_ != nullptr) munmap(base_, bytes_);
    if (fd_ >= 0) close(fd_);
  }

  absl::Status Init(uint32_t slots, int64_t row_bytes, const HostSlotStoreOptions& options) {
    slots_ = slots;
    row_bytes_ = row_bytes;
    options_ = options;
    bytes_ = static_cast<uint64_t>(slots) * static_cast<uint64_t>(row_bytes);
    if (bytes_ == 0) return absl::InvalidArgumentError("HBM tier: no slots");
    fd_ = memfd_create("engram-hbm-slots", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd_ < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
    if (ftruncate(fd_, static_cast<off_t>(bytes_)) != 0 || fcntl(fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot size ", bytes_, " bytes of HBM slots: ",
                                                       std::strerror(errno)));
    }
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap HBM slots: ", std::strerror(errno)));
    base_ = static_cast<uint8_t*>(p);
    // Clients map the slots: only this mapping may ever write them (a client could otherwise reopen
    // its read-only descriptor through /proc for writing and change every other client's rows).
    if (fcntl(fd_, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) != 0) {
      return absl::UnavailableError(absl::StrCat("cannot seal the HBM slots against writers (F_SEAL_FUTURE_WRITE, ",
                                                 "Linux 5.1+): ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }

  HbmStoreKind kind() const override { return HbmStoreKind::kHost; }
  uint32_t slots() const override { return slots_; }
  int64_t row_bytes() const override { return row_bytes_; }
  uint64_t bytes() const override { return bytes_; }
  std::string description() const override { return "host memory (emulated HBM, for testing)"; }
  int host_fd() const override { return fd_; }
  const uint8_t* host_slots() const override { return base_; }

  absl::Status WriteRows(absl::Span<const uint32_t> slots, const uint8_t* rows) override {
    for (size_t i = 0; i < slots.size(); ++i) {
      if (slots[i] >= slots_) return absl::InternalError("HBM tier: a slot out of range");
      uint8_t* dst = base_ + static_cast<uint64_t>(slots[i]) * row_bytes_;
      if (options_.poison_before_write) {
        std::memset(dst, 0xEE, row_bytes_);
        std::atomic_thread_fence(std::memory_order_seq_cst);
      }
      std::memcpy(dst, rows + i * row_bytes_, row_bytes_);
    }
    return absl::OkStatus();
  }

  absl::Status UpdateIndex(int, absl::Span<const uint64_t>, const uint64_t*, const uint32_t*) override {
    return absl::OkStatus();
  }

 private:
  uint32_t slots_ = 0;
  int64_t row_bytes_ = 0;
  uint64_t bytes_ = 0;
  HostSlotStoreOptions options_;
  int fd_ = -1;
  uint8_t* base_ = nullptr;
};

}  // namespace

absl::StatusOr<std::unique_ptr<HbmSlotStore>> CreateHostSlotStore(uint32_t slots, int64_t row_bytes,
                                                                  const HostSlotStoreOptions& options) {
  auto store = std::make_unique<HostSlotStore>();
  if (absl::Status s = store->Init(slots, row_bytes, options); !s.ok()) return s;
  return std::unique_ptr<HbmSlotStore>(std::move(store));
}

}  // namespace engram
