// Whether engramd can use a GPU for its HBM tier: the device's name and memory, or why not (built
// without CUDA, no driver, no such device). Implemented with the CUDA runtime when the toolkit is
// built (gpu_probe_cuda.cc), else always FailedPrecondition (gpu_probe_nocuda.cc, which also
// holds CreateCudaSlotStore for builds without CUDA).
#ifndef ENGRAM_TIERING_HBM_GPU_PROBE_H_
#define ENGRAM_TIERING_HBM_GPU_PROBE_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace engram {

struct GpuInfo {
  int device = 0;
  std::string name;
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
};

absl::StatusOr<GpuInfo> ProbeGpu(int device);

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_GPU_PROBE_H_
