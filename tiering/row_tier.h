// The seam between the lookup path and where rows live. A RowTier answers "copy these rows into
// these places"; the engine owns validation, deduplication and splitting work across threads, so a
// tier only ever sees unique, in-range global row numbers of one layer. The DRAM-resident table is
// one tier; the NVMe tier and caches implement the same interface.
// Implementations must be safe for concurrent ReadRows calls.
//
// The integrity contract every tier keeps: a tier never reads back from a destination. A dest may
// be memory its requester can write while the call runs (a shared-memory client's own arena), so
// what a tier keeps (cache slots, HBM slots), hands to other waiting requests, or feeds the HBM
// promoter comes only from memory engramd alone writes: its own read buffers and slots. Bytes read
// from a device are checked against the pack's block checksums before any of them is used. (The
// engine may still copy a batch's repeated rows from the same request's dests: that can only
// spoil that request's own reply.)
#ifndef ENGRAM_TIERING_ROW_TIER_H_
#define ENGRAM_TIERING_ROW_TIER_H_

#include <array>
#include <cstdint>
#include <utility>
#include "absl/strings/string_view.h"

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

enum class TierKind : uint8_t { kHbm = 0, kDram = 1, kNvme = 2 };
inline constexpr int kNumTierKinds = 3;
inline constexpr std::array<absl::string_view, kNumTierKinds> kTierNames = {"hbm", "dram", "nvme"};

// What a prefetch did with the rows it was given.
struct PrefetchCounts {
  uint64_t queued = 0;   // will be read into DRAM in the background
  uint64_t skipped = 0;  // already in DRAM, or being read
  uint64_t dropped = 0;  // the prefetch queue was full
};

// Rows served by each tier, indexed by TierKind.
struct TierCounts {
  std::array<uint64_t, kNumTierKinds> rows{};
  void Add(const TierCounts& other) {
    for (int i = 0; i < kNumTierKinds; ++i) rows[i] += other.rows[i];
  }
};

class RowCache;
class NvmeReader;
class ZipfEstimator;

// Counts a tier keeps about requests that met in it and about prefetch (zero where none apply).
struct TierActivity {
  uint64_t shared_reads = 0;        // rows a request took from another request's read in flight
  uint64_t prefetch_requested = 0;  // distinct rows asked for by Prefetch
  uint64_t prefetch_dropped = 0;    // ... dropped because the queue was full
  uint64_t prefetch_late = 0;       // demand found a row its prefetch was still reading
};

class RowTier {
 public:
  virtual ~RowTier() = default;

  // Copies row rows[i] (row_bytes() bytes) to dests[i] for every i and counts where each came from.
  // REQUIRES: rows unique and < total_rows(); rows.size() == dests.size().
  // The dests are written, never read (see the contract above).
  // On error no promise is made about the dests' contents; the caller must not return them.
  virtual absl::Status ReadRows(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests,
                                TierCounts* counts) = 0;

  virtual uint64_t total_rows() const = 0;
  virtual int64_t row_bytes() const = 0;
  // Bytes of memory this tier holds (DRAM or HBM), for metrics.
  virtual uint64_t resident_bytes() const = 0;
  // Stages unique, in-range rows into DRAM in the background, below demand reads in priority.
  // Tiers whose rows are all in DRAM skip them.
  virtual PrefetchCounts Prefetch(absl::Span<const uint64_t> rows) {
    PrefetchCounts counts;
    counts.skipped = rows.size();
    return counts;
  }

  // True when reading a row twice costs real work (I/O, a cache slot), so the engine should
  // deduplicate a batch before asking. A resident DRAM table says false: a repeated row is a
  // cache hit, cheaper than the hash probe that would find it (measured in bench/RESULTS.md).
  virtual bool dedup_saves_reads() const = 0;
  // Which tier a start-up log line should name.
  virtual absl::string_view description() const = 0;
  // A sealed, read-only memfd holding all total_rows() rows back to back, which clients on this
  // host may map and gather from themselves; -1 when the tier has none. Owned by the tier.
  virtual int shared_fd() const { return -1; }

  // Optional capabilities; a tier without one answers null / nothing.
  // The rows themselves, back to back, when the tier holds them all in memory (benchmarks).
  virtual const uint8_t* resident_rows() const { return nullptr; }
  // The DRAM row cache in front of a slower tier (its stats, its hot set for snapshots).
  virtual const RowCache* cache() const { return nullptr; }
  // The device the tier reads from (engine, O_DIRECT, block checksums, I/O stats).
  virtual const NvmeReader* nvme() const { return nullptr; }
  // The frequency model of the rows this tier was asked for.
  virtual const ZipfEstimator* frequency() const { return nullptr; }
  // What the tier did for concurrent requests and prefetch, since start.
  virtual TierActivity activity() const { return {}; }
  // Places `hot_rows` (row, count; hottest first) in the cache while it has room: a warm start.
  // Returns how many were placed; 0 for tiers without a cache.
  virtual absl::StatusOr<uint64_t> Warm(absl::Span<const std::pair<uint64_t, uint32_t>> hot_rows) {
    (void)hot_rows;
    return 0;
  }
};

}  // namespace engram

#endif  // ENGRAM_TIERING_ROW_TIER_H_
