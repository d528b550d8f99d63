// ParallelFor: split a loop over a few threads (declared in cpu_twin.h).
#ifndef ENGRAM_KERNELS_PARALLEL_FOR_H_
#define ENGRAM_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <thread>
#include <vector>

namespace engram::kernels {

template <typename Fn>
void ParallelFor(int64_t n, int threads, Fn fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (parts == 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> helpers;
  helpers.reserve(static_cast<size_t>(parts - 1));
  auto bound = [&](int64_t p) { return n * p / parts; };
  for (int64_t p = 1; p < parts; ++p) helpers.emplace_back([&, p] { fn(bound(p), bound(p + 1)); });
  fn(bound(0), bound(1));
  for (auto& h : helpers) h.join();
}

}  // namespace engram::kernels

#endif  // ENGRAM_KERNELS_PARALLEL_FOR_H_
