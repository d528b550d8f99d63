// A fixed pool of threads that helps callers run a loop of independent pieces (ParallelFor).
// The calling thread always works on its own loop too, so a request never waits for a free
// worker to make progress. Thread-safe: any number of callers may use one pool at once.
#ifndef ENGRAM_TIERING_WORKER_POOL_H_
#define ENGRAM_TIERING_WORKER_POOL_H_

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"

namespace engram {

class WorkerPool {
 public:
  // `num_threads` helpers (0 means: every loop runs on its caller only).
  explicit WorkerPool(int num_threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int num_threads() const { return static_cast<int>(threads_.size()); }

  // Runs fn(i) for i in [0, n), on the caller and up to num_threads() helpers; returns when all
  // are done. fn must be safe to call concurrently for different i.
  void ParallelFor(int n, const std::function<void(int)>& fn);

 private:
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_WORKER_POOL_H_
