// The HBM tier's row index as flat arrays, probed the same way on the host (where the daemon
// builds it and the tests check it) and on the device (where a gather kernel finds a row's slot):
// open addressing over a power-of-two number of buckets, linear probing, keys are global row
// numbers + 1 (0 marks an empty bucket), values are slot numbers in the device arena.
#ifndef ENGRAM_KERNELS_HBM_PROBE_H_
#define ENGRAM_KERNELS_HBM_PROBE_H_

#include <cstdint>

#include "engram/kernels/row_dtype.h"
#ifndef __CUDACC__
#include <atomic>

#include "engram/kernels/prefetch.h"
#endif

namespace engram::kernels {

inline constexpr uint32_t kNoSlot = 0xffffffffu;

// A 64-bit mix (splitmix64's step): neighbouring inputs give unrelated outputs. The HBM tier uses
// it for bucket homes, and as a counter-based generator for its random samples.
ENGRAM_HD inline uint64_t HbmMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

ENGRAM_HD inline uint64_t HbmBucketOf(uint64_t row, uint64_t bucket_mask) { return HbmMix64(row) & bucket_mask; }

// The slot of `row`, or kNoSlot. `keys`/`slots` have bucket_mask + 1 entries; the table is never
// full (the builder keeps it at most half full), so the probe ends at an empty bucket.
ENGRAM_HD inline uint32_t HbmProbe(const uint64_t* keys, const uint32_t* slots, uint64_t bucket_mask, uint64_t row) {
  for (uint64_t b = HbmBucketOf(row, bucket_mask);; b = (b + 1) & bucket_mask) {
    const uint64_t k = keys[b];
    if (k == row + 1) return slots[b];
    if (k == 0) return kNoSlot;
  }
}

// A client's device gather over the HBM tier: per output row a source, either a slot of the tier
// or (with this bit) a row the client staged itself because the index did not have it.
inline constexpr uint32_t kHbmFromStaging = 0x80000000u;

ENGRAM_HD inline const uint8_t* HbmRowSource(uint32_t source, const uint8_t* slots, const uint8_t* staged,
                                             int64_t row_bytes) {
  return (source & kHbmFromStaging) != 0 ? staged + static_cast<int64_t>(source & ~kHbmFromStaging) * row_bytes
                                         : slots + static_cast<int64_t>(source) * row_bytes;
}

// The direct device gather (LookupToDevice over a mapped table the GPU reads in place): per
// output row a 64-bit source, a slot of the tier or (with this bit) a row of the layer's mapping
// in host memory, which the kernel reads over PCIe through the mapping's CUDA registration.
inline constexpr uint64_t kDirectFromHost = 0x8000000000000000ull;

ENGRAM_HD inline const uint8_t* DirectRowSource(uint64_t source, const uint8_t* slots, const uint8_t* host_rows,
                                                int64_t row_bytes) {
  return (source & kDirectFromHost) != 0 ? host_rows + static_cast<int64_t>(source & ~kDirectFromHost) * row_bytes
                                         : slots + static_cast<int64_t>(source) * row_bytes;
}

// A row the same request already reads from host memory: (with this bit) the earlier output row
// that reads it. The gather leaves such rows out, and a second pass copies them on the device from
// that output row, so each row crosses PCIe once per request however often the request names it.
inline constexpr uint64_t kDirectRepeat = 0x4000000000000000ull;

ENGRAM_HD inline bool IsDirectRepeat(uint64_t source) { return (source & kDirectRepeat) != 0; }
ENGRAM_HD inline int64_t DirectRepeatOf(uint64_t source) { return static_cast<int64_t>(source & ~kDirectRepeat); }

#ifndef __CUDACC__
// The direct gather's two passes on the host (the kernels' twin, for tests): every row that is
// not a repeat from its source, then every repeat from the output row it names.
inline void ReplayDirectGather(const uint64_t* sources, int64_t n, const uint8_t* slots, const uint8_t* host_rows,
                               int64_t row_bytes, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (IsDirectRepeat(sources[i])) continue;
    const uint8_t* from = DirectRowSource(sources[i], slots, host_rows, row_bytes);
    for (int64_t b = 0; b < row_bytes; ++b) out[i * row_bytes + b] = from[b];
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!IsDirectRepeat(sources[i])) continue;
    const uint8_t* from = out + DirectRepeatOf(sources[i]) * row_bytes;
    for (int64_t b = 0; b < row_bytes; ++b) out[i * row_bytes + b] = from[b];
  }
}
#endif

#ifndef __CUDACC__
// HbmProbe for many rows on the host: the buckets of the rows a little ahead are requested before
// they are probed, so the index's cache misses overlap instead of coming one after another (the
// index is far bigger than the caches). out_slots[i] = HbmProbe(..., rows[i]).
inline constexpr size_t kHbmProbeAhead = 16;
// See prefetch.h for why not __builtin_prefetch.
inline void HbmPrefetchBucket(const uint64_t* keys, const uint32_t* slots, uint64_t bucket_mask, uint64_t row) {
  const uint64_t b = HbmBucketOf(row, bucket_mask);
  PrefetchForRead(keys + b);
  PrefetchForRead(slots + b);
}
inline void HbmProbeMany(const uint64_t* keys, const uint32_t* slots, uint64_t bucket_mask, const uint64_t* rows,
                         size_t n, uint32_t* out_slots) {
  for (size_t i = 0; i < n && i < kHbmProbeAhead; ++i) HbmPrefetchBucket(keys, slots, bucket_mask, rows[i]);
  for (size_t i = 0; i < n; ++i) {
    if (i + kHbmProbeAhead < n) HbmPrefetchBucket(keys, slots, bucket_mask, rows[i + kHbmProbeAhead]);
    out_slots[i] = HbmProbe(keys, slots, bucket_mask, rows[i]);
  }
}

// The index as engramd publishes it to clients in shared memory (a memfd they map read-only):
// this header, then two buffers of keys and two of slots. Generation g is current and lives in
// buffer g % 2; engramd writes the other buffer, then bumps the generation.
//
// Readers announce the generation they use in a pin (one per client and HBM layer, in the client's
// own arena): load g, store pin = g + 1, load the generation again and retry if it moved; then
// check that the index is not detached (else unpin and read elsewhere); probe buffer g % 2 and
// read the slots it names; store pin = 0 when the rows have been copied
// (for a GPU gather: when the copy has completed on its stream). engramd publishes a new
// generation, or rewrites a slot an earlier generation named, only once no pin is below the
// current generation, so a reader never sees a buffer or a slot change under it.
inline constexpr uint32_t kHbmIndexMagic = 0x58444948;  // "HIDX"
inline constexpr uint32_t kHbmIndexVersion = 1;

struct alignas(64) HbmIndexHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t slots;  // rows the slot arena holds
  uint32_t reserved;
  uint64_t row_bytes;
  uint64_t bucket_mask;       // each buffer has bucket_mask + 1 buckets
  uint64_t keys_offset[2];    // from the start of the mapping: uint64 row + 1 (0 = empty)
  uint64_t values_offset[2];  // uint32 slot numbers
  uint64_t total_bytes;
  alignas(64) std::atomic<uint64_t> generation;
  // 1 once engramd has stopped serving this index (it is shutting down: its promoter has stopped
  // and the slots are about to go away). A reader checks it after pinning and, when set, unpins
  // and reads the rows from the table instead: nothing protects the slots any more.
  alignas(64) std::atomic<uint32_t> detached;
};
static_assert(std::atomic<uint64_t>::is_always_lock_free);
#endif

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_HBM_PROBE_H_
