// Least-recently-used eviction over slot ids: an intrusive doubly linked list in two arrays.
#include <vector>

#include "tiering/cache/policy.h"

namespace engram {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(uint32_t capacity) : prev_(capacity, kNoSlot), next_(capacity, kNoSlot) {}

  void OnInsert(uint32_t slot, uint64_t) override { PushFront(slot); }
  void OnHit(uint32_t slot) override {
    Unlink(slot);
    PushFront(slot);
  }
  uint32_t PickVictim() override {
    const uint32_t slot = tail_;
    if (slot != kNoSlot) Unlink(slot);
    return slot;
  }
  void Restore(uint32_t slot) override { PushBack(slot); }
  absl::string_view name() const override { return "lru"; }

 private:
  void PushFront(uint32_t slot) {
    prev_[slot] = kNoSlot;
    next_[slot] = head_;
    if (head_ != kNoSlot) prev_[head_] = slot;
    head_ = slot;
    if (tail_ == kNoSlot) tail_ = slot;
  }
  void PushBack(uint32_t slot) {
    next_[slot] = kNoSlot;
    prev_[slot] = tail_;
    if (tail_ != kNoSlot) next_[tail_] = slot;
    tail_ = slot;
    if (head_ == kNoSlot) head_ = slot;
  }
  void Unlink(uint32_t slot) {
    if (prev_[slot] != kNoSlot) {
      next_[prev_[slot]] = next_[slot];
    } else {
      head_ = next_[slot];
    }
    if (next_[slot] != kNoSlot) {
      prev_[next_[slot]] = prev_[slot];
    } else {
      tail_ = prev_[slot];
    }
    prev_[slot] = next_[slot] = kNoSlot;
  }

  std::vector<uint32_t> prev_, next_;
  uint32_t head_ = kNoSlot, tail_ = kNoSlot;
};

}  // namespace

std::unique_ptr<EvictionPolicy> MakeLruPolicy(uint32_t capacity) { return std::make_unique<LruPolicy>(capacity); }

}  // namespace engram
