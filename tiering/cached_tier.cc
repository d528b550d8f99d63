#include "tiering/cached_tier.h"

#include <cstring>

namespace engram {

CachedNvmeTier::CachedNvmeTier(std::unique_ptr<NvmeReader> reader, std::unique_ptr<RowCache> cache)
    : reader_(std::move(reader)),
      cache_(std::move(cache)),
      total_rows_(reader_->total_rows()),
      row_bytes_(reader_->row_bytes()) {}

void CachedNvmeTier::Publish(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> sources,
                             const absl::Status& status) {
  for (size_t i = 0; i < rows.size(); ++i) {
    PendingShard& shard = PendingFor(rows[i]);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.rows.find(rows[i]);
    if (it == shard.rows.end()) continue;
    Pending& p = *it->second;
    if (status.ok()) {
      p.bytes.assign(sources[i], sources[i] + row_bytes_);
    } else {
      p.status = status;
    }
    p.done = true;
    shard.rows.erase(it);
    shard.cv.notify_all();
  }
}

absl::Status CachedNvmeTier::ReadRows(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests,
                                      TierCounts* counts) {
  // 1. Split: cached rows, rows another request is reading now, and rows this request reads.
  std::vector<uint32_t> hits, misses;
  std::vector<std::pair<uint32_t, std::shared_ptr<Pending>>> waits;
  for (uint32_t i = 0; i < rows.size(); ++i) {
    frequency_.Record(rows[i]);
    if (cache_ && cache_->Contains(rows[i])) {
      hits.push_back(i);
      continue;
    }
    PendingShard& shard = PendingFor(rows[i]);
    std::lock_guard<std::mutex> lock(shard.mu);
    auto [it, inserted] = shard.rows.try_emplace(rows[i]);
    if (inserted) {
      it->second = std::make_shared<Pending>();
      misses.push_back(i);
    } else {
      waits.emplace_back(i, it->second);
    }
  }
  // Misses are read into this thread's own staging, never straight into the caller's dests: the
  // bytes the cache keeps and the waiting requests get must come from memory only engramd writes
  // (a shared-memory client can rewrite its destination while the read is in flight).
  thread_local std::vector<uint8_t> tls_staging;
  std::vector<uint8_t>& staging = tls_staging;
  if (staging.size() < misses.size() * static_cast<size_t>(row_bytes_)) {
    staging.resize(misses.size() * static_cast<size_t>(row_bytes_));
  }
  std::vector<uint64_t> miss_rows(misses.size());
  std::vector<uint8_t*> miss_dests(misses.size());
  for (size_t m = 0; m < misses.size(); ++m) {
    miss_rows[m] = rows[misses[m]];
    miss_dests[m] = staging.data() + m * static_cast<size_t>(row_bytes_);
  }

  // 2. NVMe reads in flight; meanwhile copy the hits (a hit evicted since the probe is read after).
  std::vector<uint32_t> late;
  uint64_t dram_rows = 0;
  absl::Status s = reader_->Read(miss_rows, miss_dests, [&] {
    if (!cache_) return;
    for (uint32_t i : hits) {
      if (cache_->Lookup(rows[i], dests[i])) {
        ++dram_rows;
      } else {
        late.push_back(i);
      }
    }
    for (uint64_t row : miss_rows) cache_->Lookup(row, nullptr);  // count the access in the sketch
  });
  Publish(miss_rows, miss_dests, s);
  if (!s.ok()) return s;
  for (size_t m = 0; m < miss_rows.size(); ++m) {
    if (cache_) cache_->Insert(miss_rows[m], miss_dests[m]);
    std::memcpy(dests[misses[m]], miss_dests[m], static_cast<size_t>(row_bytes_));
  }
  uint64_t nvme_rows = miss_rows.size();
  if (!late.empty()) {
    std::vector<uint64_t> late_rows;
    std::vector<uint8_t*> late_dests;
    for (uint32_t i : late) {
      late_rows.push_back(rows[i]);
      late_dests.push_back(dests[i]);
    }
    if (absl::Status ls = reader_->Read(late_rows, late_dests); !ls.ok()) return ls;
    nvme_rows += late_rows.size();
  }

  // 3. Rows another request was reading: wait for its bytes (it never waits on us, see header).
  for (auto& [i, pending] : waits) {
    PendingShard& shard = PendingFor(rows[i]);
    std::unique_lock<std::mutex> lock(shard.mu);
    if (pending->prefetch && !pending->done) prefetch_late_.fetch_add(1, std::memory_order_relaxed);
    shard.cv.wait(lock, [&] { return pending->done; });
    if (!pending->status.ok()) return pending->status;
    std::memcpy(dests[i], pending->bytes.data(), static_cast<size_t>(row_bytes_));
    shared_reads_.fetch_add(1, std::memory_order_relaxed);
  }
  nvme_rows += waits.size();
  counts->rows[static_cast<int>(TierKind::kDram)] += dram_rows;
  counts->rows[static_cast<int>(TierKind::kNvme)] += nvme_rows;
  return absl::OkStatus();
}

CachedNvmeTier::~CachedNvmeTier() {
  {
    std::lock_guard<std::mutex> lock(prefetch_mu_);
    prefetch_stop_ = true;
  }
  prefetch_cv_.notify_all();
  if (prefetcher_.joinable()) prefetcher_.join();
}

PrefetchCounts CachedNvmeTier::Prefetch(absl::Span<const uint64_t> rows) {
  PrefetchCounts counts;
  if (!cache_) {  // nowhere to stage rows
    counts.skipped = rows.size();
    return counts;
  }
  prefetch_requested_.fetch_add(rows.size(), std::memory_order_relaxed);
  std::vector<uint64_t> wanted;
  for (uint64_t row : rows) {
    if (cache_->Contains(row)) {
      ++counts.skipped;
    } else {
      wanted.push_back(row);
    }
  }
  {
    std::lock_guard<std::mutex> lock(prefetch_mu_);
    if (!prefetcher_.joinable()) prefetcher_ = std::thread([this] { PrefetchLoop(); });
    for (uint64_t row : wanted) {
      if (prefetch_queue_.size() >= kPrefetchQueueRows) {
        ++counts.dropped;
        continue;
      }
      prefetch_queue_.push_back(row);
      ++counts.queued;
    }
  }
  prefetch_dropped_.fetch_add(counts.dropped, std::memory_order_relaxed);
  prefetch_cv_.notify_one();
  return counts;
}

void CachedNvmeTier::PrefetchLoop() {
  constexpr size_t kBatch = 256;
  const uint32_t depth = std::max<uint32_t>(1, 16);  // a quarter of the default demand depth
  std::vector<uint64_t> batch;
  std::vector<std::vector<uint8_t>> buffers(kBatch, std::vector<uint8_t>(row_bytes_));
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(prefetch_mu_);
      prefetch_cv_.wait(lock, [&] { return prefetch_stop_ || !prefetch_queue_.empty(); });
      if (prefetch_stop_) return;
      batch.clear();
      while (!prefetch_queue_.empty() && batch.size() < kBatch) {
        batch.push_back(prefetch_queue_.front());
        prefetch_queue_.pop_front();
      }
    }
    // Claim rows nobody has or is reading; demand that needs one meanwhile waits for this read.
    std::vector<uint64_t> rows;
    std::vector<uint8_t*> dests;
    for (uint64_t row : batch) {
      if (cache_->Contains(row)) continue;
      PendingShard& shard = PendingFor(row);
      std::lock_guard<std::mutex> lock(shard.mu);
      auto [it, inserted] = shard.rows.try_emplace(row);
      if (!inserted) continue;
      it->second = std::make_shared<Pending>();
      it->second->prefetch = true;
      dests.push_back(buffers[rows.size()].data());
      rows.push_back(row);
    }
    const absl::Status s = reader_->Read(rows, dests, nullptr, depth);
    if (s.ok()) {
      for (size_t i = 0; i < rows.size(); ++i) cache_->InsertPrefetched(rows[i], dests[i]);
    }
    Publish(rows, dests, s);  // waiting demand gets the bytes, or the error
  }
}

