// libengram_client's device paths in a build without CUDA: never available, so EngramLayer runs
// the CPU twin and LookupToDevice says why it cannot.
#include "client/device_staging.h"
#include "client/engram_layer_cuda.h"

namespace engram {

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::Create(const kernels::EngramWeights&, RowDtype, int) {
  return absl::FailedPreconditionError("libengram_client was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

absl::StatusOr<std::unique_ptr<EngramLayerCuda>> EngramLayerCuda::CreateDsv41(const kernels::Dsv41Weights&, RowDtype,
                                                                              int) {
  return absl::FailedPreconditionError("libengram_client was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

absl::StatusOr<std::unique_ptr<DeviceStaging>> DeviceStaging::Create() {
  return absl::FailedPreconditionError("libengram_client was built without CUDA (ENGRAM_CUDA=OFF or no nvcc)");
}

}  // namespace engram
