// EngramLayer's CUDA path (internal): the layer's weights on the device, a cuBLAS handle, pinned
// staging for rows, and the kernels of engram/kernels/cuda_kernels.h. Create fails with
// FailedPrecondition when the library was built without CUDA or no device is present; EngramLayer
// then runs the CPU twin.
#ifndef ENGRAM_CLIENT_ENGRAM_LAYER_CUDA_H_
#define ENGRAM_CLIENT_ENGRAM_LAYER_CUDA_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/kernels/cpu_twin.h"
#include "engram/kernels/row_dtype.h"

namespace engram {

class EngramLayerCuda {
 public:
  // The demo module.
  static absl::StatusOr<std::unique_ptr<EngramLayerCuda>> Create(const kernels::EngramWeights& weights, RowDtype dtype,
                                                                 int row_dim);
  // DeepSeek-V4.1's module.
  static absl::StatusOr<std::unique_ptr<EngramLayerCuda>> CreateDsv41(const kernels::Dsv41Weights& weights,
                                                                      RowDtype dtype, int row_dim);
  virtual ~EngramLayerCuda() = default;
  // Demo. `rows`: n_rows raw rows in host memory; hidden/out: device pointers; work on `stream`.
  virtual absl::Status Forward(absl::Span<const uint8_t> rows, int64_t n_rows, const kernels::ForwardShape& shape,
                               absl::Span<const float> hidden, absl::Span<float> out, void* stream) {
    return absl::UnimplementedError("this CUDA layer runs the V4.1 module");
  }
  // The same with hidden states and output in host memory (copied in and out; synchronous).
  virtual absl::Status ForwardHostBuffers(absl::Span<const uint8_t> rows, int64_t n_rows,
                                          const kernels::ForwardShape& shape, absl::Span<const float> hidden,
                                          absl::Span<float> out) {
    return absl::UnimplementedError("this CUDA layer runs the V4.1 module");
  }
  // V4.1: `dead` [tokens] and `rows` in host memory; hidden/out device pointers to `values`
  // stream elements (f32, or bf16 bits), out may alias hidden; with `host_buffers`, hidden/out are
  // host memory instead (copied in and out; synchronous).
  virtual absl::Status ForwardDsv41(absl::Span<const uint8_t> rows, int64_t n_rows, absl::Span<const uint8_t> dead,
                                    const void* hidden, void* out, size_t values, bool bf16_streams, void* stream,
                                    bool host_buffers) {
    return absl::UnimplementedError("this CUDA layer runs the demo module");
  }
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_ENGRAM_LAYER_CUDA_H_
