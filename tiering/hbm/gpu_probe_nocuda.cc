#include "tiering/hbm/gpu_probe.h"

namespace engram {

absl::StatusOr<GpuInfo> ProbeGpu(int) {
  return absl::FailedPreconditionError("engramd was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

}  // namespace engram
