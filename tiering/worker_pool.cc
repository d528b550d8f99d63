#include "tiering/worker_pool.h"

#include <algorithm>
#include <atomic>
#include <memory>

namespace engram {
namespace {

struct LoopState {
  explicit LoopState(int n_in, const std::function<void(int)>& fn_in) : n(n_in), fn(fn_in) {}
  const int n;
  const std::function<void(int)>& fn;  // outlives the state: ParallelFor waits for `done == n`
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  std::mutex mu;
  std::condition_variable cv;

  void Drain() {
    int finished = 0;
    for (int i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
      fn(i);
      ++finished;
    }
    if (finished > 0 && done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

}  // namespace

WorkerPool::WorkerPool(int num_threads) {
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { WorkerLoop(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::WorkerLoop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping and nothing left
      task = std::move(tasks_.front());
      tasks_.pop_front();
    }
    task();
  }
}

void WorkerPool::ParallelFor(int n, const std::function<void(int)>& fn) {
  if (n <= 0) return;
  const int helpers = std::min(n - 1, num_threads());
  if (helpers <= 0) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  auto state = std::make_shared<LoopState>(n, fn);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int h = 0; h < helpers; ++h) tasks_.push_back([state] { state->Drain(); });
  }
  if (helpers == 1) {
    cv_.notify_one();
  } else {
    cv_.notify_all();
  }
  state->Drain();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace engram
