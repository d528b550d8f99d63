// Index streams for engram-bench: Zipf(alpha) draws over each head's rows (alpha 0 = uniform),
// or a real token trace hashed with the table's layout. Batches are generated before timing, so
// the figures measure lookups, not the generator. Not thread-safe while generating; the batches
// are read-only afterwards.
#ifndef ENGRAM_BENCH_WORKLOAD_H_
#define ENGRAM_BENCH_WORKLOAD_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

// Ranks 1..n with P(k) proportional to k^-alpha (rejection-inversion sampling; O(1) per draw).
class ZipfSampler {
 public:
  ZipfSampler(uint64_t n, double alpha);
  uint64_t Sample(std::mt19937_64& rng) const;  // in [1, n]

 private:
  double H(double x) const;
  double HInverse(double x) const;
  double h(double x) const;

  uint64_t n_;
  double alpha_;
  double h_integral_x1_, h_integral_n_, s_;
};

struct Batch {
  int layer_id = 0;
  uint32_t num_tokens = 0;
  std::vector<uint32_t> indices;  // [num_tokens][heads], head-local
};

struct WorkloadSpec {
  std::string text;  // "zipf:ALPHA" or "trace:FILE.i32"
  bool is_trace = false;
  double alpha = 0;
  std::string trace_path;
};

absl::StatusOr<WorkloadSpec> ParseWorkload(const std::string& text);

// Makes up to `max_batches` batches of `batch_tokens` tokens, cycling through `layers`.
absl::StatusOr<std::vector<Batch>> MakeBatches(const WorkloadSpec& spec, const NgramHasher& hasher,
                                               uint32_t batch_tokens, int max_batches, uint64_t seed);

}  // namespace engram

#endif  // ENGRAM_BENCH_WORKLOAD_H_
