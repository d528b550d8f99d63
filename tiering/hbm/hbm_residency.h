// HbmResidency: which rows of one layer the HBM tier holds, and the batched plans that change it.
// Pure host logic (no CUDA), so it is unit-tested everywhere: lookups feed access counts (decayed,
// so yesterday's hot rows cool off); NextPlan picks the hottest rows not yet resident and, once
// the slots are full, swaps them for the coldest resident rows only when clearly hotter (a
// margin, so rows near the boundary do not flap); Apply records a plan whose rows were copied and
// rebuilds the flat index (engram/kernels/hbm_probe.h) that the device-side gather probes.
// Thread-safe.
#ifndef ENGRAM_TIERING_HBM_HBM_RESIDENCY_H_
#define ENGRAM_TIERING_HBM_HBM_RESIDENCY_H_

#include <cstdint>
#include <mutex>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace engram {

struct HbmMove {
  uint64_t row;
  uint32_t slot;
};

struct HbmPlan {
  std::vector<uint64_t> demote;   // leave HBM (their slots are reused by `promote`)
  std::vector<HbmMove> promote;   // copy row -> slot, then Apply
};

// The flat index's two edits (host only). Replaying the same edits in the same order on two copies
// of an index leaves them identical, bucket for bucket: the HBM tier keeps its published buffers
// up to date that way. `touched`, when given, gets every bucket the edit wrote (so a copy kept
// elsewhere, on a GPU, can be brought up to date with those buckets alone).
void HbmIndexInsert(uint64_t* keys, uint32_t* slots, uint64_t bucket_mask, uint64_t row, uint32_t slot,
                    std::vector<uint64_t>* touched = nullptr);
void HbmIndexErase(uint64_t* keys, uint32_t* slots, uint64_t bucket_mask, uint64_t row,
                   std::vector<uint64_t>* touched = nullptr);  // absent: no-op

class HbmResidency {
 public:
  // `slots`: rows the arena holds. Counts halve every `decay_every` recorded accesses; while
  // accesses are sampled (weight w > 4: one record stands for w accesses), every
  // decay_every x sqrt(w) / 2 instead, so that a row's count still rests on enough samples to
  // rank it (1 in 64: 4x longer; measured in bench/RESULTS.md, issue 15).
  explicit HbmResidency(uint32_t slots, uint64_t decay_every = 1u << 23);
  static uint64_t DecayPeriod(uint64_t decay_every, uint32_t weight);

  // `weight`: the accesses one record stands for (a sample of one access in N records weight N).
  void RecordAccess(uint64_t row, uint32_t weight = 1);
  void RecordAccesses(const std::vector<uint64_t>& rows, uint32_t weight = 1);  // one lock for many
  // Up to `max_moves` promotions (with the demotions that make room). A resident row is displaced
  // only by a row whose count exceeds its own by `margin` (a factor >= 1). The victims are the
  // coldest residents exactly while there are few; with many, the coldest of a random sample of
  // 8 per needed victim (an approximation that keeps a plan's cost independent of the slots).
  HbmPlan NextPlan(size_t max_moves, double margin = 1.25) const;
  // Records the plan (demotions free their slots; promotions take theirs) and updates the index.
  // A plan may be applied in two steps, demotions first. REQUIRES: plans are applied in the
  // order they were made, each before the next NextPlan (one promoter).
  void Apply(const HbmPlan& plan);

  // The slot holding `row`, or kernels::kNoSlot (probes the flat index, as the device does).
  uint32_t SlotOf(uint64_t row) const;
  uint32_t capacity() const { return slots_; }
  uint64_t buckets() const { return bucket_mask_ + 1; }  // fixed at construction: BucketsFor(capacity())
  static uint64_t BucketsFor(uint32_t slots);  // a power of two, at least twice `slots`
  size_t resident() const;
  uint64_t decays() const;  // times every count was halved
  // The flat index, for upload to the device: bucket_mask() + 1 keys (row + 1, 0 = empty) and slots.
  void CopyIndex(std::vector<uint64_t>* keys, std::vector<uint32_t>* slots, uint64_t* bucket_mask) const;

 private:
  void RecordAccessLocked(uint64_t row, uint32_t weight);
  void RebuildIndexLocked();  // sizes the index for `slots_` (at most half full); once, at start
  void IndexInsertLocked(uint64_t row, uint32_t slot) {
    HbmIndexInsert(index_keys_.data(), index_slots_.data(), bucket_mask_, row, slot);
  }
  void IndexEraseLocked(uint64_t row) { HbmIndexErase(index_keys_.data(), index_slots_.data(), bucket_mask_, row); }
  double HeatLocked(uint64_t row) const;

  const uint32_t slots_;
  const uint64_t decay_every_;
  mutable std::mutex mu_;
  absl::flat_hash_map<uint64_t, double> heat_;      // recent access counts (decayed)
  absl::flat_hash_map<uint64_t, uint32_t> row_slot_;  // resident rows
  std::vector<uint64_t> slot_row_;                    // slot -> resident row (kEmptySlot: free)
  // Rows not resident whose count reached admit_heat_ when last recorded: the only rows a plan
  // considers, so a plan costs the candidates and a sample of the residents, not the whole map.
  mutable absl::flat_hash_set<uint64_t> candidates_;
  mutable double admit_heat_ = 0;  // 0 while slots are free; else margin x the coldest resident seen
  std::vector<uint32_t> free_slots_;
  uint64_t recorded_ = 0;     // accesses recorded (weighted)
  uint64_t next_decay_ = 0;   // recorded_ at which counts halve next
  uint64_t decays_ = 0;
  uint32_t last_weight_ = 1;  // a row whose count fell below a quarter of one record is forgotten
  std::vector<uint64_t> index_keys_;
  std::vector<uint32_t> index_slots_;
  uint64_t bucket_mask_ = 0;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_HBM_RESIDENCY_H_
