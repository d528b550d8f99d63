#include "tiering/cache/zipf_estimator.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace engram {
namespace {

// sum_{i=1..n} i^-alpha: exact for the first terms, then the integral (midpoint rule).
double Harmonic(uint64_t n, double alpha) {
  constexpr uint64_t kExact = 1000;
  double sum = 0;
  for (uint64_t i = 1; i <= std::min(n, kExact); ++i) sum += std::pow(static_cast<double>(i), -alpha);
  if (n <= kExact) return sum;
  const double a = kExact + 0.5, b = static_cast<double>(n) + 0.5;
  if (std::fabs(alpha - 1.0) < 1e-9) return sum + std::log(b / a);
  return sum + (std::pow(b, 1 - alpha) - std::pow(a, 1 - alpha)) / (1 - alpha);
}

}  // namespace

void ZipfEstimator::Record(uint64_t key) {
  if (seen_.fetch_add(1, std::memory_order_relaxed) % sample_every_ != 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  ++sampled_;
  if (auto it = counts_.find(key); it != counts_.end()) {
    ++it->second.count;
    return;
  }
  if (counts_.size() < tracked_) {
    counts_.emplace(key, Entry{1, 0});
    return;
  }
  newcomers_.push_back(key);
  if (newcomers_.size() >= std::max<uint32_t>(1, tracked_ / 16)) ReplaceSmallestLocked();
}

// Space-Saving, batched: the newcomers take over the smallest counters, each starting from the
// largest count it displaced (plus one) and carrying that as its error.
void ZipfEstimator::ReplaceSmallestLocked() {
  std::sort(newcomers_.begin(), newcomers_.end());
  std::vector<std::pair<uint64_t, uint64_t>> distinct;  // (key, occurrences)
  for (uint64_t k : newcomers_) {
    if (!distinct.empty() && distinct.back().first == k) {
      ++distinct.back().second;
    } else {
      distinct.emplace_back(k, 1);
    }
  }
  newcomers_.clear();
  std::vector<std::pair<uint64_t, uint64_t>> by_count;  // (count, key)
  by_count.reserve(counts_.size());
  for (const auto& [k, e] : counts_) by_count.emplace_back(e.count, k);
  const size_t evict = std::min(distinct.size(), by_count.size());
  std::nth_element(by_count.begin(), by_count.begin() + (evict - 1), by_count.end());
  uint64_t floor = 0;
  for (size_t i = 0; i < evict; ++i) {
    floor = std::max(floor, by_count[i].first);
    counts_.erase(by_count[i].second);
  }
  for (const auto& [k, n] : distinct) {
    auto [it, inserted] = counts_.try_emplace(k, Entry{floor + n, floor});
    if (!inserted) it->second.count += n;
  }
}

std::optional<double> ZipfEstimator::Alpha() const {
  std::vector<uint64_t> counts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (sampled_ < 20 * tracked_) return std::nullopt;  // too little seen for a stable fit
    // Guaranteed counts only: the inherited part is what flattens the tail of a Space-Saving summary.
    for (const auto& [k, e] : counts_) counts.push_back(e.count - e.error);
  }
  std::sort(counts.begin(), counts.end(), std::greater<>());
  // Fit over the top ranks, where Space-Saving counts are accurate (the tail is inflated).
  const size_t n = std::min<size_t>(counts.size(), tracked_ / 4);
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  size_t used = 0;
  for (size_t r = 0; r < n; ++r) {
    if (counts[r] < 64) break;
    const double x = std::log(static_cast<double>(r + 1)), y = std::log(static_cast<double>(counts[r]));
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
    ++used;
  }
  if (used < 8) return std::nullopt;
  const double slope = (used * sxy - sx * sy) / (used * sxx - sx * sx);
  return std::max(0.0, -slope);
}

double ZipfEstimator::PredictHitRatio(double alpha, uint64_t capacity, uint64_t items) {
  if (items == 0) return 0;
  capacity = std::min(capacity, items);
  return Harmonic(capacity, alpha) / Harmonic(items, alpha);
}

}  // namespace engram
