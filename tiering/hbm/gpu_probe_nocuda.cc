#include "tiering/hbm/gpu_probe.h"
#include "tiering/hbm/hbm_arena.h"

namespace engram {

absl::StatusOr<GpuInfo> ProbeGpu(int) {
  return absl::FailedPreconditionError("engramd was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

absl::StatusOr<std::unique_ptr<HbmArena>> HbmArena::Create(int, const HbmResidency&, int64_t) {
  return absl::FailedPreconditionError("engramd was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

}  // namespace engram
