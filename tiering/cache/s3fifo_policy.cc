// S3-FIFO eviction: new rows enter a small FIFO (a tenth of the slots); a row touched while there
// moves to the main FIFO when it reaches the tail, an untouched one is evicted and its key kept in
// a ghost FIFO, so a quick return goes straight to main. Main is a FIFO with lazy promotion: a
// row with hits left is reinserted with one hit fewer. One-hit wonders (scans) never reach main.
#include <algorithm>
#include <deque>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "tiering/cache/policy.h"

namespace engram {
namespace {

constexpr uint8_t kMaxFreq = 3;

class S3FifoPolicy final : public EvictionPolicy {
 public:
  explicit S3FifoPolicy(uint32_t capacity)
      : small_target_(std::max<uint32_t>(1, capacity / 10)),
        ghost_capacity_(std::max<uint32_t>(1, capacity - small_target_)),
        keys_(capacity),
        freq_(capacity, 0),
        in_main_(capacity, 0) {}

  void OnInsert(uint32_t slot, uint64_t key) override {
    keys_[slot] = key;
    freq_[slot] = 0;
    if (ghost_set_.erase(key) > 0) {
      in_main_[slot] = 1;
      main_.push_back(slot);
    } else {
      in_main_[slot] = 0;
      small_.push_back(slot);
    }
  }

  void OnHit(uint32_t slot) override { freq_[slot] = std::min<uint8_t>(kMaxFreq, freq_[slot] + 1); }

  uint32_t PickVictim() override {
    for (;;) {
      if (!small_.empty() && (small_.size() >= small_target_ || main_.empty())) {
        const uint32_t slot = small_.front();
        small_.pop_front();
        if (freq_[slot] > 0) {  // touched while probationary: promote
          freq_[slot] = 0;
          in_main_[slot] = 1;
          main_.push_back(slot);
          continue;
        }
        RememberGhost(keys_[slot]);
        last_probationary_ = true;
        return slot;
      }
      if (main_.empty()) return kNoSlot;
      const uint32_t slot = main_.front();
      main_.pop_front();
      if (freq_[slot] > 0) {
        --freq_[slot];
        main_.push_back(slot);
        continue;
      }
      last_probationary_ = false;
      return slot;
    }
  }
  bool last_victim_probationary() const override { return last_probationary_; }

  void Restore(uint32_t slot) override {
    if (in_main_[slot]) {
      main_.push_front(slot);
    } else {
      ghost_set_.erase(keys_[slot]);  // it was not evicted after all
      small_.push_front(slot);
    }
  }
  absl::string_view name() const override { return "s3fifo"; }

 private:
  void RememberGhost(uint64_t key) {
    if (!ghost_set_.insert(key).second) return;
    ghost_.push_back(key);
    while (ghost_.size() > ghost_capacity_) {
      ghost_set_.erase(ghost_.front());
      ghost_.pop_front();
    }
  }

  const uint32_t small_target_;
  const uint32_t ghost_capacity_;
  std::vector<uint64_t> keys_;
  std::vector<uint8_t> freq_;
  std::vector<uint8_t> in_main_;
  std::deque<uint32_t> small_, main_;
  std::deque<uint64_t> ghost_;
  absl::flat_hash_set<uint64_t> ghost_set_;
  bool last_probationary_ = false;
};

// Keeps whatever was inserted; the cache fills it hottest-first from a profile or hindsight.
class PinnedPolicy final : public EvictionPolicy {
 public:
  void OnInsert(uint32_t, uint64_t) override {}
  void OnHit(uint32_t) override {}
  uint32_t PickVictim() override { return kNoSlot; }
  void Restore(uint32_t) override {}
  absl::string_view name() const override { return "static-topk"; }
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeS3FifoPolicy(uint32_t capacity) {
  return std::make_unique<S3FifoPolicy>(capacity);
}
std::unique_ptr<EvictionPolicy> MakePinnedPolicy(uint32_t) { return std::make_unique<PinnedPolicy>(); }

}  // namespace engram
