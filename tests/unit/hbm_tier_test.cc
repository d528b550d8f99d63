// The HBM tier's protocol, run on the host slot store: promotion by sampled counts, the index
// clients read, reader pins, and slot reuse only after readers moved on.
#include "tiering/hbm/hbm_tier.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <random>
#include <thread>

#include "gtest/gtest.h"

namespace engram {
namespace {

using kernels::HbmIndexHeader;
using kernels::kNoSlot;

constexpr int64_t kRowBytes = 64;

// Row r holds the words r * 1000 + 0..7: any other row, or a torn copy, is told apart.
void FillRow(uint64_t row, uint8_t* out) {
  for (int w = 0; w < kRowBytes / 8; ++w) {
    const uint64_t v = row * 1000 + w;
    std::memcpy(out + w * 8, &v, 8);
  }
}

class PatternTier final : public RowTier {
 public:
  explicit PatternTier(uint64_t rows) : rows_(rows) {}
  absl::Status ReadRows(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests, TierCounts* counts) override {
    for (size_t i = 0; i < rows.size(); ++i) FillRow(rows[i], dests[i]);
    counts->rows[static_cast<int>(TierKind::kDram)] += rows.size();
    return absl::OkStatus();
  }
  uint64_t total_rows() const override { return rows_; }
  int64_t row_bytes() const override { return kRowBytes; }
  uint64_t resident_bytes() const override { return 0; }
  bool dedup_saves_reads() const override { return false; }
  absl::string_view description() const override { return "pattern"; }

 private:
  uint64_t rows_;
};

std::unique_ptr<HbmTier> MakeTier(RowTier* source, uint32_t slots, HbmTierOptions options = {},
                                  bool poison = false) {
  auto store = CreateHostSlotStore(slots, kRowBytes, HostSlotStoreOptions{poison});
  EXPECT_TRUE(store.ok()) << store.status();
  auto tier = HbmTier::Create(source, std::move(*store), options);
  EXPECT_TRUE(tier.ok()) << tier.status();
  return std::move(*tier);
}

// A reader as a client is one: pin, probe the published buffer, copy from the slot, unpin.
// Returns false when the row was not in HBM.
bool ReadThroughIndex(const HbmTier& tier, std::atomic<uint64_t>* pin, uint64_t row, uint8_t* out) {
  const HbmIndexHeader* h = tier.header();
  uint64_t g;
  for (;;) {
    g = h->generation.load(std::memory_order_acquire);
    pin->store(g + 1, std::memory_order_seq_cst);
    if (h->generation.load(std::memory_order_seq_cst) == g) break;
  }
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const int b = static_cast<int>(g & 1);
  const uint32_t slot = kernels::HbmProbe(reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]),
                                          reinterpret_cast<const uint32_t*>(base + h->values_offset[b]),
                                          h->bucket_mask, row);
  if (slot != kNoSlot) {
    std::this_thread::yield();  // widen the window a careless protocol would leave open
    std::memcpy(out, tier.store()->host_slots() + uint64_t{slot} * kRowBytes, kRowBytes);
  }
  pin->store(0, std::memory_order_seq_cst);
  return slot != kNoSlot;
}

void Heat(HbmTier* tier, uint64_t first, uint64_t count, int times) {
  std::vector<uint64_t> rows;
  for (int t = 0; t < times; ++t) {
    for (uint64_t r = first; r < first + count; ++r) rows.push_back(r);
  }
  tier->RecordRows(rows);
}

