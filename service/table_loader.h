// Start-up placement of tables: reads every pack's manifest, splits the daemon's DRAM budget
// over the tables (explicit per-table budgets first, the rest by table size), opens each table
// (resident, or NVMe with a DRAM cache) and logs one line per layer saying where it lives.
#ifndef ENGRAM_SERVICE_TABLE_LOADER_H_
#define ENGRAM_SERVICE_TABLE_LOADER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "service/cli_flags.h"
#include "tiering/engine.h"
#include "tiering/table.h"

namespace engram {

struct PlacementOptions {
  uint64_t dram_budget_bytes = UINT64_MAX;         // for all tables together
  std::map<std::string, uint64_t> table_budgets;   // by table name, taken out of the total first
  TableOptions table;                              // everything else (policy, NVMe, checksums)
};

// The tier flags engramd and `engram-bench --target inproc` share, as typed.
struct TierFlags {
  std::string dram_budget = "all";
  std::vector<std::string> table_budgets;
  std::string cache_policy = "s3fifo";
  int64_t cache_shards = 16;
  int64_t nvme_queue_depth = 64;
  std::string nvme_io = "auto";
  bool verify_checksums = true;
  bool require_verified = false;
  bool share_tables = true;

  void Register(FlagSet& flags);
  // Checks and converts; errors name the flag.
  absl::StatusOr<PlacementOptions> ToPlacement() const;
};

// Parses "NAME=BYTES".
absl::Status ParseTableBudget(const std::string& text, std::map<std::string, uint64_t>* out);

// Opens every pack into `engine`. Fails on the first pack that cannot be served, naming it.
absl::Status LoadTables(const std::vector<std::string>& pack_dirs, const PlacementOptions& options, Engine* engine);

}  // namespace engram

#endif  // ENGRAM_SERVICE_TABLE_LOADER_H_
