#include "tiering/cache/row_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace engram {

absl::StatusOr<std::unique_ptr<RowCache>> RowCache::Create(uint64_t capacity_rows, int64_t row_bytes,
                                                           const PolicySpec& policy, int shards) {
  if (capacity_rows == 0) return absl::InvalidArgumentError("a row cache needs at least one slot");
  if (shards < 1) shards = 1;
  if (static_cast<uint64_t>(shards) > capacity_rows) shards = static_cast<int>(capacity_rows);
  std::unique_ptr<RowCache> cache(new RowCache(capacity_rows, row_bytes, policy));
  if (row_bytes > 0) {
    auto arena = HostRegion::Allocate(capacity_rows * static_cast<uint64_t>(row_bytes));
    if (!arena.ok()) return arena.status();
    cache->arena_ = std::move(*arena);
  }
  uint64_t first_slot = 0;
  for (int i = 0; i < shards; ++i) {
    auto shard = std::make_unique<Shard>();
    const uint64_t slots = capacity_rows / shards + (static_cast<uint64_t>(i) < capacity_rows % shards ? 1 : 0);
    shard->capacity = static_cast<uint32_t>(slots);
    shard->data = row_bytes > 0 ? cache->arena_.data() + first_slot * row_bytes : nullptr;
    first_slot += slots;
    std::lock_guard<std::mutex> lock(shard->mu);
    shard->slot_keys.assign(slots, 0);
    shard->prefetched.assign(slots, 0);
    shard->free_slots.resize(slots);
    for (uint32_t s = 0; s < slots; ++s) shard->free_slots[s] = static_cast<uint32_t>(slots - 1 - s);
    shard->eviction = MakeEviction(policy, shard->capacity);
    shard->sketch = MakeTinyLfuAdmission(shard->capacity);
    shard->index.reserve(slots);
    cache->shards_.push_back(std::move(shard));
  }
  return cache;
}

RowCache::Shard& RowCache::ShardFor(uint64_t key) const {
  const uint64_t h = (key * 0x9E3779B97F4A7C15ULL) >> 32;
  return *shards_[h % shards_.size()];
}

bool RowCache::Lookup(uint64_t key, uint8_t* dest) {
  Shard& shard = ShardFor(key);
  std::lock_guard<std::mutex> lock(shard.mu);
  shard.sketch->RecordAccess(key);
  const auto it = shard.index.find(key);
  if (it == shard.index.end()) {
    shard.misses.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  shard.eviction->OnHit(it->second);
  if (shard.prefetched[it->second]) {
    shard.prefetched[it->second] = 0;
    shard.prefetch_useful.fetch_add(1, std::memory_order_relaxed);
  }
  if (dest != nullptr && row_bytes_ > 0) {
    std::memcpy(dest, shard.data + static_cast<uint64_t>(it->second) * row_bytes_, static_cast<size_t>(row_bytes_));
  }
  shard.hits.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool RowCache::Contains(uint64_t key) const {
  Shard& shard = ShardFor(key);
  std::lock_guard<std::mutex> lock(shard.mu);
  return shard.index.contains(key);
}

bool RowCache::PlaceLocked(Shard& shard, uint64_t key, const uint8_t* data, Mode mode) {
  if (shard.index.contains(key)) return true;  // a concurrent miss got here first
  uint32_t slot;
  if (!shard.free_slots.empty()) {
    slot = shard.free_slots.back();
    shard.free_slots.pop_back();
  } else {
    if (mode == Mode::kWarm) return false;
    slot = shard.eviction->PickVictim();
    if (slot == kNoSlot) {
      shard.rejected.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    const uint64_t victim = shard.slot_keys[slot];
    const bool probationary = shard.eviction->last_victim_probationary();
    const bool refuse = mode == Mode::kPrefetch
                            ? !probationary  // prefetch never displaces a row demand keeps using
                            : policy_.tinylfu_admission && !probationary && !shard.sketch->Admit(key, victim);
    if (refuse) {
      shard.eviction->Restore(slot);  // the victim stays, next in line again
      shard.rejected.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    if (shard.prefetched[slot]) shard.prefetch_wasted.fetch_add(1, std::memory_order_relaxed);
    shard.index.erase(victim);
    shard.evictions.fetch_add(1, std::memory_order_relaxed);
  }
  shard.prefetched[slot] = mode == Mode::kPrefetch ? 1 : 0;
  if (row_bytes_ > 0) std::memcpy(shard.data + static_cast<uint64_t>(slot) * row_bytes_, data, static_cast<size_t>(row_bytes_));
  shard.slot_keys[slot] = key;
  shard.index.emplace(key, slot);
  shard.eviction->OnInsert(slot, key);
  shard.inserts.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool RowCache::Insert(uint64_t key, const uint8_t* data) {
  if (policy_.eviction == PolicySpec::Eviction::kPinned) return false;  // only Warm fills a static set
  Shard& shard = ShardFor(key);
  std::lock_guard<std::mutex> lock(shard.mu);
  return PlaceLocked(shard, key, data, Mode::kDemand);
}

bool RowCache::InsertPrefetched(uint64_t key, const uint8_t* data) {
  if (policy_.eviction == PolicySpec::Eviction::kPinned) return false;
  Shard& shard = ShardFor(key);
  std::lock_guard<std::mutex> lock(shard.mu);
  const bool placed = PlaceLocked(shard, key, data, Mode::kPrefetch);
  if (!placed) shard.prefetch_wasted.fetch_add(1, std::memory_order_relaxed);
  return placed;
}

bool RowCache::Warm(uint64_t key, const uint8_t* data, uint32_t count) {
  Shard& shard = ShardFor(key);
  std::lock_guard<std::mutex> lock(shard.mu);
  for (uint32_t i = 0; i < std::min<uint32_t>(count, 15); ++i) shard.sketch->RecordAccess(key);
  return PlaceLocked(shard, key, data, Mode::kWarm);
}

std::vector<std::pair<uint64_t, uint32_t>> RowCache::HotSet(size_t limit) const {
  std::vector<std::pair<uint64_t, uint32_t>> all;
  for (const auto& shard : shards_) {
    std::lock_guard<std::mutex> lock(shard->mu);
    for (const auto& [key, slot] : shard->index) all.emplace_back(key, shard->sketch->Estimate(key));
  }
  const size_t keep = std::min(limit, all.size());
  std::partial_sort(all.begin(), all.begin() + keep, all.end(),
                    [](const auto& a, const auto& b) { return a.second > b.second || (a.second == b.second && a.first < b.first); });
  all.resize(keep);
  return all;
}

uint64_t RowCache::size() const {
  uint64_t n = 0;
  for (const auto& shard : shards_) {
    std::lock_guard<std::mutex> lock(shard->mu);
    n += shard->index.size();
  }
  return n;
}

RowCacheStats RowCache::stats() const {
  RowCacheStats s;
  for (const auto& shard : shards_) {
    s.hits += shard->hits.load(std::memory_order_relaxed);
    s.misses += shard->misses.load(std::memory_order_relaxed);
    s.inserts += shard->inserts.load(std::memory_order_relaxed);
    s.rejected += shard->rejected.load(std::memory_order_relaxed);
    s.evictions += shard->evictions.load(std::memory_order_relaxed);
    s.prefetch_useful += shard->prefetch_useful.load(std::memory_order_relaxed);
    s.prefetch_wasted += shard->prefetch_wasted.load(std::memory_order_relaxed);
  }
  return s;
}

}  // namespace engram