TEST(HbmTierTest, HotRowsArePromotedIntoSlotsAndPublished) {
  PatternTier source(100000);
  auto tier = MakeTier(&source, 100);
  EXPECT_EQ(tier->PublishedSlotOf(5), kNoSlot);
  Heat(tier.get(), 5000, 100, 3);  // the hot set
  Heat(tier.get(), 9000, 50, 1);   // lukewarm
  auto stepped = tier->Step();
  ASSERT_TRUE(stepped.ok()) << stepped.status();
  EXPECT_TRUE(*stepped);
  EXPECT_EQ(tier->stats().resident, 100u);
  EXPECT_EQ(tier->stats().generation, 1u);  // free slots: no demotion round
  uint8_t want[kRowBytes];
  for (uint64_t r = 5000; r < 5100; ++r) {
    const uint32_t slot = tier->PublishedSlotOf(r);
    ASSERT_NE(slot, kNoSlot) << "row " << r;
    FillRow(r, want);
    EXPECT_EQ(std::memcmp(tier->store()->host_slots() + uint64_t{slot} * kRowBytes, want, kRowBytes), 0) << r;
  }
  EXPECT_EQ(tier->PublishedSlotOf(9000), kNoSlot);
  // A new, hotter set displaces the old one in a demote-then-promote round (two generations).
  Heat(tier.get(), 20000, 100, 10);
  ASSERT_TRUE(tier->Step().ok());
  EXPECT_EQ(tier->stats().generation, 3u);
  EXPECT_EQ(tier->stats().demotions, 100u);
  for (uint64_t r = 20000; r < 20100; ++r) {
    const uint32_t slot = tier->PublishedSlotOf(r);
    ASSERT_NE(slot, kNoSlot) << "row " << r;
    FillRow(r, want);
    EXPECT_EQ(std::memcmp(tier->store()->host_slots() + uint64_t{slot} * kRowBytes, want, kRowBytes), 0) << r;
  }
  for (uint64_t r = 5000; r < 5100; ++r) EXPECT_EQ(tier->PublishedSlotOf(r), kNoSlot) << r;
  // Nothing new: no publication.
  auto idle = tier->Step();
  ASSERT_TRUE(idle.ok());
  EXPECT_FALSE(*idle);
}

// Sampling picks about one in N overall and does not lock onto a batch's layout: batches of 16
// heads x 4 tokens (64 rows, the stride a fixed one-in-64 pick would repeat) still get every head
// counted about equally, and batches of one row are sampled as often as big ones.
TEST(HbmSamplerTest, PicksOneInNWithoutLockingOntoTheBatchLayout) {
  HbmSampler sampler(64);
  std::vector<uint64_t> per_head(16, 0);
  uint64_t picked = 0;
  constexpr int kBatches = 20000;
  for (int b = 0; b < kBatches; ++b) {
    sampler.ForEach(64, [&](size_t i) {
      ASSERT_LT(i, 64u);
      ++per_head[i % 16];
      ++picked;
    });
  }
  EXPECT_NEAR(static_cast<double>(picked), kBatches, kBatches * 0.05);
  for (int h = 0; h < 16; ++h) EXPECT_NEAR(static_cast<double>(per_head[h]), picked / 16.0, picked / 16.0 * 0.2) << h;
  // Within one big batch (4096 tokens x 16 heads) too: a fixed stride of 64 would count one head.
  std::vector<uint64_t> one_batch(16, 0);
  sampler.ForEach(4096 * 16, [&](size_t i) { ++one_batch[i % 16]; });
  for (int h = 0; h < 16; ++h) EXPECT_GT(one_batch[h], 30u) << "head " << h << " in one batch";
  uint64_t single = 0;
  for (int i = 0; i < 64000; ++i) sampler.ForEach(1, [&](size_t) { ++single; });
  EXPECT_NEAR(static_cast<double>(single), 1000, 150);
  HbmSampler all(1);
  uint64_t every = 0;
  all.ForEach(37, [&](size_t i) { EXPECT_EQ(i, every++); });
  EXPECT_EQ(every, 37u);
}

