// Engine: the transport-free core of engramd. Holds the served tables and answers lookups:
// validate -> map head-local indices to global rows -> split into pieces over the worker pool ->
// per piece, dedup and ask the layer's tier for the unique rows -> copy repeats.
//
// Tables are added at start-up (AddTable is not concurrent with lookups); Lookup and
// LookupTokens are thread-safe. Errors are absl::Status values whose code the transports map to
// their own (NotFound, InvalidArgument naming the first offender, ResourceExhausted for limits).
#ifndef ENGRAM_TIERING_ENGINE_H_
#define ENGRAM_TIERING_ENGINE_H_

#include <cstdint>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tiering/row_tier.h"
#include "tiering/table.h"
#include "tiering/worker_pool.h"

namespace engram {

struct EngineOptions {
  int worker_threads = 0;              // helpers beside the calling thread; <0: hardware threads - 1
  uint64_t max_batch_rows = 1u << 20;  // num_tokens * heads above this is ResourceExhausted
  uint32_t rows_per_piece = 8192;      // a batch is split into pieces of this many rows
  // Read each distinct row of a piece once and copy the repeats: kAuto asks the tier
  // (RowTier::dedup_saves_reads), kOn/kOff force it.
  enum class Dedup { kAuto, kOn, kOff } dedup = Dedup::kAuto;
};

// Parses auto|on|off.
absl::StatusOr<EngineOptions::Dedup> ParseDedup(absl::string_view text);

struct LookupStats {
  uint64_t rows_requested = 0;
  uint64_t rows_read = 0;  // rows asked of the tiers: after in-piece dedup where it ran
  TierCounts tiers;        // where the rows read came from
};

class Engine {
 public:
  explicit Engine(const EngineOptions& options);

  // Takes ownership; fails with AlreadyExists if a table of that name is served.
  absl::Status AddTable(std::unique_ptr<Table> table);

  const Table* FindTable(absl::string_view name) const;
  std::vector<const Table*> tables() const;
  // For start-up only (attaching tiers before serving); not safe while lookups run.
  std::vector<Table*> mutable_tables();
  const EngineOptions& options() const { return options_; }

  // Gathers rows for head-local `indices` [num_tokens][heads] of one layer into `out`
  // ([num_tokens][heads][row_bytes]).
  absl::Status Lookup(absl::string_view table, int layer_id, uint32_t num_tokens,
                      absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                      LookupStats* stats);

  // Same, for a resolved table (skips the name lookup).
  absl::Status Lookup(const Table& table, int layer_id, uint32_t num_tokens,
                      absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                      LookupStats* stats);

  // Stages the rows of head-local `indices` into DRAM in the background (no rows returned).
  // Validates exactly like Lookup.
  absl::StatusOr<PrefetchCounts> Prefetch(const Table& table, int layer_id, uint32_t num_tokens,
                                          absl::Span<const uint32_t> indices);

  // Hashes raw token ids [batch][seq_len] for `layer_id` into head-local indices
  // [batch*seq_len][heads].
  static absl::Status HashTokens(const Table& table, int layer_id, absl::Span<const int32_t> token_ids,
                                 uint32_t batch, uint32_t seq_len, std::vector<uint32_t>* indices);

 private:
  // Checks the request shape and every index, and maps indices to global rows.
  absl::StatusOr<const Table::Layer*> ResolveRows(const Table& table, int layer_id, uint32_t num_tokens,
                                                  absl::Span<const uint32_t> indices, std::vector<uint64_t>* rows) const;

  EngineOptions options_;
  std::vector<std::unique_ptr<Table>> tables_;
  std::unique_ptr<WorkerPool> pool_;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_ENGINE_H_
