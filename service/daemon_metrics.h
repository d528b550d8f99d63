// The daemon's metric families in one place, so every transport counts requests, latencies and
// rows the same way. Thread-safe. The request path never waits on a metrics lock: its series are
// resolved once (Requests, RecordTables) and updated with atomics, so a scrape cannot stall it.
#ifndef ENGRAM_SERVICE_DAEMON_METRICS_H_
#define ENGRAM_SERVICE_DAEMON_METRICS_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"

#include "absl/status/status.h"
#include "service/metrics.h"
#include "tiering/engine.h"

namespace engram {

// A counter series created on first use and then reached without a lock (the registry's mutex is
// taken once, when the series first appears).
class LazyCounter {
 public:
  LazyCounter(MetricsRegistry* registry, std::string name, std::string help, std::vector<std::string> label_names,
              std::vector<std::string> label_values);
  Counter* Get();

 private:
  MetricsRegistry* registry_;
  std::string name_, help_;
  std::vector<std::string> label_names_, label_values_;
  std::atomic<Counter*> counter_{nullptr};
};

// The request series of one transport and method, resolved once: a duration histogram and a
// counter per status code (each created when that code first occurs). Record takes no lock.
class RequestMetrics {
 public:
  RequestMetrics(MetricsRegistry* registry, const std::string& transport, const std::string& method);
  void Record(absl::StatusCode code, double seconds);

 private:
  static constexpr int kCodes = 17;  // absl::StatusCode 0..16
  Histogram* duration_;
  std::vector<std::unique_ptr<LazyCounter>> by_code_;  // kCodes + 1: the last for unknown codes
};

class DaemonMetrics {
 public:
  explicit DaemonMetrics(MetricsRegistry* registry);

  // The series of `transport` (grpc|shm) and `method`, created on the first call for that pair
  // (under a mutex); the pointer lives as long as this object. Callers resolve it once, outside
  // their request path, and then record without locks.
  RequestMetrics* Requests(const std::string& transport, const std::string& method);
  // Rows a lookup returned and where they came from. Lock-free for the tables RecordTables saw.
  void RecordLookup(const Table& table, const LookupStats& stats);
  // What a client served itself from a mapped table (its batched report): rows from the DRAM
  // mapping, or from the HBM tier's slots.
  void RecordMappedLookups(const Table& table, uint64_t lookups, uint64_t rows, TierKind tier = TierKind::kDram);
  // Tables and tiers, set once at start-up, before any request (it also resolves the per-table
  // series the request path uses).
  void RecordTables(const Engine& engine, bool hbm_enabled);
  void SetReady(bool ready);
  // Cache, NVMe and HBM figures, read from the tiers (at each scrape).
  void RefreshTierGauges(const Engine& engine);

  MetricsRegistry* registry() const { return registry_; }

 private:
  struct TableSeries {
    TableSeries(MetricsRegistry* registry, const std::string& table);
    Counter* rows_requested;
    Counter* rows_read;
    Counter* mapped_lookups;
    Counter* mapped_rows;
    std::vector<std::unique_ptr<LazyCounter>> tier_rows, tier_bytes;  // by TierKind
  };
  TableSeries* SeriesFor(const Table& table);

  MetricsRegistry* registry_;
  std::mutex refresh_mu_;  // concurrent scrapes must not both add the same counter delta
  // Filled by RecordTables before serving, read without a lock afterwards.
  absl::flat_hash_map<const Table*, std::unique_ptr<TableSeries>> tables_;
  std::mutex late_mu_;  // tables RecordTables did not see (tests, tools), and the request series
  absl::flat_hash_map<const Table*, std::unique_ptr<TableSeries>> late_tables_ ABSL_GUARDED_BY(late_mu_);
  std::map<std::pair<std::string, std::string>, std::unique_ptr<RequestMetrics>> requests_ ABSL_GUARDED_BY(late_mu_);
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_DAEMON_METRICS_H_
