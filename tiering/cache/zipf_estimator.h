// ZipfEstimator: estimates the Zipf exponent of a layer's row stream online and predicts the hit
// ratio a cache of a given size should reach. It counts a sample of accesses (one in
// `sample_every`) in a Space-Saving summary of the heaviest rows, then fits log(count) against
// log(rank) by least squares over the counts the summary guarantees (count minus what an entry
// inherited when it took over a slot), for ranks with at least 64 such samples: those track the
// true exponent within about 0.07 for alpha in 0.6..1.2 (tests/unit/prefetch_test.cc). New keys
// take over the smallest counters in batches, so a sampled access costs O(log tracked).
// Thread-safe (a mutex, taken only for sampled accesses).
#ifndef ENGRAM_TIERING_CACHE_ZIPF_ESTIMATOR_H_
#define ENGRAM_TIERING_CACHE_ZIPF_ESTIMATOR_H_

#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace engram {

class ZipfEstimator {
 public:
  explicit ZipfEstimator(uint32_t tracked = 2048, uint32_t sample_every = 8)
      : tracked_(tracked), sample_every_(sample_every) {}

  void Record(uint64_t key);
  // The fitted exponent, once enough accesses were seen (nullopt before).
  std::optional<double> Alpha() const;

  // Hit ratio of a cache holding the `capacity` most popular of `items` items under Zipf(alpha):
  // H(capacity, alpha) / H(items, alpha), H the generalized harmonic number.
  static double PredictHitRatio(double alpha, uint64_t capacity, uint64_t items);

 private:
  const uint32_t tracked_;
  const uint32_t sample_every_;
  std::atomic<uint64_t> seen_{0};
  mutable std::mutex mu_;
  struct Entry {
    uint64_t count = 0;
    uint64_t error = 0;  // count inherited on takeover: count - error is a guaranteed lower bound
  };
  absl::flat_hash_map<uint64_t, Entry> counts_;  // Space-Saving: at most `tracked_` keys
  std::vector<uint64_t> newcomers_;              // keys waiting to take over the smallest slots
  void ReplaceSmallestLocked();
  uint64_t sampled_ = 0;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_CACHE_ZIPF_ESTIMATOR_H_
