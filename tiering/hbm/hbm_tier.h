// HbmTier: one layer's HBM tier in engramd. It keeps the layer's hottest rows in a slot store
// (GPU memory; host memory for testing, see hbm_slot_store.h) and publishes where each row is
// through an index in shared memory (engram/kernels/hbm_probe.h: HbmIndexHeader) that clients map
// read-only; clients then gather hits from the slots themselves and ask the tier below for the
// rest.
//
// Who feeds it: the engine samples the rows of lookups it serves (SampleLookup), clients that
// gather on their own report samples of their rows (RecordRows). The engine's sampling adapts to
// the load: it counts every row while steps see at most `samples_per_step` of them on average
// (over 8 steps), and one in 2, 4, ... (up to 1024) as the load grows; each sample weighs the
// accesses it stands for.
// Who moves rows: a promoter thread calls Step every few milliseconds. A step plans a batch by
// the decayed counts (HbmResidency: promotion of the hottest rows, demotion of the coldest when
// the slots are full), publishes an index without the demoted rows, waits until no reader still
// uses an older index, writes the promoted rows into their slots, and publishes them.
//
// Readers: every client that maps the tier has a pin (AddReader) saying which generation it is
// using (0: none). Nothing a reader could be looking at changes while it is pinned; a reader that
// stays pinned stalls promotion (counted in stats().stalls), never correctness.
//
// Thread-safe: SampleLookup and RecordRows from any thread; Step from one promoter thread.
#ifndef ENGRAM_TIERING_HBM_HBM_TIER_H_
#define ENGRAM_TIERING_HBM_HBM_TIER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/kernels/hbm_probe.h"
#include "tiering/cache/zipf_estimator.h"
#include "tiering/hbm/hbm_residency.h"
#include "tiering/hbm/hbm_sampler.h"
#include "tiering/hbm/hbm_slot_store.h"
#include "tiering/row_tier.h"

namespace engram {

struct HbmTierOptions {
  uint64_t decay_every = 1ull << 26;  // accesses (as the samples weigh them) between halvings of every count;
                                      // longer while sampling (HbmResidency::DecayPeriod)
  size_t max_moves = 4096;            // promotions per step
  double margin = 1.25;               // a resident row is displaced by one at least this much hotter
  size_t samples_per_step = 16384;    // the engine's sampling keeps about this many rows a step
  size_t max_pending_samples = 1u << 18;  // between two steps; more are dropped (counted)
  int quiesce_wait_us = 2000;         // how long a step waits for readers before leaving it to the next
};

struct HbmTierStats {
  uint64_t generation = 0;
  uint64_t resident = 0;
  uint64_t promotions = 0;
  uint64_t demotions = 0;
  uint64_t stalls = 0;            // steps that could not go on because a reader held an old index
  uint64_t samples = 0;           // rows recorded
  uint64_t samples_dropped = 0;
  uint32_t sample_every = 1;      // the engine counts one row in this many now
  uint64_t readers = 0;
  // Rows clients that map this tier gathered: from its slots, and from the tier below.
  uint64_t served_hbm = 0, served_below = 0;
};

class HbmTier {
 public:
  // `source`: the layer's tier below (rows are read from it when promoted); must outlive this.
  static absl::StatusOr<std::unique_ptr<HbmTier>> Create(RowTier* source, std::unique_ptr<HbmSlotStore> store,
                                                         const HbmTierOptions& options = {});
  ~HbmTier();
  HbmTier(const HbmTier&) = delete;
  HbmTier& operator=(const HbmTier&) = delete;

  void SampleLookup(absl::Span<const uint64_t> rows);
  // Rows already sampled by someone else, one for every `weight` accesses.
  // REQUIRES: every row < source->total_rows().
  void RecordRows(absl::Span<const uint64_t> rows, uint32_t weight = 1);

  // What clients that map this tier report gathering: rows from its slots, rows from below.
  void CountServed(uint64_t hbm_rows, uint64_t below_rows) {
    served_hbm_.fetch_add(hbm_rows, std::memory_order_relaxed);
    served_below_.fetch_add(below_rows, std::memory_order_relaxed);
  }
  // The Zipf exponent fitted to the counted rows (nullopt until enough were seen).
  std::optional<double> zipf_alpha() const { return frequency_.Alpha(); }

