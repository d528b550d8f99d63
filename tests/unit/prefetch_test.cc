// Prefetch and the frequency model: prefetched rows become DRAM hits, a prefetch never evicts
// rows demand keeps using, outcomes are counted; the Zipf fit recovers the exponent of a stream.
#include <chrono>
#include <random>
#include <thread>

#include "bench/workload.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/cache/zipf_estimator.h"
#include "tiering/cached_tier.h"
#include "tiering/engine.h"

namespace engram {
namespace {

class PrefetchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    manifest_ = testing::CreateSmallPack(dir_.path(), RowDtype::kBf16, 64, /*vocab=*/2000);
    TableOptions options;
    options.dram_budget_bytes = manifest_.total_bytes() / 8;
    options.cache_shards = 1;
    auto table = Table::Open(dir_.path(), options);
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = table->get();
    engine_ = std::make_unique<Engine>(EngineOptions{});
    ASSERT_TRUE(engine_->AddTable(std::move(*table)).ok());
    tier_ = dynamic_cast<CachedNvmeTier*>(const_cast<RowTier*>(table_->FindLayer(3)->tier.get()));
    ASSERT_NE(tier_, nullptr);
  }
  // Waits (bounded) until `row` is cached.
  bool WaitCached(uint64_t row) {
    for (int i = 0; i < 400; ++i) {
      if (tier_->cache()->Contains(row)) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }
  LookupStats Lookup(const std::vector<uint32_t>& indices) {
    std::vector<uint8_t> out(indices.size() * 128);
    LookupStats stats;
    EXPECT_TRUE(engine_->Lookup(*table_, 3, static_cast<uint32_t>(indices.size() / table_->heads()), indices,
                                absl::MakeSpan(out), &stats).ok());
    return stats;
  }

  testing::TempDir dir_;
  PackManifest manifest_;
  const Table* table_ = nullptr;
  std::unique_ptr<Engine> engine_;
  CachedNvmeTier* tier_ = nullptr;
};

TEST_F(PrefetchTest, PrefetchedRowsBecomeHitsAndCountAsUseful) {
  const int heads = table_->heads();
  std::vector<uint32_t> indices(10 * heads);
  for (size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<uint32_t>(100 + i / heads);
  auto counts = engine_->Prefetch(*table_, 3, 10, indices);
  ASSERT_TRUE(counts.ok()) << counts.status();
  EXPECT_EQ(counts->queued, indices.size());
  const uint64_t last_row = manifest_.layers[0].layout.head_offset[heads - 1] + 109;
  ASSERT_TRUE(WaitCached(last_row));
  const LookupStats stats = Lookup(indices);
  EXPECT_EQ(stats.tiers.rows[static_cast<int>(TierKind::kNvme)], 0u);
  EXPECT_EQ(tier_->cache()->stats().prefetch_useful, indices.size());
  // Bad indices are refused exactly as lookups refuse them.
  indices[3] = 1u << 30;
  EXPECT_EQ(engine_->Prefetch(*table_, 3, 10, indices).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(PrefetchTest, PrefetchNeverEvictsRowsDemandKeepsUsing) {
  const int heads = table_->heads();
  const uint64_t capacity = tier_->cache()->capacity_rows();
  // A hot set of about half the cache, used three times: it lives in S3-FIFO's main queue.
  const uint32_t hot_tokens = static_cast<uint32_t>(capacity / 2 / heads);
  std::vector<uint32_t> hot(hot_tokens * heads);
  for (size_t i = 0; i < hot.size(); ++i) hot[i] = static_cast<uint32_t>(i / heads);
  for (int r = 0; r < 3; ++r) Lookup(hot);
  // Then prefetch far more rows than the cache holds.
  std::vector<uint32_t> flood(400 * heads);
  for (size_t i = 0; i < flood.size(); ++i) flood[i] = static_cast<uint32_t>(500 + i / heads);
  ASSERT_TRUE(engine_->Prefetch(*table_, 3, 400, flood).ok());
  // Bounded wait until the flood overflowed the cache (refused rows are counted as wasted).
  for (int i = 0; i < 1000 && tier_->cache()->stats().prefetch_wasted == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const LookupStats after = Lookup(hot);
  EXPECT_EQ(after.tiers.rows[static_cast<int>(TierKind::kNvme)], 0u) << "a prefetch displaced demand's rows";
  EXPECT_GT(tier_->cache()->stats().prefetch_wasted, 0u);  // the overflow was refused, and counted
}

TEST(ZipfEstimatorTest, RecoversTheExponentOfAZipfStream) {
  for (double alpha : {0.7, 1.0, 1.2}) {
    ZipfEstimator estimator;
    ZipfSampler sampler(1000000, alpha);
    std::mt19937_64 rng(7);
    for (int i = 0; i < 2000000; ++i) estimator.Record(sampler.Sample(rng) * 2654435761ULL);
    const auto fitted = estimator.Alpha();
    ASSERT_TRUE(fitted.has_value());
    EXPECT_NEAR(*fitted, alpha, 0.15) << alpha;
  }
  EXPECT_FALSE(ZipfEstimator().Alpha().has_value());  // nothing seen yet: no claim
}

TEST(ZipfEstimatorTest, PredictedHitRatio) {
  EXPECT_NEAR(ZipfEstimator::PredictHitRatio(0.0, 100, 1000), 0.1, 1e-3);  // uniform: capacity share
  const double at1 = ZipfEstimator::PredictHitRatio(1.0, 10000, 1000000);
  EXPECT_GT(at1, 0.6);  // Zipf(1): 1% of a million items serve ~68%
  EXPECT_LT(at1, 0.75);
  EXPECT_LT(ZipfEstimator::PredictHitRatio(0.8, 10000, 1000000), at1);
  EXPECT_EQ(ZipfEstimator::PredictHitRatio(1.0, 5000, 1000), 1.0);
}

}  // namespace
}  // namespace engram
