// HbmArena: one layer's row slots in GPU memory and the flat index over them (the HBM tier's
// device side). ApplyPlan reads the promoted rows from the layer's host tier, copies them into
// their slots and uploads the rebuilt index; Export gives CUDA IPC handles of the slots and the
// index so processes on the same GPU can map them and gather from HBM directly (probing with
// engram/kernels/hbm_probe.h). Built with CUDA only; elsewhere Create is FailedPrecondition.
// Not thread-safe: one promoter per arena.
#ifndef ENGRAM_TIERING_HBM_HBM_ARENA_H_
#define ENGRAM_TIERING_HBM_HBM_ARENA_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tiering/hbm/hbm_residency.h"
#include "tiering/row_tier.h"

namespace engram {

// The index is double-buffered: `active` (a device uint32) says which of the two key/value pairs
// is current; the promoter writes the other one and then flips it. A reader reads `active` once
// per gather and probes that buffer.
struct HbmExport {
  std::string slots_ipc_handle;      // cudaIpcMemHandle_t bytes: [slots][row_bytes]
  std::string keys_ipc_handle[2];    // [bucket_mask + 1] uint64 (row + 1, 0 = empty)
  std::string values_ipc_handle[2];  // [bucket_mask + 1] uint32 slot numbers
  std::string active_ipc_handle;     // uint32: 0 or 1
  uint64_t bucket_mask = 0;
  uint32_t slots = 0;
  int64_t row_bytes = 0;
  int device = 0;
};

class HbmArena {
 public:
  // `residency` sizes the index (its bucket count never changes) and must outlive the arena.
  static absl::StatusOr<std::unique_ptr<HbmArena>> Create(int device, const HbmResidency& residency,
                                                          int64_t row_bytes);
  virtual ~HbmArena() = default;
  // Applies a plan in an order that never lets the published index name a slot being rewritten:
  // (1) the demotions are recorded and an index without those rows is published; (2) the promoted
  // rows (read from `source`) are copied into their slots; (3) the promotions are recorded and the
  // full index published. On an error in (2) the demotions stand and nothing else changed.
  // (A reader still probing the previous buffer across a flip is the reader's to bound: it must
  // finish a gather within one plan interval.)
  virtual absl::Status ApplyPlan(const HbmPlan& plan, RowTier* source, HbmResidency* residency) = 0;
  virtual absl::StatusOr<HbmExport> Export() const = 0;
  virtual uint64_t device_bytes() const = 0;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_HBM_ARENA_H_