  // One promoter round; true when it published a new index. After an error publishing the index
  // the tier stays as published (still correct) and every later Step returns that error.
  absl::StatusOr<bool> Step();

  // A reader's pin (kernels::HbmIndexHeader explains it). RemoveReader returns only when no step
  // is looking at the pin any more, so its memory may be unmapped right after.
  void AddReader(const std::atomic<uint64_t>* pin);
  void RemoveReader(const std::atomic<uint64_t>* pin);

  // Shutdown, after the promoter has stopped: MarkDetached marks the published index detached
  // (readers that pin from now on read elsewhere); WaitUnpinned then waits, until `deadline`, for
  // readers already pinned to let go, so the slots may be freed after it (false: some reader
  // still held a pin). Mark every tier first, then wait on them against one deadline.
  void MarkDetached();
  bool WaitUnpinned(std::chrono::steady_clock::time_point deadline);

  // The shared index: a memfd of index_bytes() bytes (writable; hand clients a read-only one).
  int index_fd() const { return index_fd_; }
  uint64_t index_bytes() const { return index_bytes_; }
  const kernels::HbmIndexHeader* header() const { return header_; }
  HbmSlotStore* store() const { return store_.get(); }
  uint64_t total_rows() const { return source_->total_rows(); }
  HbmTierStats stats() const;
  // Where the published index puts `row` (kernels::kNoSlot: not in HBM), probed like a reader.
  uint32_t PublishedSlotOf(uint64_t row) const;

 private:
  struct IndexEdit {
    uint64_t row;
    uint32_t slot;  // kNoSlot: erase
  };
  HbmTier(RowTier* source, std::unique_ptr<HbmSlotStore> store, const HbmTierOptions& options);
  absl::Status Init();
  bool Quiescent();  // no pinned reader below the current generation
  bool WaitQuiescent();
  // Brings the back buffer up to date with `edits` and makes it the current generation.
  absl::Status Publish(std::vector<IndexEdit> edits);
  absl::Status WritePromotions(const std::vector<HbmMove>& promote);
  uint64_t* keys(int b) const;
  uint32_t* values(int b) const;

  RowTier* source_;
  std::unique_ptr<HbmSlotStore> store_;
  HbmTierOptions options_;
  HbmResidency residency_;

  int index_fd_ = -1;
  uint64_t index_bytes_ = 0;
  uint8_t* index_base_ = nullptr;
  kernels::HbmIndexHeader* header_ = nullptr;
  std::vector<IndexEdit> last_edits_;   // what the back buffer has not seen yet
  std::vector<HbmMove> pending_promote_;  // demoted already; promoted once readers moved on
  absl::Status failed_;                   // a publication failed: the tier is frozen

  std::mutex readers_mu_;
  std::vector<const std::atomic<uint64_t>*> readers_;

  static constexpr uint32_t kMaxSampleEvery = 1024;
  std::mutex samples_mu_;
  std::vector<uint64_t> samples_;            // from SampleLookup, each weighs sample_every_
  std::vector<std::pair<uint64_t, uint32_t>> reported_;  // from RecordRows: row, weight
  uint32_t sample_every_ = 1;                // changed only by Step, under samples_mu_
  static constexpr uint32_t kAdaptWindowSteps = 8;
  uint64_t window_samples_ = 0;              // Step's, over the current window
  uint32_t window_steps_ = 0;
  HbmSampler sampler_{1};                    // under samples_mu_
  std::atomic<uint64_t> samples_recorded_{0}, samples_dropped_{0};
  std::atomic<uint64_t> promotions_{0}, demotions_{0}, stalls_{0};
  std::atomic<uint64_t> served_hbm_{0}, served_below_{0};
  ZipfEstimator frequency_{2048, 1};  // fed by Step with a bounded share of its samples
};

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_HBM_TIER_H_
