// BackgroundOnce: a slow job runs once per key off the caller's thread; callers hear "not yet"
// meanwhile, then its value or its error; Clear waits for running jobs and undoes their values.
#include "client/background_once.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <string>

namespace engram {
namespace {

// A job the test lets finish when it wants to.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false;
  void Open() {
    std::lock_guard<std::mutex> lock(mu);
    open = true;
    cv.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [this] { return open; });
  }
};

template <typename Once>
absl::StatusOr<int> WaitFor(Once& once, int key, typename Once::Job job) {
  for (int i = 0; i < 2000; ++i) {  // bounded: 10 s
    auto r = once.Get(key, "job", job);
    if (r.ok() || r.status().message().find("in the background") == std::string::npos) return r;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return absl::DeadlineExceededError("the job never finished");
}

TEST(BackgroundOnceTest, CallersDoNotWaitForTheJobAndItRunsOnce) {
  BackgroundOnce<int, int> once;
  Gate gate;
  std::atomic<int> runs{0};
  auto job = [&]() -> absl::StatusOr<int> {
    ++runs;
    gate.Wait();
    return 42;
  };
  // While the job is held, every call returns at once with "not yet".
  for (int i = 0; i < 5; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto r = once.Get(1, "registering", job);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(r.status().message().find("registering"), std::string::npos) << r.status();
  }
  gate.Open();
  auto r = WaitFor(once, 1, job);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 42);
  EXPECT_EQ(runs.load(), 1);
  // Another key is another job.
  auto other = WaitFor(once, 2, [] { return absl::StatusOr<int>(7); });
  ASSERT_TRUE(other.ok());
  EXPECT_EQ(*other, 7);
}

TEST(BackgroundOnceTest, AFailedJobIsRememberedAsAReasonToGoAnotherWay) {
  BackgroundOnce<int, int> once;
  std::atomic<int> runs{0};
  auto job = [&]() -> absl::StatusOr<int> {
    ++runs;
    return absl::InternalError("cudaHostRegister: out of memory");
  };
  auto r = WaitFor(once, 3, job);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("out of memory"), std::string::npos) << r.status();
  EXPECT_FALSE(once.Get(3, "job", job).ok());
  EXPECT_EQ(runs.load(), 1);
}

TEST(BackgroundOnceTest, ClearWaitsForARunningJobAndUndoesEveryValue) {
  BackgroundOnce<int, int> once;
  Gate gate;
  std::atomic<bool> finished{false};
  ASSERT_TRUE(WaitFor(once, 1, [] { return absl::StatusOr<int>(10); }).ok());
  (void)once.Get(2, "job", [&]() -> absl::StatusOr<int> {
    gate.Wait();
    finished = true;
    return 20;
  });
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    gate.Open();
  });
  std::vector<std::pair<int, int>> undone;
  once.Clear([&](const int& key, const int& value) { undone.emplace_back(key, value); });
  opener.join();
  EXPECT_TRUE(finished.load());  // Clear returned only after the running job had finished
  EXPECT_EQ(undone, (std::vector<std::pair<int, int>>{{1, 10}, {2, 20}}));
  // Forgotten: the next Get starts the job again.
  std::atomic<int> runs{0};
  auto again = WaitFor(once, 1, [&] {
    ++runs;
    return absl::StatusOr<int>(11);
  });
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 11);
  EXPECT_EQ(runs.load(), 1);
}

}  // namespace
}  // namespace engram
