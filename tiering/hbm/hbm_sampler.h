// HbmSampler: picks about one item in `every` from a stream that arrives in batches, for the HBM
// tier's access counts. The gaps between picks are random (uniform in [1, 2*every - 1], mean
// `every`) and carry over from one batch to the next, so neither a batch's layout (rows are
// token-major with a fixed number of heads: a fixed stride of 64 would count one head only) nor
// small batches decide which rows get counted. Not thread-safe: the caller serializes.
#ifndef ENGRAM_TIERING_HBM_HBM_SAMPLER_H_
#define ENGRAM_TIERING_HBM_HBM_SAMPLER_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "engram/kernels/hbm_probe.h"

namespace engram {

class HbmSampler {
 public:
  explicit HbmSampler(uint32_t every, uint64_t seed = 0x9e3779b97f4a7c15ULL)
      : every_(std::max<uint32_t>(1, every)), state_(seed) {
    next_ = Gap() - 1;
  }

  // Calls pick(i) for the picked positions i of a batch of `n` items, in order.
  template <typename Pick>
  void ForEach(size_t n, Pick&& pick) {
    while (next_ < n) {
      pick(static_cast<size_t>(next_));
      next_ += Gap();
    }
    next_ -= n;
  }

 private:
  uint64_t Gap() {
    if (every_ == 1) return 1;
    // Cheap, and good enough to decorrelate the picks from the batch layout.
    return 1 + kernels::HbmMix64(state_++) % (2 * uint64_t{every_} - 1);
  }

  uint32_t every_;
  uint64_t state_;
  uint64_t next_ = 0;  // position of the next pick, counted from the start of the next batch
};

}  // namespace engram

#endif  // ENGRAM_TIERING_HBM_HBM_SAMPLER_H_
