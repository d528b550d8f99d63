// TinyLFU admission (Einziger et al.): a count-min sketch of small saturating counters estimates
// each key's recent frequency; every `sample_size` recorded accesses all counters are halved, so
// the estimate follows what is popular now. A miss displaces the victim only if it is estimated
// to be used more often.
#include <algorithm>
#include <bit>
#include <vector>

#include "tiering/cache/policy.h"

namespace engram {
namespace {

constexpr int kDepth = 4;
constexpr uint8_t kMaxCount = 15;

uint64_t Mix(uint64_t x, uint64_t seed) {
  x ^= seed;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 31;
  x *= 0x94D049BB133111EBULL;
  return x ^ (x >> 29);
}

class TinyLfu final : public AdmissionPolicy {
 public:
  explicit TinyLfu(uint32_t capacity)
      : width_(std::bit_ceil(std::max<uint64_t>(256, uint64_t{capacity} * 4))),
        counters_(width_ * kDepth, 0),
        sample_size_(std::max<uint64_t>(1024, 10ull * capacity)) {}

  void RecordAccess(uint64_t key) override {
    for (int d = 0; d < kDepth; ++d) {
      uint8_t& c = counters_[Index(key, d)];
      if (c < kMaxCount) ++c;
    }
    if (++recorded_ >= sample_size_) Age();
  }

  bool Admit(uint64_t candidate, uint64_t victim) override { return Estimate(candidate) > Estimate(victim); }

  uint32_t Estimate(uint64_t key) const override {
    uint8_t lowest = kMaxCount;
    for (int d = 0; d < kDepth; ++d) lowest = std::min(lowest, counters_[Index(key, d)]);
    return lowest;
  }

 private:
  size_t Index(uint64_t key, int d) const {
    return static_cast<size_t>(d) * width_ + (Mix(key, 0x9E3779B97F4A7C15ULL * (d + 1)) & (width_ - 1));
  }
  void Age() {
    for (auto& c : counters_) c >>= 1;
    recorded_ /= 2;
  }

  const uint64_t width_;
  std::vector<uint8_t> counters_;
  const uint64_t sample_size_;
  uint64_t recorded_ = 0;
};

}  // namespace

std::unique_ptr<AdmissionPolicy> MakeTinyLfuAdmission(uint32_t capacity) { return std::make_unique<TinyLfu>(capacity); }

}  // namespace engram
