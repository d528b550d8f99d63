// The control frames of a shared-memory session (engram/shm_protocol.h), after the handshake:
// OpenTable, MapTable and CounterReport here; MapHbm and AccessReport in shm_hbm_export.h. What
// a client has mapped and the HBM pins of its arena live in ShmClientState, owned by its session.
// Called from the session's thread only.
#ifndef ENGRAM_SERVICE_SHM_CONTROL_H_
#define ENGRAM_SERVICE_SHM_CONTROL_H_

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"
#include "service/daemon_metrics.h"
#include "tiering/engine.h"
#include "tiering/hbm/hbm_tier.h"

namespace engram {

// What one client has mapped, and the HBM pins of its arena that the HBM tiers watch (they stop
// watching when this goes, which must be before the arena is unmapped).
struct ShmClientState {
  shm::ArenaHeader* header = nullptr;
  std::vector<bool> mapped;      // tables this client mapped (it may report on those)
  std::vector<bool> hbm_mapped;  // tables whose HBM tiers it maps
  uint32_t next_pin = 0;
  std::vector<std::pair<HbmTier*, const std::atomic<uint64_t>*>> readers;
  ShmClientState() = default;
  ShmClientState(const ShmClientState&) = delete;
  ShmClientState& operator=(const ShmClientState&) = delete;
  ~ShmClientState() {
    for (const auto& [tier, pin] : readers) tier->RemoveReader(pin);
  }
};

// What one session's control frames work with.
struct ShmControlContext {
  Engine* engine = nullptr;
  DaemonMetrics* metrics = nullptr;
  const std::vector<const Table*>* tables = nullptr;  // a table's id is its index here
  ShmClientState* client = nullptr;
  int sock = -1;
  std::string who;  // the peer, for logs
};

// One control frame. An error ends the session (a protocol violation); a refusal the client can
// act on goes back in the frame's reply instead.
absl::Status HandleControlFrame(const shm::Frame& frame, const ShmControlContext& ctx);

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_CONTROL_H_
