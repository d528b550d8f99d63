// Cache policies and the row cache: eviction order, scan resistance, admission, concurrency, and
// the simulator's hindsight references.
#include <random>
#include <thread>

#include "bench/simulate.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/cache/policy.h"
#include "tiering/cache/row_cache.h"

namespace engram {
namespace {

std::unique_ptr<RowCache> MakeCache(const std::string& policy, uint64_t capacity, int64_t row_bytes = 0, int shards = 1) {
  auto spec = ParsePolicy(policy);
  EXPECT_TRUE(spec.ok());
  auto cache = RowCache::Create(capacity, row_bytes, *spec, shards);
  EXPECT_TRUE(cache.ok()) << cache.status();
  return std::move(*cache);
}

// Demand-fill: look up, insert on a miss. Returns hits.
int Replay(RowCache& cache, const std::vector<uint64_t>& keys) {
  int hits = 0;
  for (uint64_t k : keys) {
    if (cache.Lookup(k, nullptr)) {
      ++hits;
    } else {
      cache.Insert(k, nullptr);
    }
  }
  return hits;
}

TEST(CachePolicyTest, LruEvictsTheLeastRecentlyUsed) {
  auto cache = MakeCache("lru", 3);
  Replay(*cache, {1, 2, 3, 1, 4});  // 2 is least recent when 4 arrives
  EXPECT_TRUE(cache->Contains(1));
  EXPECT_FALSE(cache->Contains(2));
  EXPECT_TRUE(cache->Contains(3));
  EXPECT_TRUE(cache->Contains(4));
}

TEST(CachePolicyTest, S3FifoKeepsTheHotSetThroughAScan) {
  // 50 hot rows used repeatedly, then a one-pass scan of 5000 cold rows, then the hot rows again.
  for (const std::string policy : {"s3fifo", "tinylfu"}) {
    auto cache = MakeCache(policy, 100);
    std::vector<uint64_t> hot;
    for (int r = 0; r < 5; ++r) {
      for (uint64_t k = 0; k < 50; ++k) hot.push_back(k);
    }
    Replay(*cache, hot);
    std::vector<uint64_t> scan;
    for (uint64_t k = 1000; k < 6000; ++k) scan.push_back(k);
    Replay(*cache, scan);
    std::vector<uint64_t> again(hot.begin(), hot.begin() + 50);
    EXPECT_GE(Replay(*cache, again), 45) << policy;
  }
  auto lru = MakeCache("lru", 100);
  std::vector<uint64_t> hot;
  for (uint64_t k = 0; k < 50; ++k) hot.push_back(k);
  Replay(*lru, hot);
  Replay(*lru, hot);
  std::vector<uint64_t> scan;
  for (uint64_t k = 1000; k < 6000; ++k) scan.push_back(k);
  Replay(*lru, scan);
  EXPECT_EQ(Replay(*lru, hot), 0);  // LRU is not scan-resistant: that is why it is not the default
}

TEST(CachePolicyTest, TinyLfuRefusesOneHitCandidatesAgainstAFrequentVictim) {
  auto cache = MakeCache("tinylfu", 10);
  std::vector<uint64_t> keys;
  for (int r = 0; r < 20; ++r) {
    for (uint64_t k = 0; k < 10; ++k) keys.push_back(k);
  }
  Replay(*cache, keys);  // 10 frequent rows fill the cache and get promoted to main
  for (uint64_t k = 100; k < 200; ++k) cache->Lookup(k, nullptr), cache->Insert(k, nullptr);
  int kept = 0;
  for (uint64_t k = 0; k < 10; ++k) kept += cache->Contains(k);
  EXPECT_GE(kept, 9);
  EXPECT_GT(cache->stats().rejected, 50u);
}

TEST(CachePolicyTest, StaticTopKHoldsOnlyWhatWasWarmed) {
  auto cache = MakeCache("static-topk", 2, 8);
  const uint8_t a[8] = {1}, b[8] = {2}, c[8] = {3};
  EXPECT_TRUE(cache->Warm(7, a, 5));
  EXPECT_TRUE(cache->Warm(8, b, 3));
  EXPECT_FALSE(cache->Warm(9, c, 1));   // full
  EXPECT_FALSE(cache->Insert(10, c));   // misses never enter a static set
  uint8_t out[8] = {};
  ASSERT_TRUE(cache->Lookup(8, out));
  EXPECT_EQ(out[0], 2);
  const auto hot = cache->HotSet(10);
  ASSERT_EQ(hot.size(), 2u);
  EXPECT_EQ(hot[0].first, 7u);  // hottest first
}

TEST(RowCacheTest, ConcurrentReadersAndWritersSeeOnlyTheirRowsBytes) {
  auto cache = MakeCache("s3fifo", 512, 64, 8);
  std::vector<std::thread> threads;
  std::atomic<int> corrupt{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      uint8_t row[64], out[64];
      for (int i = 0; i < 20000; ++i) {
        const uint64_t key = rng() % 2000;
        if (cache->Lookup(key, out)) {
          for (uint8_t v : out) corrupt += v != static_cast<uint8_t>(key * 7);
        } else {
          std::memset(row, static_cast<uint8_t>(key * 7), sizeof(row));
          cache->Insert(key, row);
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(corrupt.load(), 0);
  EXPECT_LE(cache->size(), 512u);
  EXPECT_GT(cache->stats().hits, 0u);
}

TEST(SimulatorTest, HindsightReferencesBoundTheOnlinePolicies) {
  testing::TempDir dir;
  const PackManifest m = testing::CreateSmallPack(dir.path(), RowDtype::kBf16, 32, /*vocab=*/3000);
  std::vector<int32_t> tokens(20000);
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> u(0, 1);
  for (auto& t : tokens) t = static_cast<int32_t>(std::pow(900.0, u(rng)));  // skewed ids
  SimulationOptions options;
  options.policies = {"lru", "s3fifo", "tinylfu", "static-topk", "belady"};
  options.capacity = "5%";
  auto report = SimulateCache(m, tokens, options);
  ASSERT_TRUE(report.ok()) << report.status();
  const auto& r = report->results;
  const double belady = r[4].hit_ratio();
  for (int i = 0; i < 3; ++i) {
    EXPECT_GT(r[i].hit_ratio(), 0.05) << r[i].policy;
    EXPECT_LE(r[i].hit_ratio(), belady + 1e-9) << r[i].policy;  // nothing beats optimal replacement
  }
  EXPECT_GT(r[3].hit_ratio(), 0.05);
  EXPECT_EQ(r[0].accesses, tokens.size() * 2 * m.hash.heads_per_layer());
  EXPECT_FALSE(SimulateCache(m, tokens, {.policies = {"fifo"}}).ok());

  // Perfect admission (a hindsight filter in front of the default) is still bounded by Belady.
  auto oracle = SimulateCache(m, tokens, {.policies = {"oracle-admission", "belady"}, .capacity = "5%"});
  ASSERT_TRUE(oracle.ok()) << oracle.status();
  EXPECT_GT(oracle->results[0].hit_ratio(), 0.05);
  EXPECT_LE(oracle->results[0].hit_ratio(), oracle->results[1].hit_ratio() + 1e-9);
}

TEST(SimulatorTest, ReplaysPlayTheTraceAgainIntoTheSameCache) {
  const PackManifest m = testing::SmallManifest(RowDtype::kBf16, 32, /*vocab=*/3000);
  std::vector<int32_t> tokens(3000);
  std::mt19937 rng(2);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % 900);
  // Room for every row: the second pass hits on every access the first pass missed, too.
  SimulationOptions once{.policies = {"s3fifo"}, .capacity = "100%", .shards = 1};
  SimulationOptions twice = once;
  twice.replays = 2;
  auto a = SimulateCache(m, tokens, once);
  auto b = SimulateCache(m, tokens, twice);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->results[0].accesses, 2 * a->results[0].accesses);
  EXPECT_EQ(b->results[0].hits, a->results[0].hits + a->results[0].accesses);
  // The last pass on its own: every access hits (all rows fit), and one pass played once has none.
  EXPECT_EQ(b->results[0].last_pass_accesses, a->results[0].accesses);
  EXPECT_EQ(b->results[0].last_pass_hits, a->results[0].accesses);
  EXPECT_EQ(a->results[0].last_pass_accesses, 0u);
  twice.replays = 0;
  EXPECT_FALSE(SimulateCache(m, tokens, twice).ok());
}

// The planner's hits are accesses that do not cross PCIe. Within its first request nothing is
// resident yet (plans come between requests), so what it saves is exactly the repeats: each
// distinct row crosses once, as the device path stages it; an unbounded Belady misses the same.
TEST(SimulatorTest, PlannerCountsARowOncePerRequest) {
  const PackManifest m = testing::SmallManifest(RowDtype::kBf16, 32, /*vocab=*/3000);
  std::vector<int32_t> tokens(2000);
  std::mt19937 rng(3);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % 300);
  auto r = SimulateCache(m, tokens, {.policies = {"hbm", "hbm-1in64", "belady"}, .capacity = "100%"});
  ASSERT_TRUE(r.ok()) << r.status();
  const uint64_t per_layer = r->results[0].accesses / m.layers.size();
  ASSERT_LT(per_layer, 16u * 4096) << "the trace must fit in one request";
  const uint64_t repeats = r->results[2].hits;
  EXPECT_GT(repeats, r->results[0].accesses / 4);  // 300 ids: repeated 2-grams and 3-grams
  EXPECT_EQ(r->results[0].hits, repeats);
  EXPECT_EQ(r->results[1].hits, repeats);  // sampling changes what is promoted, not this
}

TEST(SimulatorTest, WarmingFromAProfileFillsTheCacheBeforeTheFirstAccess) {
  const PackManifest m = testing::SmallManifest(RowDtype::kBf16, 32, /*vocab=*/3000);
  std::vector<int32_t> tokens(3000);
  std::mt19937 rng(4);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % 900);
  SimulationOptions cold{.policies = {"s3fifo", "belady"}, .capacity = "100%", .shards = 1};
  SimulationOptions warmed = cold;
  warmed.warm_tokens = tokens;  // a profile of this very trace: every row is there from the start
  auto a = SimulateCache(m, tokens, cold);
  auto b = SimulateCache(m, tokens, warmed);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_LT(a->results[0].hit_ratio(), 1.0);  // cold: every row's first access misses
  EXPECT_EQ(b->results[0].hits, b->results[0].accesses);
  EXPECT_EQ(b->results[1].hits, a->results[1].hits);  // the hindsight reference is not warmed
}

TEST(SimulatorTest, ReuseBreakdownTellsRepeatedTextFromHashCollisions) {
  // A passage read twice, in two sequences, over tables far larger than its n-grams: nearly every
  // reuse is the same n-gram again, in the other sequence.
  const PackManifest big = testing::SmallManifest(RowDtype::kBf16, 32, /*vocab=*/200003);
  std::vector<int32_t> passage(500);
  std::mt19937 rng(3);
  for (auto& t : passage) t = static_cast<int32_t>(rng() % 1000);
  std::vector<int32_t> twice = passage;
  twice.insert(twice.end(), passage.begin(), passage.end());
  auto repeated = SimulateCache(big, twice, {.policies = {"lru"}, .seq_len = 500, .reuse_breakdown = true});
  ASSERT_TRUE(repeated.ok()) << repeated.status();
  ASSERT_EQ(repeated->reuse.size(), 2u);  // orders 2 and 3
  for (const ReuseBreakdown& r : repeated->reuse) {
    EXPECT_EQ(r.accesses, 2u * 2 * 1000);  // 2 layers x 2 heads x 1000 tokens
    EXPECT_GE(r.reuses, r.accesses / 2) << r.order;  // the second reading reuses every row
    EXPECT_LT(r.other_ngram, r.reuses / 20) << r.order;
    EXPECT_LT(r.in_sequence, r.reuses / 10) << r.order;
  }
  // Random tokens over tiny tables: rows are shared by unrelated n-grams, so most reuse is that.
  const PackManifest tiny = testing::SmallManifest(RowDtype::kBf16, 32, /*vocab=*/97);
  std::vector<int32_t> noise(5000);
  for (auto& t : noise) t = static_cast<int32_t>(rng() % 1000);
  auto collided = SimulateCache(tiny, noise, {.policies = {"lru"}, .seq_len = 5000, .reuse_breakdown = true});
  ASSERT_TRUE(collided.ok()) << collided.status();
  for (const ReuseBreakdown& r : collided->reuse) {
    EXPECT_GT(r.reuses, r.accesses / 2) << r.order;
    EXPECT_GT(r.other_ngram, r.reuses * 9 / 10) << r.order;
    EXPECT_EQ(r.in_sequence, r.reuses) << r.order;  // one sequence
  }
}

}  // namespace
}  // namespace engram
