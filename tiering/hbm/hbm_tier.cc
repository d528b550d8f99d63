#include "tiering/hbm/hbm_tier.h"

#include <algorithm>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

#include "tiering/memfd_seals.h"
#include "absl/strings/str_cat.h"

namespace engram {

using kernels::HbmIndexHeader;
using kernels::kNoSlot;

HbmTier::HbmTier(RowTier* source, std::unique_ptr<HbmSlotStore> store, const HbmTierOptions& options)
    : source_(source), store_(std::move(store)), options_(options), residency_(store_->slots(), options.decay_every) {}

HbmTier::~HbmTier() {
  if (index_base_ != nullptr) munmap(index_base_, index_bytes_);
  if (index_fd_ >= 0) close(index_fd_);
}

absl::StatusOr<std::unique_ptr<HbmTier>> HbmTier::Create(RowTier* source, std::unique_ptr<HbmSlotStore> store,
                                                         const HbmTierOptions& options) {
  if (source == nullptr || store == nullptr) return absl::InvalidArgumentError("HBM tier: no source or store");
  if (store->row_bytes() != source->row_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("HBM tier: slots of ", store->row_bytes(), " bytes for rows of ",
                                                   source->row_bytes()));
  }
  if (store->slots() == 0) return absl::InvalidArgumentError("HBM tier: a budget of no rows");
  std::unique_ptr<HbmTier> tier(new HbmTier(source, std::move(store), options));
  if (absl::Status s = tier->Init(); !s.ok()) return s;
  return tier;
}

