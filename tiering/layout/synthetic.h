// Synthetic row values (DESIGN.md "Data model"): element j of global row r of layer L is
// float(bits >> 40) / 2^23 - 1 with bits = splitmix64(seed ^ (L << 56) ^ (r*dim + j)).
// Any row of a generated pack can be checked against this without a reference copy.
// Pure inline functions; thread-safe.
#ifndef ENGRAM_TIERING_LAYOUT_SYNTHETIC_H_
#define ENGRAM_TIERING_LAYOUT_SYNTHETIC_H_

#include <cstdint>

#include "engram/kernels/row_dtype.h"

namespace engram {

inline uint64_t SplitMix64(uint64_t k) {
  uint64_t z = k + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Exact in f32: a 24-bit integer scaled by a power of two, minus one.
inline float SyntheticValue(uint64_t seed, int layer_id, uint64_t row, int dim, int j) {
  const uint64_t bits =
      SplitMix64(seed ^ (static_cast<uint64_t>(layer_id) << 56) ^ (row * static_cast<uint64_t>(dim) + j));
  return static_cast<float>(bits >> 40) / 8388608.0f - 1.0f;
}

// Writes global row `row` of layer `layer_id` in `dtype` to `out` (RowBytesFor(dtype, dim) bytes).
// `scratch` holds at least `dim` floats.
inline void SyntheticRow(uint64_t seed, int layer_id, uint64_t row, int dim, RowDtype dtype,
                         float* scratch, uint8_t* out) {
  for (int j = 0; j < dim; ++j) scratch[j] = SyntheticValue(seed, layer_id, row, dim, j);
  EncodeRow(scratch, dim, dtype, out);
}

}  // namespace engram

#endif  // ENGRAM_TIERING_LAYOUT_SYNTHETIC_H_
