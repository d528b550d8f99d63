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
                                      // static-topk, belady, oracle-admission (hindsight)
  std::string capacity = "10%";       // N% of each layer's rows, or a byte budget split by rows
  uint32_t seq_len = 4096;            // the trace is cut into sequences of this many tokens
  int shards = 16;                    // as the daemon's cache
  int replays = 1;                    // the hashed trace is played this many times in a row, as one
                                      // long trace (for estimators that need more accesses to settle)
  bool reuse_breakdown = false;       // fill SimulationReport::reuse
  // When not empty: each DRAM cache (lru, s3fifo, tinylfu, oracle-admission) is first warmed with
  // the most used rows of this other trace, hottest first, as engramd --warm-from a profile of
  // that corpus (`engramctl profile`) does. The hindsight references and hbm are not warmed.
  std::vector<int32_t> warm_tokens = {};
};

struct PolicyResult {
  std::string policy;
  uint64_t hits = 0, accesses = 0;
  // With replays > 1, the last pass alone (what a policy that needs time to settle gives once it
  // has); 0 accesses for static-topk, which has no order.
  uint64_t last_pass_hits = 0, last_pass_accesses = 0;
  double hit_ratio() const { return accesses ? static_cast<double>(hits) / accesses : 0; }
  double last_pass_hit_ratio() const {
    return last_pass_accesses ? static_cast<double>(last_pass_hits) / last_pass_accesses : 0;
  }
};

// Where the trace's reuse comes from, per n-gram order: an access is a reuse when its row was
// accessed before. Hindsight caches (Belady) harvest every kind; an online one cannot foresee a
// row reused by a different n-gram (a hash collision: random, given the table's size).
struct ReuseBreakdown {
  int order = 0;
  uint64_t accesses = 0;
  uint64_t reuses = 0;             // the row was accessed before
  uint64_t in_sequence = 0;        // ... last within the same sequence
  uint64_t other_ngram = 0;        // ... last by a different n-gram (hash collision)
  uint64_t first_reuses = 0;       // the row's second access
  uint64_t first_other_ngram = 0;  // ... by a different n-gram than the first
};

struct SimulationReport {
  uint64_t capacity_rows = 0;  // over all layers
  uint64_t table_rows = 0;
  uint64_t accesses = 0;
  std::vector<PolicyResult> results;
  std::vector<ReuseBreakdown> reuse;  // one per order, when asked for
};

absl::StatusOr<SimulationReport> SimulateCache(const PackManifest& manifest, const std::vector<int32_t>& tokens,
                                               const SimulationOptions& options);

// Parses "1%", "10%", or a byte size; returns rows for a layer of `layer_rows` rows when the
// table has `table_rows` rows of `row_bytes` bytes.
absl::StatusOr<uint64_t> CapacityRows(const std::string& capacity, uint64_t layer_rows, uint64_t table_rows,
                                      int64_t row_bytes);

}  // namespace engram

#endif  // ENGRAM_BENCH_SIMULATE_H_
