// Bit-exact re-statement of the parts of numpy's random machinery that the Engram
// reference hashing uses: SeedSequence(entropy) -> PCG64 -> Generator.integers(0, high)
// for 64-bit ranges (Lemire's bounded method). Facts from HASHING.md section 2.
//
// Pure functions and a small value type; no shared state, safe from any thread.
#ifndef ENGRAM_TIERING_LAYOUT_NUMPY_RNG_H_
#define ENGRAM_TIERING_LAYOUT_NUMPY_RNG_H_

#include <array>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace engram {

// numpy.random.SeedSequence(entropy).generate_state(num_words, uint32) for a
// non-negative integer entropy (any width; split into 32-bit little-endian words).
std::vector<uint32_t> SeedSequenceState(unsigned __int128 entropy, int num_words);

// numpy's PCG64 bit generator (XSL-RR 128/64), seeded as numpy seeds it.
class Pcg64 {
 public:
  // Equivalent to numpy.random.PCG64(SeedSequence(entropy)).
  static Pcg64 FromEntropy(unsigned __int128 entropy);

  uint64_t Next64();

  // Generator.integers(0, high, dtype=int64) for one value. REQUIRES: high - 1 >
  // 0xFFFFFFFF (numpy's 32-bit buffered path is not re-stated; callers reject it).
  uint64_t BoundedBelow(uint64_t high);

 private:
  Pcg64(unsigned __int128 initstate, unsigned __int128 initseq);
  void Step();

  unsigned __int128 state_ = 0;
  unsigned __int128 inc_ = 0;
};

// Draws numpy default_rng(seed).integers(0, high, size=count, dtype=int64).
// Fails with InvalidArgument when the range would take numpy's 32-bit path.
absl::StatusOr<std::vector<uint64_t>> NumpyIntegers(uint64_t seed, uint64_t high, int count);

}  // namespace engram

#endif  // ENGRAM_TIERING_LAYOUT_NUMPY_RNG_H_