absl::Status HbmTier::Init() {
  const uint64_t buckets = residency_.buckets();
  const uint64_t header = 4096;
  const uint64_t keys_bytes = buckets * 8, values_bytes = (buckets * 4 + 63) / 64 * 64;
  index_bytes_ = header + 2 * keys_bytes + 2 * values_bytes;
  index_fd_ = memfd_create("engram-hbm-index", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (index_fd_ < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
  if (ftruncate(index_fd_, static_cast<off_t>(index_bytes_)) != 0 ||
      fcntl(index_fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot size the ", index_bytes_, "-byte HBM index: ",
                                                     std::strerror(errno)));
  }
  void* p = mmap(nullptr, index_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, index_fd_, 0);
  if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap HBM index: ", std::strerror(errno)));
  // Only this mapping may ever write the index: clients map it, and the promoter reads its own
  // buckets back when it edits them, so a client-writable index would be both a way to misdirect
  // every other client and a way to hang the promoter.
  if (fcntl(index_fd_, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SEAL) != 0) {
    munmap(p, index_bytes_);
    return absl::UnavailableError(absl::StrCat("cannot seal the HBM index against writers (F_SEAL_FUTURE_WRITE, ",
                                               "Linux 5.1+): ", std::strerror(errno)));
  }
  index_base_ = static_cast<uint8_t*>(p);
  header_ = new (index_base_) HbmIndexHeader();
  header_->magic = kernels::kHbmIndexMagic;
  header_->version = kernels::kHbmIndexVersion;
  header_->slots = store_->slots();
  header_->row_bytes = static_cast<uint64_t>(store_->row_bytes());
  header_->bucket_mask = buckets - 1;
  header_->keys_offset[0] = header;
  header_->keys_offset[1] = header + keys_bytes;
  header_->values_offset[0] = header + 2 * keys_bytes;
  header_->values_offset[1] = header + 2 * keys_bytes + values_bytes;
  header_->total_bytes = index_bytes_;
  // memfd pages start zeroed: keys are empty; slots say "none" (as a store's copy starts).
  for (int b = 0; b < 2; ++b) std::fill(values(b), values(b) + buckets, kNoSlot);
  header_->detached.store(0, std::memory_order_relaxed);
  header_->generation.store(0, std::memory_order_seq_cst);
  return absl::OkStatus();
}

uint64_t* HbmTier::keys(int b) const { return reinterpret_cast<uint64_t*>(index_base_ + header_->keys_offset[b]); }
uint32_t* HbmTier::values(int b) const {
  return reinterpret_cast<uint32_t*>(index_base_ + header_->values_offset[b]);
}

void HbmTier::SampleLookup(absl::Span<const uint64_t> rows) {
  std::lock_guard<std::mutex> lock(samples_mu_);
  bool full = false;
  sampler_.ForEach(rows.size(), [&](size_t i) {
    if (full || samples_.size() >= options_.max_pending_samples) {
      full = true;
      samples_dropped_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    samples_.push_back(rows[i]);
  });
}

void HbmTier::RecordRows(absl::Span<const uint64_t> rows, uint32_t weight) {
  std::lock_guard<std::mutex> lock(samples_mu_);
  for (size_t i = 0; i < rows.size(); ++i) {
    if (reported_.size() >= options_.max_pending_samples) {
      samples_dropped_.fetch_add(rows.size() - i, std::memory_order_relaxed);
      return;
    }
    reported_.push_back({rows[i], std::max<uint32_t>(1, weight)});
  }
}

void HbmTier::AddReader(const std::atomic<uint64_t>* pin) {
  std::lock_guard<std::mutex> lock(readers_mu_);
  readers_.push_back(pin);
}

void HbmTier::RemoveReader(const std::atomic<uint64_t>* pin) {
  std::lock_guard<std::mutex> lock(readers_mu_);
  std::erase(readers_, pin);
}

void HbmTier::MarkDetached() { header_->detached.store(1, std::memory_order_seq_cst); }

bool HbmTier::WaitUnpinned(std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    bool pinned = false;
    {
      std::lock_guard<std::mutex> lock(readers_mu_);
      for (const std::atomic<uint64_t>* pin : readers_) pinned |= pin->load(std::memory_order_seq_cst) != 0;
    }
    if (!pinned) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

bool HbmTier::Quiescent() {
  const uint64_t current = header_->generation.load(std::memory_order_seq_cst);
  std::lock_guard<std::mutex> lock(readers_mu_);
  for (const std::atomic<uint64_t>* pin : readers_) {
    const uint64_t v = pin->load(std::memory_order_seq_cst);
    if (v != 0 && v - 1 < current) return false;
  }
  return true;
}

bool HbmTier::WaitQuiescent() {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(options_.quiesce_wait_us);
  while (!Quiescent()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return true;
}

absl::Status HbmTier::Publish(std::vector<IndexEdit> edits) {
  const uint64_t next = header_->generation.load(std::memory_order_relaxed) + 1;
  const int b = static_cast<int>(next & 1);
  uint64_t* k = keys(b);
  uint32_t* v = values(b);
  const uint64_t mask = header_->bucket_mask;
  // The back buffer holds generation next - 2: replay what generation next - 1 changed, then ours.
  std::vector<uint64_t> touched;
  for (const std::vector<IndexEdit>* list : {&last_edits_, &edits}) {
    for (const IndexEdit& e : *list) {
      if (e.slot == kNoSlot) {
        HbmIndexErase(k, v, mask, e.row, &touched);
      } else {
        HbmIndexInsert(k, v, mask, e.row, e.slot, &touched);
      }
    }
  }
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  if (absl::Status s = store_->UpdateIndex(b, touched, k, v); !s.ok()) {
    // The planner has moved on but readers have not: the tier stops here, serving what the
    // published index says (which is still true), and promotes nothing more.
    failed_ = s;
    return s;
  }
  header_->generation.store(next, std::memory_order_seq_cst);
  last_edits_ = std::move(edits);
  return absl::OkStatus();
}

absl::Status HbmTier::WritePromotions(const std::vector<HbmMove>& promote) {
  const int64_t row_bytes = source_->row_bytes();
  std::vector<uint64_t> rows;
  std::vector<uint32_t> slots;
  rows.reserve(promote.size());
  slots.reserve(promote.size());
  for (const HbmMove& m : promote) {
    rows.push_back(m.row);
    slots.push_back(m.slot);
  }
  std::vector<uint8_t> packed(promote.size() * static_cast<size_t>(row_bytes));
  std::vector<uint8_t*> dests(promote.size());
  for (size_t i = 0; i < dests.size(); ++i) dests[i] = packed.data() + i * row_bytes;
  TierCounts counts;
  if (absl::Status s = source_->ReadRows(rows, dests, &counts); !s.ok()) return s;
  if (absl::Status s = store_->WriteRows(slots, packed.data()); !s.ok()) return s;
  residency_.Apply(HbmPlan{{}, promote});
  std::vector<IndexEdit> edits;
  edits.reserve(2 * promote.size());
  for (const HbmMove& m : promote) {
    edits.push_back({m.row, kNoSlot});  // a row moved from another slot (Apply does the same)
    edits.push_back({m.row, m.slot});
  }
  if (absl::Status s = Publish(std::move(edits)); !s.ok()) return s;
  promotions_.fetch_add(promote.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<bool> HbmTier::Step() {
  if (!failed_.ok()) return failed_;
  std::vector<uint64_t> drained;
  std::vector<std::pair<uint64_t, uint32_t>> reported;
  uint32_t weight = 1;
  {
    std::lock_guard<std::mutex> lock(samples_mu_);
    drained.swap(samples_);
    reported.swap(reported_);
    weight = sample_every_;
    // Adapt the engine's sampling to the load, judged on the average of a window of steps (lookups
    // come in bursts; one step says little): above the budget (counting costs the promoter, and a
    // few thousand samples a step rank the hot rows well enough) sample as much less as needed,
    // at a quarter of it twice as much, down to every row.
    window_samples_ += drained.size();
    uint32_t every = sample_every_;
    if (++window_steps_ == kAdaptWindowSteps) {
      const double per_step = static_cast<double>(window_samples_) / kAdaptWindowSteps;
      const double budget = static_cast<double>(std::max<size_t>(1, options_.samples_per_step));
      while (per_step * sample_every_ / every > budget && every < kMaxSampleEvery) every *= 2;
      if (every == sample_every_ && per_step < budget / 4 && every > 1) every /= 2;
      window_samples_ = 0;
      window_steps_ = 0;
    }
    if (every != sample_every_) {
      sample_every_ = every;
      sampler_ = HbmSampler(every, 0x243f6a8885a308d3ULL + samples_recorded_.load(std::memory_order_relaxed));
    }
  }
  if (!drained.empty()) residency_.RecordAccesses(drained, weight);
  for (const auto& [row, w] : reported) residency_.RecordAccess(row, w);
  // The exponent fit needs a uniform sample of the rows asked for, not every sample (each costs a
  // lock and a log): the engine's and the mapping clients' alike.
  constexpr size_t kZipfSamplesPerStep = 4096;
  const size_t zipf_stride = (drained.size() + reported.size()) / kZipfSamplesPerStep + 1;
  for (size_t i = 0; i < drained.size(); i += zipf_stride) frequency_.Record(drained[i]);
  for (size_t i = 0; i < reported.size(); i += zipf_stride) frequency_.Record(reported[i].first);
  samples_recorded_.fetch_add(drained.size() + reported.size(), std::memory_order_relaxed);
  // Every publication, and every rewrite of a slot an older index named, needs the readers to be
  // on the current index.
  if (!Quiescent()) {
    stalls_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  if (!pending_promote_.empty()) {
    std::vector<HbmMove> promote;
    promote.swap(pending_promote_);
    if (absl::Status s = WritePromotions(promote); !s.ok()) return s;
    return true;
  }
  HbmPlan plan = residency_.NextPlan(options_.max_moves, options_.margin);
  if (plan.promote.empty()) return false;
  if (!plan.demote.empty()) {
    residency_.Apply(HbmPlan{plan.demote, {}});
    std::vector<IndexEdit> edits;
    edits.reserve(plan.demote.size());
    for (uint64_t row : plan.demote) edits.push_back({row, kNoSlot});
    if (absl::Status s = Publish(std::move(edits)); !s.ok()) return s;
    demotions_.fetch_add(plan.demote.size(), std::memory_order_relaxed);
    // The demoted rows' slots may be rewritten once no reader uses the index that named them.
    if (!WaitQuiescent()) {
      pending_promote_ = std::move(plan.promote);
      stalls_.fetch_add(1, std::memory_order_relaxed);
      return true;
    }
  }
  if (absl::Status s = WritePromotions(plan.promote); !s.ok()) return s;
  return true;
}

HbmTierStats HbmTier::stats() const {
  HbmTierStats s;
  s.generation = header_->generation.load(std::memory_order_acquire);
  s.resident = residency_.resident();
  s.promotions = promotions_.load(std::memory_order_relaxed);
  s.demotions = demotions_.load(std::memory_order_relaxed);
  s.stalls = stalls_.load(std::memory_order_relaxed);
  s.samples = samples_recorded_.load(std::memory_order_relaxed);
  s.samples_dropped = samples_dropped_.load(std::memory_order_relaxed);
  s.served_hbm = served_hbm_.load(std::memory_order_relaxed);
  s.served_below = served_below_.load(std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(const_cast<std::mutex&>(samples_mu_));
    s.sample_every = sample_every_;
  }
  {
    std::lock_guard<std::mutex> lock(const_cast<std::mutex&>(readers_mu_));
    s.readers = readers_.size();
  }
  return s;
}

uint32_t HbmTier::PublishedSlotOf(uint64_t row) const {
  const uint64_t g = header_->generation.load(std::memory_order_acquire);
  const int b = static_cast<int>(g & 1);
  return kernels::HbmProbe(keys(b), values(b), header_->bucket_mask, row);
}

}  // namespace engram