// The engine's sampling follows the load (judged over windows of 8 steps): every row while steps
// see few, fewer as the load grows (about samples_per_step a step), every row again when it falls;
// beyond the pending bound samples are dropped and counted.
TEST(HbmTierTest, EngineSamplingFollowsTheLoadAndDropsBeyondTheBound) {
  PatternTier source(100000);
  HbmTierOptions options;
  options.samples_per_step = 100;
  options.max_pending_samples = 1000;
  auto tier = MakeTier(&source, 10, options);
  auto steps = [&](size_t rows_per_step, int n) {
    std::vector<uint64_t> rows(rows_per_step);
    for (uint64_t i = 0; i < rows.size(); ++i) rows[i] = i;
    for (int i = 0; i < n; ++i) {
      tier->SampleLookup(rows);
      ASSERT_TRUE(tier->Step().ok());
    }
  };
  steps(60, 8);  // light: all counted
  EXPECT_EQ(tier->stats().samples, 480u);
  EXPECT_EQ(tier->stats().sample_every, 1u);

  steps(2000, 8);  // heavy, still one in 1 for a window: 1000 a step fit, 1000 are dropped
  EXPECT_EQ(tier->stats().samples, 480u + 8000u);
  EXPECT_EQ(tier->stats().samples_dropped, 8000u);
  EXPECT_EQ(tier->stats().sample_every, 16u) << "1000 a step against 100: at once to the next power of two";
  steps(2000, 32);
  // 2000 rows a step against a budget of 100: settles at one in 16..64 (random gaps).
  const uint32_t every = tier->stats().sample_every;
  EXPECT_GE(every, 16u);
  EXPECT_LE(every, 64u);
  const uint64_t before = tier->stats().samples;
  steps(2000, 8);
  EXPECT_GT(tier->stats().samples - before, 8 * 2000 / 64 / 2);
  EXPECT_LE(tier->stats().samples - before, 8 * 200u);
  EXPECT_EQ(tier->stats().samples_dropped, 8000u);

  steps(10, 48);  // light again: halved a window at a time
  EXPECT_EQ(tier->stats().sample_every, 1u);
  // Bursts: a big batch every 4th step, nothing between; the window sees the average.
  for (int i = 0; i < 16; ++i) {
    steps(i % 4 == 0 ? 200 : 0, 1);
  }
  EXPECT_EQ(tier->stats().sample_every, 1u) << "50 a step on average is under the budget";
}

// The tier fits the Zipf exponent of what it counts (for its predicted hit ratio in /metrics).
TEST(HbmTierTest, FitsTheZipfExponentOfTheRowsItCounts) {
  PatternTier source(200000);
  auto tier = MakeTier(&source, 1000);
  EXPECT_FALSE(tier->zipf_alpha().has_value()) << "nothing counted yet";
  // Zipf(1.0) over 200k rows by inverse transform on the harmonic CDF.
  std::vector<double> cdf(200000);
  double sum = 0;
  for (size_t r = 0; r < cdf.size(); ++r) cdf[r] = sum += 1.0 / static_cast<double>(r + 1);
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> u(0, sum);
  for (int step = 0; step < 40; ++step) {
    std::vector<uint64_t> rows(4000);
    for (auto& row : rows) row = static_cast<uint64_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
    tier->SampleLookup(rows);
    ASSERT_TRUE(tier->Step().ok());
  }
  ASSERT_TRUE(tier->zipf_alpha().has_value());
  EXPECT_NEAR(*tier->zipf_alpha(), 1.0, 0.15);
  // Rows reported by clients that gather on their own count as well.
  auto reported = MakeTier(&source, 1000);
  for (int step = 0; step < 40; ++step) {
    std::vector<uint64_t> rows(4000);
    for (auto& row : rows) row = static_cast<uint64_t>(std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin());
    reported->RecordRows(rows, 64);
    ASSERT_TRUE(reported->Step().ok());
  }
  ASSERT_TRUE(reported->zipf_alpha().has_value());
  EXPECT_NEAR(*reported->zipf_alpha(), 1.0, 0.15);
}

// A sample stands for the accesses it was taken from: one reported row of weight 64 outranks a
// row recorded ten times at weight 1.
TEST(HbmTierTest, ReportedSamplesWeighTheAccessesTheyStandFor) {
  PatternTier source(1000);
  auto tier = MakeTier(&source, 1);
  const std::vector<uint64_t> heavy = {5};
  const std::vector<uint64_t> light = {7};
  tier->RecordRows(heavy, 64);
  for (int i = 0; i < 10; ++i) tier->RecordRows(light, 1);
  ASSERT_TRUE(tier->Step().ok());
  EXPECT_NE(tier->PublishedSlotOf(5), kNoSlot);
  EXPECT_EQ(tier->PublishedSlotOf(7), kNoSlot);
}

