// The daemon's metric families in one place, so every transport (gRPC now, shared memory later)
// counts requests, latencies and rows the same way. Thread-safe (see MetricsRegistry).
#ifndef ENGRAM_SERVICE_DAEMON_METRICS_H_
#define ENGRAM_SERVICE_DAEMON_METRICS_H_

#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "service/metrics.h"
#include "tiering/engine.h"

namespace engram {

class DaemonMetrics {
 public:
  explicit DaemonMetrics(MetricsRegistry* registry);

  // One finished request of `transport` (grpc|shm) and `method`, with its status and duration.
  void RecordRequest(const std::string& transport, const std::string& method, absl::StatusCode code,
                     double seconds);
  // Rows a lookup returned and where they came from.
  void RecordLookup(const Table& table, const LookupStats& stats);
  // What a client served itself from a mapped table (its batched report): rows from the DRAM
  // mapping, or from the HBM tier's slots.
  void RecordMappedLookups(const Table& table, uint64_t lookups, uint64_t rows, TierKind tier = TierKind::kDram);
  // Tables and tiers, set once at start-up.
  void RecordTables(const Engine& engine, bool hbm_enabled);
  void SetReady(bool ready);
  // Cache, NVMe and HBM figures, read from the tiers (at each scrape).
  void RefreshTierGauges(const Engine& engine);

  MetricsRegistry* registry() const { return registry_; }

 private:
  MetricsRegistry* registry_;
  std::mutex refresh_mu_;  // concurrent scrapes must not both add the same counter delta
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_DAEMON_METRICS_H_
