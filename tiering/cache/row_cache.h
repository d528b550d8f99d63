// RowCache: the DRAM cache of table rows. A fixed arena of row slots (huge-page memory) split
// into shards; each shard has its own lock, index (row -> slot), eviction policy and frequency
// sketch (TinyLFU), so concurrent lookups of different rows rarely contend. With row_bytes 0 it
// keeps keys only: the simulator runs this same class over a token trace.
//
// Thread-safe. A hit copies the row out under the shard lock, so a slot is never overwritten
// while it is being read.
#ifndef ENGRAM_TIERING_CACHE_ROW_CACHE_H_
#define ENGRAM_TIERING_CACHE_ROW_CACHE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "tiering/cache/policy.h"
#include "tiering/dram_tier.h"

namespace engram {

struct RowCacheStats {
  uint64_t hits = 0, misses = 0, inserts = 0, rejected = 0, evictions = 0;
  // Prefetched rows: hit by demand before eviction (useful), or evicted / refused unused (wasted).
  uint64_t prefetch_useful = 0, prefetch_wasted = 0;
};

class RowCache {
 public:
  // capacity_rows slots of row_bytes each (row_bytes 0: keys only). shards >= 1.
  static absl::StatusOr<std::unique_ptr<RowCache>> Create(uint64_t capacity_rows, int64_t row_bytes,
                                                          const PolicySpec& policy, int shards);

  // Records the access; on a hit copies the row to `dest` (if not null) and returns true.
  bool Lookup(uint64_t key, uint8_t* dest);
  // True if `key` is cached now (no access recorded, no copy).
  bool Contains(uint64_t key) const;
  // Offers a row that was read from below after a miss. Admission may refuse it (returns false).
  bool Insert(uint64_t key, const uint8_t* data);
  // A prefetched row: takes a free slot or a probationary victim only, so it never displaces a
  // row demand is using; refused otherwise. Counted as useful once demand hits it.
  bool InsertPrefetched(uint64_t key, const uint8_t* data);
  // Inserts without the admission filter while free slots remain (warming from a hot set);
  // `count` seeds the frequency sketch. Returns false once the shard is full.
  bool Warm(uint64_t key, const uint8_t* data, uint32_t count);

  // The `limit` cached rows with the highest estimated frequency, hottest first.
  std::vector<std::pair<uint64_t, uint32_t>> HotSet(size_t limit) const;

  uint64_t capacity_rows() const { return capacity_rows_; }
  uint64_t size() const;
  uint64_t memory_bytes() const { return arena_.size(); }
  RowCacheStats stats() const;
  const PolicySpec& policy() const { return policy_; }

 private:
  struct Shard {
    mutable std::mutex mu;
    absl::flat_hash_map<uint64_t, uint32_t> index ABSL_GUARDED_BY(mu);
    std::vector<uint64_t> slot_keys ABSL_GUARDED_BY(mu);
    std::vector<uint32_t> free_slots ABSL_GUARDED_BY(mu);
    std::vector<uint8_t> prefetched ABSL_GUARDED_BY(mu);  // 1 while a prefetched row awaits its first hit
    std::unique_ptr<EvictionPolicy> eviction ABSL_GUARDED_BY(mu);
    std::unique_ptr<AdmissionPolicy> sketch ABSL_GUARDED_BY(mu);
    uint8_t* data = nullptr;  // this shard's slots
    uint32_t capacity = 0;
    std::atomic<uint64_t> hits{0}, misses{0}, inserts{0}, rejected{0}, evictions{0};
    std::atomic<uint64_t> prefetch_useful{0}, prefetch_wasted{0};
  };

  RowCache(uint64_t capacity_rows, int64_t row_bytes, PolicySpec policy) noexcept
      : capacity_rows_(capacity_rows), row_bytes_(row_bytes), policy_(std::move(policy)) {}
  Shard& ShardFor(uint64_t key) const;
  // Places key in a slot of `shard` (free, or the policy's victim). REQUIRES shard.mu held.
  enum class Mode { kDemand, kWarm, kPrefetch };
  bool PlaceLocked(Shard& shard, uint64_t key, const uint8_t* data, Mode mode);

  const uint64_t capacity_rows_;
  const int64_t row_bytes_;
  const PolicySpec policy_;
  HostRegion arena_;
  std::vector<std::unique_ptr<Shard>> shards_;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_CACHE_ROW_CACHE_H_