TEST(HbmTierTest, AReaderHoldingAnOldIndexStallsPromotionNotCorrectness) {
  PatternTier source(100000);
  HbmTierOptions options;
  options.quiesce_wait_us = 100;
  auto tier = MakeTier(&source, 50, options);
  std::atomic<uint64_t> pin{0};
  tier->AddReader(&pin);
  Heat(tier.get(), 100, 50, 2);
  ASSERT_TRUE(tier->Step().ok());  // generation 1: rows 100..149
  const uint32_t slot = tier->PublishedSlotOf(120);
  ASSERT_NE(slot, kNoSlot);
  pin.store(tier->stats().generation + 1);  // a reader uses generation 1 and stays

  Heat(tier.get(), 7000, 50, 20);
  auto stepped = tier->Step();  // demotes (generation 2), then must not reuse the slots
  ASSERT_TRUE(stepped.ok());
  EXPECT_EQ(tier->stats().generation, 2u);
  EXPECT_GE(tier->stats().stalls, 1u);
  uint8_t want[kRowBytes];
  FillRow(120, want);  // what the stuck reader's index still says slot `slot` holds
  EXPECT_EQ(std::memcmp(tier->store()->host_slots() + uint64_t{slot} * kRowBytes, want, kRowBytes), 0);
  for (int i = 0; i < 3; ++i) {
    auto again = tier->Step();
    ASSERT_TRUE(again.ok());
    EXPECT_FALSE(*again);
  }
  EXPECT_EQ(tier->stats().generation, 2u);
  EXPECT_EQ(std::memcmp(tier->store()->host_slots() + uint64_t{slot} * kRowBytes, want, kRowBytes), 0);

  pin.store(0);  // the reader is done: the pending promotions go in
  auto resumed = tier->Step();
  ASSERT_TRUE(resumed.ok());
  EXPECT_TRUE(*resumed);
  EXPECT_EQ(tier->stats().generation, 3u);
  EXPECT_NE(tier->PublishedSlotOf(7010), kNoSlot);
  tier->RemoveReader(&pin);
  EXPECT_EQ(tier->stats().readers, 0u);
}

