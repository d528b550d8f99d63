// Pinned host memory for landing rows in GPU buffers (internal to libengram_client): rows are
// gathered into the pinned buffer, then copied to the device on the caller's stream; the buffer
// is reused only after that copy finished (an event on the stream). Create fails with
// FailedPrecondition when the library was built without CUDA or no device is present.
// Not thread-safe (Client serializes).
#ifndef ENGRAM_CLIENT_DEVICE_STAGING_H_
#define ENGRAM_CLIENT_DEVICE_STAGING_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

class DeviceStaging {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceStaging>> Create();
  virtual ~DeviceStaging() = default;
  // A pinned buffer of `bytes`, once the previous copy out of it is done.
  virtual absl::StatusOr<absl::Span<uint8_t>> Acquire(uint64_t bytes) = 0;
  // Enqueues the copy of the first `bytes` of the buffer to `device_out` on `stream`.
  virtual absl::Status CopyToDevice(void* device_out, uint64_t bytes, void* stream) = 0;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_DEVICE_STAGING_H_
