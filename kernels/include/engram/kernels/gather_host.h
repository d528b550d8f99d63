// Row gather on the host: copy rows of a flat table to their destinations, with the next rows'
// cache lines requested a few rows ahead (a random row is a DRAM miss; overlapping the misses is
// most of the speed). Used by the DRAM tier, by clients gathering from a mapped table, and by the
// CPU twin; the CUDA gather kernel covers the device side.
#ifndef ENGRAM_KERNELS_GATHER_HOST_H_
#define ENGRAM_KERNELS_GATHER_HOST_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "engram/kernels/prefetch.h"

namespace engram::kernels {

inline constexpr size_t kGatherPrefetchRows = 8;

// Requests every cache line of a row (see prefetch.h for why not __builtin_prefetch).
inline void PrefetchRow(const uint8_t* p, uint64_t row_bytes) {
  for (uint64_t off = 0; off < row_bytes; off += 64) PrefetchForRead(p + off);
}

// For i in [0, n): copies row_bytes bytes from src_of(i) to dest_of(i).
template <typename SrcOf, typename DestOf>
inline void GatherFromHost(uint64_t row_bytes, size_t n, SrcOf src_of, DestOf dest_of) {
  for (size_t i = 0; i < n && i < kGatherPrefetchRows; ++i) PrefetchRow(src_of(i), row_bytes);
  for (size_t i = 0; i < n; ++i) {
    if (i + kGatherPrefetchRows < n) PrefetchRow(src_of(i + kGatherPrefetchRows), row_bytes);
    std::memcpy(dest_of(i), src_of(i), row_bytes);
  }
}

// For i in [0, n): copies row_bytes bytes from base + row_of(i) * row_bytes to dest_of(i).
template <typename RowOf, typename DestOf>
inline void GatherRowsHost(const uint8_t* base, uint64_t row_bytes, size_t n, RowOf row_of, DestOf dest_of) {
  GatherFromHost(
      row_bytes, n, [&](size_t i) { return base + static_cast<uint64_t>(row_of(i)) * row_bytes; }, dest_of);
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_GATHER_HOST_H_
