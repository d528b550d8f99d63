// EngramLayer's CUDA path in a build without CUDA: never available, so layers run the CPU twin.
#include "client/engram_layer_cuda.h"

namespace engram {

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::Create(const kernels::EngramWeights&, RowDtype, int) {
  return absl::FailedPreconditionError("libengram_client was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

}  // namespace engram
