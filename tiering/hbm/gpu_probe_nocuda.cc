#include "tiering/hbm/gpu_probe.h"
#include "tiering/hbm/hbm_slot_store.h"

namespace engram {

absl::StatusOr<GpuInfo> ProbeGpu(int) {
  return absl::FailedPreconditionError("engramd was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

absl::StatusOr<std::unique_ptr<HbmSlotStore>> CreateCudaSlotStore(int, uint32_t, int64_t, uint64_t) {
  return absl::FailedPreconditionError("engramd was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

}  // namespace engram
