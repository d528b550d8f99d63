// CachedNvmeTier: a layer served from its pack file on NVMe with an optional DRAM RowCache in
// front. ReadRows probes the cache, submits NVMe reads for the misses, copies the hits while
// those reads are in flight, then offers the rows read to the cache. When concurrent requests
// miss the same row, one reads it and the others wait for its bytes (no second read).
// Thread-safe.
#ifndef ENGRAM_TIERING_CACHED_TIER_H_
#define ENGRAM_TIERING_CACHED_TIER_H_

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "tiering/cache/row_cache.h"
#include "tiering/cache/zipf_estimator.h"
#include "tiering/nvme_reader.h"
#include "tiering/row_tier.h"

namespace engram {

class CachedNvmeTier final : public RowTier {
 public:
  // `cache` may be null (every row comes from NVMe).
  CachedNvmeTier(std::unique_ptr<NvmeReader> reader, std::unique_ptr<RowCache> cache);

  absl::Status ReadRows(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests, TierCounts* counts) override;
  uint64_t total_rows() const override { return total_rows_; }
  int64_t row_bytes() const override { return row_bytes_; }
  uint64_t resident_bytes() const override { return cache_ ? cache_->memory_bytes() : 0; }
  bool dedup_saves_reads() const override { return true; }
  absl::string_view description() const override { return cache_ ? "dram-cache+nvme" : "nvme"; }

  const RowCache* cache() const override { return cache_.get(); }
  RowCache* mutable_cache() const { return cache_.get(); }
  const NvmeReader& reader() const { return *reader_; }
  const NvmeReader* nvme() const override { return reader_.get(); }
  uint64_t shared_reads() const { return shared_reads_.load(std::memory_order_relaxed); }
  // The frequency model of this layer's row stream (rows read by lookups, after dedup).
  const ZipfEstimator* frequency() const override { return &frequency_; }
  TierActivity activity() const override {
    return {shared_reads(), prefetch_requested(), prefetch_dropped(), prefetch_late()};
  }

  PrefetchCounts Prefetch(absl::Span<const uint64_t> rows) override;
  ~CachedNvmeTier() override;
  // Demand found a row its prefetch was still reading (the prefetch came too late to help fully).
  uint64_t prefetch_late() const { return prefetch_late_.load(std::memory_order_relaxed); }
  uint64_t prefetch_requested() const { return prefetch_requested_.load(std::memory_order_relaxed); }
  uint64_t prefetch_dropped() const { return prefetch_dropped_.load(std::memory_order_relaxed); }

  // Reads `rows` from NVMe and places them in the cache, hottest first, while it has free slots
  // (a warm start). Returns how many rows were placed.
  absl::StatusOr<uint64_t> Warm(absl::Span<const std::pair<uint64_t, uint32_t>> hot_rows) override;

 private:
  struct Pending {
    std::vector<uint8_t> bytes;
    absl::Status status;
    bool done = false;
    bool prefetch = false;  // being read by the background prefetcher
  };
  struct PendingShard {
    std::mutex mu;
    std::condition_variable cv;
    absl::flat_hash_map<uint64_t, std::shared_ptr<Pending>> rows;
  };
  PendingShard& PendingFor(uint64_t row) { return pending_[(row * 0x9E3779B97F4A7C15ULL >> 40) % kPendingShards]; }
  // Publishes what this request read (or its error) to the requests waiting for those rows.
  // REQUIRES: `sources` are this tier's own read buffers, never a caller's destination.
  void Publish(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> sources, const absl::Status& status);

  static constexpr int kPendingShards = 16;
  std::unique_ptr<NvmeReader> reader_;
  std::unique_ptr<RowCache> cache_;
  const uint64_t total_rows_;
  const int64_t row_bytes_;
  PendingShard pending_[kPendingShards];
  std::atomic<uint64_t> shared_reads_{0};
  ZipfEstimator frequency_;

  // Background prefetch: a bounded queue of rows and one thread, started on first use.
  void PrefetchLoop();
  static constexpr size_t kPrefetchQueueRows = 1 << 16;
  std::mutex prefetch_mu_;
  std::condition_variable prefetch_cv_;
  std::deque<uint64_t> prefetch_queue_;
  bool prefetch_stop_ = false;
  std::thread prefetcher_;
  std::atomic<uint64_t> prefetch_late_{0}, prefetch_requested_{0}, prefetch_dropped_{0};
};

}  // namespace engram

#endif  // ENGRAM_TIERING_CACHED_TIER_H_