// Readers gather through the published index while the promoter churns the hot set as fast as it
// can, and the slot store scribbles over every slot before rewriting it: a reader that ever saw a
// slot change under it would copy garbage or another row.
TEST(HbmTierTest, ReadersNeverSeeASlotRewrittenUnderThem) {
  PatternTier source(1u << 20);
  HbmTierOptions options;
  options.max_moves = 64;
  options.decay_every = 2000;
  options.margin = 1.0;
  auto tier = MakeTier(&source, 256, options, /*poison=*/true);
  constexpr int kReaders = 2;
  std::atomic<uint64_t> pins[kReaders];
  for (auto& p : pins) {
    p.store(0);
    tier->AddReader(&p);
  }
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> hits{0}, reads{0}, wrong{0};
  std::vector<std::thread> readers;
  for (int i = 0; i < kReaders; ++i) {
    readers.emplace_back([&, i] {
      std::mt19937_64 rng(i + 1);
      uint8_t got[kRowBytes], want[kRowBytes];
      while (!stop.load()) {
        const uint64_t row = 1000 + rng() % 4000;
        reads.fetch_add(1);
        if (!ReadThroughIndex(*tier, &pins[i], row, got)) continue;
        hits.fetch_add(1);
        FillRow(row, want);
        if (std::memcmp(got, want, kRowBytes) != 0) wrong.fetch_add(1);
      }
    });
  }
  // The hot set walks over rows 1000..4999, 256 rows at a time, until 3000 rows were promoted
  // (a step may be held back by a reader: at most 20000 steps).
  for (int step = 0; step < 20000 && tier->stats().promotions < 3000; ++step) {
    Heat(tier.get(), 1000 + (step * 37) % 3744, 256, 4);
    auto s = tier->Step();
    ASSERT_TRUE(s.ok()) << s.status();
  }
  // Let the readers see the final index for a moment.
  const uint64_t hits_before = hits.load();
  for (int i = 0; i < 2000 && hits.load() < hits_before + 1000; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  stop.store(true);
  for (auto& t : readers) t.join();
  for (auto& p : pins) tier->RemoveReader(&p);
  EXPECT_EQ(wrong.load(), 0u) << "of " << hits.load() << " hits";
  EXPECT_GT(hits.load(), 1000u);
  EXPECT_GE(tier->stats().promotions, 3000u) << "the hot set should have churned";
  EXPECT_GT(tier->stats().demotions, 1000u);
}

// A store that keeps its own copy of both index buffers the way the CUDA store keeps its device
// copy: empty at start, then only the buckets each publication lists.
class MirrorSlotStore final : public HbmSlotStore {
 public:
  explicit MirrorSlotStore(std::unique_ptr<HbmSlotStore> host) : host_(std::move(host)) {
    const uint64_t buckets = HbmResidency::BucketsFor(host_->slots());
    for (int b = 0; b < 2; ++b) {
      keys_[b].assign(buckets, 0);
      values_[b].assign(buckets, kNoSlot);
    }
  }
  HbmStoreKind kind() const override { return host_->kind(); }
  uint32_t slots() const override { return host_->slots(); }
  int64_t row_bytes() const override { return host_->row_bytes(); }
  absl::Status WriteRows(absl::Span<const uint32_t> slots, const uint8_t* rows) override {
    return host_->WriteRows(slots, rows);
  }
  absl::Status UpdateIndex(int buffer, absl::Span<const uint64_t> buckets, const uint64_t* keys,
                           const uint32_t* values) override {
    for (uint64_t b : buckets) {
      keys_[buffer].at(b) = keys[b];
      values_[buffer].at(b) = values[b];
    }
    updated_ += buckets.size();
    ++updates_;
    return absl::OkStatus();
  }
  int host_fd() const override { return host_->host_fd(); }
  const uint8_t* host_slots() const override { return host_->host_slots(); }
  uint64_t bytes() const override { return host_->bytes(); }
  std::string description() const override { return "mirror"; }

  std::vector<uint64_t> keys_[2];
  std::vector<uint32_t> values_[2];
  uint64_t updated_ = 0, updates_ = 0;

 private:
  std::unique_ptr<HbmSlotStore> host_;
};

// The device copy of the index is kept by uploading only the buckets a publication changed
// (insertions, and the entries a deletion moved back): after every step of a churning hot set,
// both copies equal the published buffers bucket for bucket, for a small share of the uploads.
TEST(HbmTierTest, ADeviceCopyOfTheIndexKeptByChangedBucketsStaysExact) {
  PatternTier source(1u << 20);
  auto host = CreateHostSlotStore(512, kRowBytes);
  ASSERT_TRUE(host.ok());
  auto mirror = std::make_unique<MirrorSlotStore>(std::move(*host));
  MirrorSlotStore* m = mirror.get();
  HbmTierOptions options;
  options.max_moves = 96;
  options.margin = 1.0;
  options.decay_every = 3000;
  auto tier = HbmTier::Create(&source, std::move(mirror), options);
  ASSERT_TRUE(tier.ok()) << tier.status();
  const HbmIndexHeader* h = (*tier)->header();
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const uint64_t buckets = h->bucket_mask + 1;
  std::mt19937_64 rng(11);
  for (int round = 0; round < 80; ++round) {
    std::vector<uint64_t> rows;
    for (int i = 0; i < 3000; ++i) rows.push_back((round * 37 + rng() % 900) * 131 % (1u << 20));
    (*tier)->RecordRows(rows);
    ASSERT_TRUE((*tier)->Step().ok());
    for (int b = 0; b < 2; ++b) {
      const auto* keys = reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]);
      const auto* values = reinterpret_cast<const uint32_t*>(base + h->values_offset[b]);
      ASSERT_EQ(m->keys_[b], std::vector<uint64_t>(keys, keys + buckets)) << "round " << round << " buffer " << b;
      ASSERT_EQ(m->values_[b], std::vector<uint32_t>(values, values + buckets)) << "round " << round << " buffer " << b;
    }
  }
  EXPECT_GT((*tier)->stats().promotions, 512u) << "the hot set churned";
  ASSERT_GT(m->updates_, 0u);
  // Each publication sent its changes, not the index (1024 buckets here).
  EXPECT_LT(m->updated_ / m->updates_, buckets / 2) << m->updated_ << " buckets in " << m->updates_ << " updates";
}

TEST(HbmTierTest, RefusesAStoreOfTheWrongRowSize) {
  PatternTier source(10);
  auto store = CreateHostSlotStore(4, kRowBytes * 2);
  ASSERT_TRUE(store.ok());
  auto tier = HbmTier::Create(&source, std::move(*store));
  ASSERT_FALSE(tier.ok());
  EXPECT_NE(tier.status().message().find("bytes"), std::string::npos) << tier.status();
}

}  // namespace
}  // namespace engram