absl::StatusOr<uint64_t> CachedNvmeTier::Warm(absl::Span<const std::pair<uint64_t, uint32_t>> hot_rows) {
  if (!cache_) return 0;
  constexpr size_t kBatch = 4096;
  std::vector<uint8_t> buffer(kBatch * row_bytes_);
  uint64_t placed = 0;
  for (size_t begin = 0; begin < hot_rows.size() && placed < cache_->capacity_rows(); begin += kBatch) {
    const size_t n = std::min(kBatch, hot_rows.size() - begin);
    std::vector<uint64_t> rows;
    std::vector<uint32_t> counts;
    std::vector<uint8_t*> dests;
    for (size_t i = 0; i < n; ++i) {
      if (hot_rows[begin + i].first >= total_rows_) continue;  // a stale snapshot: skip, do not fail
      rows.push_back(hot_rows[begin + i].first);
      counts.push_back(hot_rows[begin + i].second);
      dests.push_back(buffer.data() + (rows.size() - 1) * row_bytes_);
    }
    if (absl::Status s = reader_->Read(rows, dests); !s.ok()) return s;
    for (size_t i = 0; i < rows.size(); ++i) placed += cache_->Warm(rows[i], dests[i], counts[i]) ? 1 : 0;
  }
  return placed;
}

}  // namespace engram
