#include "tiering/hbm/hbm_residency.h"

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_set.h"

#include "engram/kernels/hbm_probe.h"

namespace engram {

namespace {
constexpr uint64_t kEmptySlot = ~0ull;
constexpr size_t kExactVictimScan = 65536;  // residents up to this many: victims chosen exactly
}  // namespace

HbmResidency::HbmResidency(uint32_t slots, uint64_t decay_every)
    : slots_(slots),
      decay_every_(std::max<uint64_t>(1, decay_every)),
      slot_row_(slots, kEmptySlot),
      next_decay_(decay_every_) {
  free_slots_.reserve(slots);
  for (uint32_t s = slots; s > 0; --s) free_slots_.push_back(s - 1);  // hand out slot 0 first
  RebuildIndexLocked();
}

void HbmResidency::RecordAccess(uint64_t row, uint32_t weight) {
  std::lock_guard<std::mutex> lock(mu_);
  RecordAccessLocked(row, weight);
}

void HbmResidency::RecordAccesses(const std::vector<uint64_t>& rows, uint32_t weight) {
  std::lock_guard<std::mutex> lock(mu_);
  for (uint64_t row : rows) RecordAccessLocked(row, weight);
}

void HbmResidency::RecordAccessLocked(uint64_t row, uint32_t weight) {
  const double heat = heat_[row] += weight;
  last_weight_ = weight;
  if (heat >= admit_heat_ && !row_slot_.contains(row)) candidates_.insert(row);
  recorded_ += weight;
  if (recorded_ < next_decay_) return;
  next_decay_ = recorded_ + DecayPeriod(decay_every_, weight);
  ++decays_;
  // Halve everything; forget rows that went cold (keeps the map near the working set).
  admit_heat_ *= 0.5;
  for (auto it = heat_.begin(); it != heat_.end();) {
    it->second *= 0.5;
    if (it->second < 0.25 * last_weight_ && !row_slot_.contains(it->first)) {
      heat_.erase(it++);
    } else {
      ++it;
    }
  }
}

uint64_t HbmResidency::DecayPeriod(uint64_t decay_every, uint32_t weight) {
  const double stretch = std::max(1.0, std::sqrt(static_cast<double>(weight)) / 2);
  return static_cast<uint64_t>(static_cast<double>(decay_every) * stretch);
}

uint64_t HbmResidency::decays() const {
  std::lock_guard<std::mutex> lock(mu_);
  return decays_;
}

double HbmResidency::HeatLocked(uint64_t row) const {
  auto it = heat_.find(row);
  return it == heat_.end() ? 0.0 : it->second;
}

HbmPlan HbmResidency::NextPlan(size_t max_moves, double margin) const {
  std::lock_guard<std::mutex> lock(mu_);
  HbmPlan plan;
  if (slots_ == 0 || max_moves == 0) return plan;
  // Candidates: the hottest rows not resident, hottest first.
  std::vector<std::pair<double, uint64_t>> candidates;
  candidates.reserve(candidates_.size());
  for (auto it = candidates_.begin(); it != candidates_.end();) {
    const double heat = HeatLocked(*it);
    if (heat <= 0 || row_slot_.contains(*it)) {
      candidates_.erase(it++);
      continue;
    }
    candidates.push_back({heat, *it});
    ++it;
  }
  const size_t want = std::min(max_moves, candidates.size());
  std::partial_sort(candidates.begin(), candidates.begin() + static_cast<std::ptrdiff_t>(want), candidates.end(),
                    [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  candidates.resize(want);
  // Victims: the coldest resident rows, coldest first; only as many as could be displaced.
  std::vector<std::pair<double, uint64_t>> victims;
  if (free_slots_.size() < want) {
    const size_t needed = want - free_slots_.size();
    if (row_slot_.size() <= std::max(kExactVictimScan, 8 * needed)) {
      victims.reserve(row_slot_.size());
      for (const auto& [row, slot] : row_slot_) victims.push_back({HeatLocked(row), row});
    } else {
      // A sample of the residents (slots drawn from a counter-based generator: plans are repeatable).
      absl::flat_hash_set<uint64_t> seen;
      for (size_t k = 0; k < 8 * needed; ++k) {
        const uint64_t row = slot_row_[kernels::HbmMix64(recorded_ * 0x100000001b3ull + k) % slots_];
        if (row != kEmptySlot && seen.insert(row).second) victims.push_back({HeatLocked(row), row});
      }
    }
    const size_t take = std::min(victims.size(), needed);
    std::partial_sort(victims.begin(), victims.begin() + static_cast<std::ptrdiff_t>(take), victims.end());
    victims.resize(take);
  }
  size_t free_used = 0, victim = 0;
  for (const auto& [heat, row] : candidates) {
    if (free_used < free_slots_.size()) {
      plan.promote.push_back({row, free_slots_[free_slots_.size() - 1 - free_used]});
      ++free_used;
      continue;
    }
    if (victim >= victims.size() || !(heat > victims[victim].first * margin && heat > 0)) break;
    const uint64_t out = victims[victim++].second;
    plan.demote.push_back(out);
    plan.promote.push_back({row, row_slot_.at(out)});
  }
  // From now on only rows at least as hot as what they would displace become candidates, and the
  // ones that are not drop out.
  if (free_slots_.size() <= free_used && !victims.empty()) {
    admit_heat_ = victims[std::min(victim, victims.size() - 1)].first * margin;
    for (auto it = candidates_.begin(); it != candidates_.end();) {
      if (HeatLocked(*it) < admit_heat_) {
        candidates_.erase(it++);
      } else {
        ++it;
      }
    }
  } else if (free_slots_.size() > free_used) {
    admit_heat_ = 0;
  }
  return plan;
}

void HbmResidency::Apply(const HbmPlan& plan) {
  std::lock_guard<std::mutex> lock(mu_);
  absl::flat_hash_set<uint32_t> freed;
  for (uint64_t row : plan.demote) {
    auto it = row_slot_.find(row);
    if (it == row_slot_.end()) continue;
    freed.insert(it->second);
    slot_row_[it->second] = kEmptySlot;
    row_slot_.erase(it);
    IndexEraseLocked(row);
  }
  for (const HbmMove& m : plan.promote) {
    if (auto it = row_slot_.find(m.row); it != row_slot_.end()) {  // already resident: move it
      freed.insert(it->second);
      slot_row_[it->second] = kEmptySlot;
      IndexEraseLocked(m.row);
    }
    row_slot_[m.row] = m.slot;
    slot_row_[m.slot] = m.row;
    candidates_.erase(m.row);
    IndexInsertLocked(m.row, m.slot);
    if (freed.erase(m.slot) > 0) continue;  // a slot this plan's demotions just gave up
    // NextPlan hands out free slots from the back, in order.
    if (!free_slots_.empty() && free_slots_.back() == m.slot) {
      free_slots_.pop_back();
    } else if (auto it = std::find(free_slots_.begin(), free_slots_.end(), m.slot); it != free_slots_.end()) {
      free_slots_.erase(it);
    }
  }
  free_slots_.insert(free_slots_.end(), freed.begin(), freed.end());
}

void HbmIndexInsert(uint64_t* keys, uint32_t* slots, uint64_t bucket_mask, uint64_t row, uint32_t slot,
                    std::vector<uint64_t>* touched) {
  uint64_t b = kernels::HbmBucketOf(row, bucket_mask);
  while (keys[b] != 0 && keys[b] != row + 1) b = (b + 1) & bucket_mask;
  keys[b] = row + 1;
  slots[b] = slot;
  if (touched != nullptr) touched->push_back(b);
}

// Linear-probing deletion without tombstones: later members of the run that could live in the
// emptied bucket move back into it, so every probe still ends at a true empty bucket.
void HbmIndexErase(uint64_t* keys, uint32_t* slots, uint64_t bucket_mask, uint64_t row,
                   std::vector<uint64_t>* touched) {
  uint64_t hole = kernels::HbmBucketOf(row, bucket_mask);
  while (keys[hole] != row + 1) {
    if (keys[hole] == 0) return;  // not present
    hole = (hole + 1) & bucket_mask;
  }
  for (uint64_t next = (hole + 1) & bucket_mask; keys[next] != 0; next = (next + 1) & bucket_mask) {
    const uint64_t home = kernels::HbmBucketOf(keys[next] - 1, bucket_mask);
    // The entry at `next` may move to `hole` when its home is not cyclically within (hole, next].
    const bool home_in_between = hole <= next ? (hole < home && home <= next) : (hole < home || home <= next);
    if (!home_in_between) {
      keys[hole] = keys[next];
      slots[hole] = slots[next];
      if (touched != nullptr) touched->push_back(hole);
      hole = next;
    }
  }
  keys[hole] = 0;
  slots[hole] = kernels::kNoSlot;
  if (touched != nullptr) touched->push_back(hole);
}

uint64_t HbmResidency::BucketsFor(uint32_t slots) {
  uint64_t buckets = 16;
  while (buckets < 2 * static_cast<uint64_t>(slots)) buckets *= 2;
  return buckets;
}

void HbmResidency::RebuildIndexLocked() {
  const uint64_t buckets = BucketsFor(slots_);
  bucket_mask_ = buckets - 1;
  index_keys_.assign(buckets, 0);
  index_slots_.assign(buckets, kernels::kNoSlot);
  for (const auto& [row, slot] : row_slot_) IndexInsertLocked(row, slot);
}

uint32_t HbmResidency::SlotOf(uint64_t row) const {
  std::lock_guard<std::mutex> lock(mu_);
  return kernels::HbmProbe(index_keys_.data(), index_slots_.data(), bucket_mask_, row);
}

size_t HbmResidency::resident() const {
  std::lock_guard<std::mutex> lock(mu_);
  return row_slot_.size();
}

void HbmResidency::CopyIndex(std::vector<uint64_t>* keys, std::vector<uint32_t>* slots, uint64_t* bucket_mask) const {
  std::lock_guard<std::mutex> lock(mu_);
  *keys = index_keys_;
  *slots = index_slots_;
  *bucket_mask = bucket_mask_;
}

}  // namespace engram
