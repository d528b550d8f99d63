// The HBM tier's row index as flat arrays, probed the same way on the host (where the daemon
// builds it and the tests check it) and on the device (where a gather kernel finds a row's slot):
// open addressing over a power-of-two number of buckets, linear probing, keys are global row
// numbers + 1 (0 marks an empty bucket), values are slot numbers in the device arena.
#ifndef ENGRAM_KERNELS_HBM_PROBE_H_
#define ENGRAM_KERNELS_HBM_PROBE_H_

#include <cstdint>

#include "engram/kernels/row_dtype.h"

namespace engram::kernels {

inline constexpr uint32_t kNoSlot = 0xffffffffu;

ENGRAM_HD inline uint64_t HbmBucketOf(uint64_t row, uint64_t bucket_mask) {
  // A 64-bit mix so neighbouring rows spread over the buckets.
  uint64_t x = row + 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return (x ^ (x >> 31)) & bucket_mask;
}

// The slot of `row`, or kNoSlot. `keys`/`slots` have bucket_mask + 1 entries; the table is never
// full (the builder keeps it at most half full), so the probe ends at an empty bucket.
ENGRAM_HD inline uint32_t HbmProbe(const uint64_t* keys, const uint32_t* slots, uint64_t bucket_mask, uint64_t row) {
  for (uint64_t b = HbmBucketOf(row, bucket_mask);; b = (b + 1) & bucket_mask) {
    const uint64_t k = keys[b];
    if (k == row + 1) return slots[b];
    if (k == 0) return kNoSlot;
  }
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_HBM_PROBE_H_
