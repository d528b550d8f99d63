// `engram-bench simulate`: replays a token trace through the Engram hashing and the daemon's own
// RowCache (keys only) for each policy, beside two hindsight references computed on the same
// trace: static top-K (the K most used rows, known in advance) and Belady (evict the row used
// furthest in the future, bypass rows never reused) — the best any policy could do.
#ifndef ENGRAM_BENCH_SIMULATE_H_
#define ENGRAM_BENCH_SIMULATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"

namespace engram {

struct SimulationOptions {
  std::vector<std::string> policies;  // lru, s3fifo, tinylfu, hbm (the HBM tier's batched planner),
                                      // static-topk (hindsight), belady
  std::string capacity = "10%";       // N% of each layer's rows, or a byte budget split by rows
  uint32_t seq_len = 4096;            // the trace is cut into sequences of this many tokens
  int shards = 16;                    // as the daemon's cache
};

struct PolicyResult {
  std::string policy;
  uint64_t hits = 0, accesses = 0;
  double hit_ratio() const { return accesses ? static_cast<double>(hits) / accesses : 0; }
};

struct SimulationReport {
  uint64_t capacity_rows = 0;  // over all layers
  uint64_t table_rows = 0;
  uint64_t accesses = 0;
  std::vector<PolicyResult> results;
};

absl::StatusOr<SimulationReport> SimulateCache(const PackManifest& manifest, const std::vector<int32_t>& tokens,
                                               const SimulationOptions& options);

// Parses "1%", "10%", or a byte size; returns rows for a layer of `layer_rows` rows when the
// table has `table_rows` rows of `row_bytes` bytes.
absl::StatusOr<uint64_t> CapacityRows(const std::string& capacity, uint64_t layer_rows, uint64_t table_rows,
                                      int64_t row_bytes);

}  // namespace engram

#endif  // ENGRAM_BENCH_SIMULATE_H_
