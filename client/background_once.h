// Work done once per key on a thread of its own, for callers that must not wait for it:
// registering a table's mapping with CUDA pins every page of it, seconds for V4.1's ~100 GB
// layers, and the first device lookup would otherwise hold the client (and its lock) that long.
// Get() starts the job on first use and answers "not yet" (FailedPrecondition) until it is done,
// so the caller takes its other path meanwhile; then the job's value, or its error (as
// FailedPrecondition: the other path, for good). Internal to libengram_client. Thread-safe.
#ifndef ENGRAM_CLIENT_BACKGROUND_ONCE_H_
#define ENGRAM_CLIENT_BACKGROUND_ONCE_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace engram {

template <typename Key, typename Value>
class BackgroundOnce {
 public:
  using Job = std::function<absl::StatusOr<Value>()>;
  BackgroundOnce() = default;
  BackgroundOnce(const BackgroundOnce&) = delete;
  BackgroundOnce& operator=(const BackgroundOnce&) = delete;
  // Waits for the jobs still running (their values are dropped without `undo`: call Clear first
  // to undo them).
  ~BackgroundOnce() { Clear(nullptr); }

  // `key`'s value once its job has finished; its error if the job failed; FailedPrecondition
  // naming `what` while it runs (starting it, on this key's first call).
  absl::StatusOr<Value> Get(const Key& key, const std::string& what, Job job) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      auto entry = std::make_shared<Entry>();
      // In the map before the thread starts (nothing may throw once it runs); the thread owns a
      // reference, so the entry outlives a Clear that is waiting for it.
      const auto placed = entries_.emplace(key, entry).first;
      try {
        entry->thread = std::thread([this, entry, job = std::move(job)] {
          absl::StatusOr<Value> result = job();
          std::lock_guard<std::mutex> done(mu_);
          entry->result = std::move(result);
          entry->done = true;
        });
      } catch (const std::system_error& e) {  // no thread to be had: not now, maybe on a later call
        entries_.erase(placed);
        return absl::FailedPreconditionError(absl::StrCat(what, ": cannot start a thread (", e.what(), ")"));
      }
      return absl::FailedPreconditionError(absl::StrCat(what, ": started in the background"));
    }
    const Entry& entry = *it->second;
    if (!entry.done) return absl::FailedPreconditionError(absl::StrCat(what, ": still running in the background"));
    if (!entry.result.ok()) return absl::FailedPreconditionError(entry.result.status().message());
    return *entry.result;
  }

  // Waits for every job still running, calls `undo` on each value a job produced, and forgets
  // them all: the next Get of a key starts its job again.
  void Clear(const std::function<void(const Key&, const Value&)>& undo) {
    std::map<Key, std::shared_ptr<Entry>> entries;
    {
      std::lock_guard<std::mutex> lock(mu_);
      entries.swap(entries_);
    }
    for (auto& [key, entry] : entries) {
      if (entry->thread.joinable()) entry->thread.join();  // outside mu_: the job takes it to finish
      if (undo && entry->result.ok()) undo(key, *entry->result);
    }
  }

 private:
  struct Entry {
    std::thread thread;
    bool done = false;
    absl::StatusOr<Value> result = absl::UnknownError("not run");
  };
  std::mutex mu_;
  std::map<Key, std::shared_ptr<Entry>> entries_;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_BACKGROUND_ONCE_H_
