#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "tiering/hbm/gpu_probe.h"

namespace engram {

absl::StatusOr<GpuInfo> ProbeGpu(int device) {
  int count = 0;
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device: ", cudaGetErrorString(e)));
  }
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(absl::StrCat("--gpu ", device, ": this host has ", count, " CUDA device(s)"));
  }
  cudaDeviceProp props{};
  if (cudaError_t e = cudaGetDeviceProperties(&props, device); e != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrCat("GPU ", device, ": ", cudaGetErrorString(e)));
  }
  GpuInfo info;
  info.device = device;
  info.name = props.name;
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaSetDevice(device) == cudaSuccess && cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
    info.free_bytes = free_bytes;
    info.total_bytes = total_bytes;
  }
  return info;
}

}  // namespace engram
