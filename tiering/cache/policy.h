// The DRAM cache's replaceable parts (CacheLib's split): an EvictionPolicy orders the occupied
// slots and names a victim; an AdmissionPolicy decides whether a missed row may displace that
// victim. Both see only keys (global row numbers) and slot ids, never row bytes, so the cache
// simulator runs exactly the code the daemon runs.
//
// Not thread-safe: each cache shard owns one instance and calls it under the shard's lock.
#ifndef ENGRAM_TIERING_CACHE_POLICY_H_
#define ENGRAM_TIERING_CACHE_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace engram {

inline constexpr uint32_t kNoSlot = ~uint32_t{0};

class EvictionPolicy {
 public:
  virtual ~EvictionPolicy() = default;
  // A row was placed in `slot`.
  virtual void OnInsert(uint32_t slot, uint64_t key) = 0;
  virtual void OnHit(uint32_t slot) = 0;
  // Detaches and returns the slot to empty next, or kNoSlot when nothing may be evicted (a
  // pinned set). The cache then either reuses the slot (OnInsert with the new key) or, when
  // admission keeps the victim, hands it back with Restore.
  virtual uint32_t PickVictim() = 0;
  // Re-attaches a slot from PickVictim as the next victim again (it lost to admission).
  virtual void Restore(uint32_t slot) = 0;
  // Whether the last victim was only on probation (S3-FIFO's small queue): losing such a row is
  // cheap, so admission need not guard it.
  virtual bool last_victim_probationary() const { return false; }
  virtual absl::string_view name() const = 0;
};

class AdmissionPolicy {
 public:
  virtual ~AdmissionPolicy() = default;
  // Every access (hit or miss) of `key`.
  virtual void RecordAccess(uint64_t key) = 0;
  // May `candidate` (a miss) displace `victim`?
  virtual bool Admit(uint64_t candidate, uint64_t victim) = 0;
  // Estimated recent access count of `key` (for hot-set snapshots).
  virtual uint32_t Estimate(uint64_t key) const = 0;
};

// Plain least-recently-used order (a doubly linked list over slots).
std::unique_ptr<EvictionPolicy> MakeLruPolicy(uint32_t capacity);
// S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO (10%), a main FIFO with 2-bit
// frequencies and lazy promotion, and a ghost FIFO of recently evicted keys. Scan-resistant:
// rows seen once leave through the small queue without disturbing the main one.
std::unique_ptr<EvictionPolicy> MakeS3FifoPolicy(uint32_t capacity);
// Nothing is ever evicted: what was inserted first stays (the static top-K set, loaded hottest first).
std::unique_ptr<EvictionPolicy> MakePinnedPolicy(uint32_t capacity);

// TinyLFU admission: a count-min sketch of 4-bit counters (4 rows), halved every `sample_size`
// accesses so old popularity fades; a candidate is admitted when its estimate beats the victim's.
std::unique_ptr<AdmissionPolicy> MakeTinyLfuAdmission(uint32_t capacity);

// A named combination, as --cache-policy and the simulator take it.
struct PolicySpec {
  std::string name;            // lru | s3fifo | tinylfu | static-topk
  bool tinylfu_admission = false;
  enum class Eviction { kLru, kS3Fifo, kPinned } eviction = Eviction::kS3Fifo;
};
absl::StatusOr<PolicySpec> ParsePolicy(absl::string_view name);
inline constexpr absl::string_view kDefaultPolicy = "s3fifo";  // measured best on real text (bench/RESULTS.md)

std::unique_ptr<EvictionPolicy> MakeEviction(const PolicySpec& spec, uint32_t capacity);

}  // namespace engram

#endif  // ENGRAM_TIERING_CACHE_POLICY_H_
