// The HBM side of a shared-memory session (protocol 3): MapHbm hands a client each layer's
// published index and slots (read-only memfds for the host store, CUDA IPC handles for GPU
// memory) and registers the pins in its arena with the HBM tiers; AccessReport takes the samples
// and counts the client gathered itself. Called from the session's thread only.
#ifndef ENGRAM_SERVICE_SHM_HBM_EXPORT_H_
#define ENGRAM_SERVICE_SHM_HBM_EXPORT_H_

#include "absl/status/status.h"
#include "service/shm_control.h"

namespace engram {

absl::Status HandleMapHbm(const shm::Frame& frame, const ShmControlContext& ctx);
absl::Status HandleAccessReport(const shm::Frame& frame, const ShmControlContext& ctx);

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_HBM_EXPORT_H_
