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

class MappedTable;

class DeviceStaging {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceStaging>> Create();
  virtual ~DeviceStaging() = default;
  // A pinned buffer of `bytes`, once the previous copy out of it is done.
  virtual absl::StatusOr<absl::Span<uint8_t>> Acquire(uint64_t bytes) = 0;
  // Enqueues the copy of the first `bytes` of the buffer to `device_out` on `stream`.
  virtual absl::Status CopyToDevice(void* device_out, uint64_t bytes, void* stream) = 0;
  // Rows through the daemon's GPU HBM tier (`table`'s layer must have one, on the current device):
  // the index is probed here (MappedTable::SplitForDevice), rows the tier lacks are staged, and
  // one kernel on `stream` copies every row from its slot (mapped by CUDA IPC) or the staging;
  // the pin is released by a callback on `stream` once that kernel ran. FailedPrecondition: this
  // request cannot take the path (another device, no free pin): use the staging path instead.
  // Waits until the work queued so far has run (its pin callbacks too); safe from any thread.
  virtual void Quiesce() = 0;
  virtual absl::Status GatherThroughHbm(MappedTable* table, int layer, uint32_t num_tokens,
                                        absl::Span<const uint32_t> indices, void* device_out, void* stream) = 0;
  // Rows of a mapped table with no CPU gather: the mapping is registered with CUDA (read-only,
  // once), and one kernel on `stream` reads each row from its HBM slot (when the layer has a GPU
  // tier on this device) or from host memory over PCIe (MappedTable::SplitForDeviceDirect).
  // FailedPrecondition while the mapping is being registered (on a thread of its own, started by
  // the first call: pinning ~100 GB takes seconds) and when the host cannot register it (no
  // read-only registration, refused; remembered per mapping): use another path.
  virtual absl::Status GatherDirect(MappedTable* table, int layer, uint32_t num_tokens,
                                    absl::Span<const uint32_t> indices, void* device_out, void* stream) = 0;
  // Unregisters every mapping registered here and closes the HBM slots opened by CUDA IPC (after
  // Quiesce), before the mappings and the daemon that exported them go away (a reconnect).
  virtual void ForgetMappings() = 0;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_DEVICE_STAGING_H_
