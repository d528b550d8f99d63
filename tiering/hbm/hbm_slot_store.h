// HbmSlotStore: where the HBM tier's row slots live. The daemon's HbmTier decides which row goes
// in which slot (and when a slot may be rewritten); a store only writes rows into slots, keeps a
// device copy of the index when readers probe on the device, and says how other processes reach
// the slots.
//   - CUDA (`CreateCudaSlotStore`): slots and a double-buffered index in GPU memory, exported with
//     CUDA IPC handles; built when the CUDA Toolkit is found, Unavailable otherwise.
//   - Host (`CreateHostSlotStore`): slots in a memfd in host memory, shared read-only with clients.
//     It is not faster than DRAM; it exists so the HBM tier's whole protocol (promotion, the
//     published index, reader pins, slot reuse) runs and is tested on machines without a GPU.
// Not thread-safe: the HBM tier's promoter is the only writer.
#ifndef ENGRAM_TIERING_HBM_HBM_SLOT_STORE_H_
#define ENGRAM_TIERING_HBM_HBM_SLOT_STORE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

enum class HbmStoreKind : uint32_t { kHost = 1, kCuda = 2 };

// How a client on the same GPU maps a CUDA store (cudaIpcMemHandle_t bytes, 64 each).
struct HbmIpcHandles {
  std::string slots;
  std::string keys[2];
  std::string values[2];
  int device = 0;
};

class HbmSlotStore {
 public:
  virtual ~HbmSlotStore() = default;
  virtual HbmStoreKind kind() const = 0;
  virtual uint32_t slots() const = 0;
  virtual int64_t row_bytes() const = 0;
  // Copies rows (packed, row_bytes() each, in order) into `slots`. REQUIRES: slots < slots().
  virtual absl::Status WriteRows(absl::Span<const uint32_t> slots, const uint8_t* rows) = 0;
  // For readers that probe on the device: a store keeps a copy of both index buffers, empty at
  // start (keys 0, slots kNoSlot), and this brings buffer `buffer` (0 or 1) up to date for the
  // buckets listed (their entries in keys/values, the whole host buffer): what a publication
  // changed, so keeping the copy costs the changes, not the index's size. The host store has
  // nothing to do.
  virtual absl::Status UpdateIndex(int buffer, absl::Span<const uint64_t> buckets, const uint64_t* keys,
                                   const uint32_t* values) = 0;
  // Host store: the memfd holding the slots; -1 for other stores.
  virtual int host_fd() const { return -1; }
  // Host store: the slots as this process sees them (for checks); nullptr elsewhere.
  virtual const uint8_t* host_slots() const { return nullptr; }
  virtual absl::StatusOr<HbmIpcHandles> ExportIpc() const {
    return absl::FailedPreconditionError("this HBM store has no CUDA IPC handles");
  }
  // Memory the store holds (device memory for CUDA).
  virtual uint64_t bytes() const = 0;
  virtual std::string description() const = 0;
};

struct HostSlotStoreOptions {
  // Testing: each slot is filled with 0xEE before its row is written, so a reader that reads a
  // slot while it is rewritten sees garbage instead of a plausible row.
  bool poison_before_write = false;
};

absl::StatusOr<std::unique_ptr<HbmSlotStore>> CreateHostSlotStore(uint32_t slots, int64_t row_bytes,
                                                                  const HostSlotStoreOptions& options = {});
// `buckets`: the index size (HbmResidency's bucket_mask + 1).
absl::StatusOr<std::unique_ptr<HbmSlotStore>> CreateCudaSlotStore(int device, uint32_t slots, int64_t row_bytes,
                                                                  uint64_t buckets);

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_HBM_SLOT_STORE_H_
