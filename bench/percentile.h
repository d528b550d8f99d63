// The q-quantile (0 <= q <= 1) of measured times, nearest rank from below, as every engram-bench
// mode and the device check report them; 0 for no samples.
#ifndef ENGRAM_BENCH_PERCENTILE_H_
#define ENGRAM_BENCH_PERCENTILE_H_

#include <algorithm>
#include <cstddef>
#include <vector>

namespace engram {

// `sorted` ascending (several quantiles of one run sort once).
inline double PercentileOfSorted(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  return sorted[std::min(sorted.size() - 1, static_cast<size_t>(q * static_cast<double>(sorted.size())))];
}

inline double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  return PercentileOfSorted(values, q);
}

}  // namespace engram

#endif  // ENGRAM_BENCH_PERCENTILE_H_
