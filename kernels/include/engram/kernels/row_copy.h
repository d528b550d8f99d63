// Copying whole rows with the widest words their alignment allows, shared by the CUDA gather and
// scatter kernels (one warp per row, 32 lanes) and the host, where the tests run the same lane
// loop for every lane of a warp. A row of `row_bytes` at `src` goes to `dst` as words of W bytes,
// W the widest of 16, 8, 4, 2, 1 that divides row_bytes and every row start: V4.1's 264-byte fp8
// rows (16 x 16 + 8) start 8-byte aligned in a table, so they go as 33 8-byte words, not as 264
// single bytes.
#ifndef ENGRAM_KERNELS_ROW_COPY_H_
#define ENGRAM_KERNELS_ROW_COPY_H_

#include <cstdint>

#include "engram/kernels/row_dtype.h"

namespace engram::kernels {

// The widest word (16, 8, 4, 2 or 1 bytes) that divides `row_bytes` and the addresses OR-ed into
// `bases` (every buffer a row is read from or written to: row starts are base + k * row_bytes).
ENGRAM_HD inline int RowCopyWidth(int64_t row_bytes, uintptr_t bases) {
  const uint64_t bits = static_cast<uint64_t>(row_bytes) | static_cast<uint64_t>(bases);
  if (bits % 16 == 0) return 16;
  if (bits % 8 == 0) return 8;
  if (bits % 4 == 0) return 4;
  if (bits % 2 == 0) return 2;
  return 1;
}

// The words of a W-byte copy, as the types that load them in one instruction.
template <int W>
struct RowWord;
template <>
struct RowWord<16> {
  struct alignas(16) Type {
    uint32_t x, y, z, w;
  };
};
template <>
struct RowWord<8> {
  using Type = uint64_t;
};
template <>
struct RowWord<4> {
  using Type = uint32_t;
};
template <>
struct RowWord<2> {
  using Type = uint16_t;
};
template <>
struct RowWord<1> {
  using Type = uint8_t;
};

// Lane `lane` of `lanes`' share of one row: words lane, lane + lanes, ... (coalesced across the
// lanes of a warp). src, dst and row_bytes must allow W (RowCopyWidth).
template <int W>
ENGRAM_HD inline void CopyRowLane(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t row_bytes,
                                  int lane, int lanes) {
  using Word = typename RowWord<W>::Type;
  const Word* from = reinterpret_cast<const Word*>(src);
  Word* to = reinterpret_cast<Word*>(dst);
  const int64_t words = row_bytes / W;
  for (int64_t w = lane; w < words; w += lanes) {
#ifdef __CUDA_ARCH__
    if constexpr (W == 16) {
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(from + w));
      reinterpret_cast<uint4*>(to)[w] = v;
    } else {
      to[w] = __ldg(from + w);
    }
#else
    to[w] = from[w];
#endif
  }
}

// The same with W chosen at run time (one branch per row, uniform across a warp).
ENGRAM_HD inline void CopyRowLaneAnyWidth(int width, const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                          int64_t row_bytes, int lane, int lanes) {
  switch (width) {
    case 16:
      return CopyRowLane<16>(src, dst, row_bytes, lane, lanes);
    case 8:
      return CopyRowLane<8>(src, dst, row_bytes, lane, lanes);
    case 4:
      return CopyRowLane<4>(src, dst, row_bytes, lane, lanes);
    case 2:
      return CopyRowLane<2>(src, dst, row_bytes, lane, lanes);
    default:
      return CopyRowLane<1>(src, dst, row_bytes, lane, lanes);
  }
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_ROW_COPY_H_
