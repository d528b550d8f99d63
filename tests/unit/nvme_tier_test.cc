// The NVMe tier: O_DIRECT reads through io_uring and the pread fallback return exactly the
// formula's bytes for every dtype (rows straddling blocks included); injected EIO and short reads
// fail with DataLoss naming the row and never hand back wrong bytes; the DRAM cache in front
// serves repeats from memory; a pack five times the budget is served correctly. Block checksums:
// a rotten block fails with DataLoss (twice: never cached) while other rows serve, a block that
// comes back right when read again is served, an io_uring wait that fails leaves no read in
// flight for the next call, and no caller can change what the cache keeps by writing its dests.
#include <cerrno>
#include <mutex>
#include <random>
#include <set>
#include <thread>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/block_checksums.h"
#include "tiering/cached_tier.h"
#include "tiering/engine.h"
#include "tiering/layout/synthetic.h"
#include "tiering/nvme_reader.h"

namespace engram {
namespace {

using testing::TempDir;

struct Case {
  RowDtype dtype;
  int dim;
  IoEngine engine;
};

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  return absl::StrCat(RowDtypeName(info.param.dtype), "_", info.param.dim, "_",
                      info.param.engine == IoEngine::kPread ? "pread" : "io_uring");
}

class NvmeReaderTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    manifest_ = testing::CreateSmallPack(dir_.path(), GetParam().dtype, GetParam().dim, /*vocab=*/700);
    layer_ = &manifest_.layers[0];
  }
  std::unique_ptr<NvmeReader> Open(NvmeOptions options = {}) {
    options.engine = GetParam().engine;
    auto reader = NvmeReader::Open(dir_ / layer_->file, manifest_.row.bytes, layer_->layout.total_rows, options,
                                   "table 'small' layer 3");
    EXPECT_TRUE(reader.ok()) << reader.status();
    return std::move(*reader);
  }
  // The reader as the table opens it: with the pack's block checksums.
  std::unique_ptr<NvmeReader> OpenVerified(NvmeOptions options = {}) {
    options.engine = GetParam().engine;
    auto sums = LoadBlockChecksums(dir_ / layer_->block_checksums_file, FileBytes(), layer_->block_checksums_xxh3_64);
    EXPECT_TRUE(sums.ok()) << sums.status();
    auto reader = NvmeReader::Open(dir_ / layer_->file, manifest_.row.bytes, layer_->layout.total_rows, options,
                                   "table 'small' layer 3", std::move(*sums));
    EXPECT_TRUE(reader.ok()) << reader.status();
    return std::move(*reader);
  }
  uint64_t FileBytes() const { return layer_->layout.total_rows * static_cast<uint64_t>(manifest_.row.bytes); }
  void FlipByte(uint64_t offset) {
    std::fstream f(dir_ / layer_->file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(offset));
    const char c = static_cast<char>(f.get() ^ 0x10);
    f.seekp(static_cast<std::streamoff>(offset));
    f.put(c);
  }
  std::vector<uint8_t> Expected(uint64_t row) {
    std::vector<float> scratch(manifest_.row.dim);
    std::vector<uint8_t> bytes(manifest_.row.bytes);
    SyntheticRow(99, layer_->id, row, manifest_.row.dim, manifest_.row.dtype, scratch.data(), bytes.data());
    return bytes;
  }

  TempDir dir_;
  PackManifest manifest_;
  const PackLayer* layer_ = nullptr;
};

TEST_P(NvmeReaderTest, RowsMatchTheFormulaIncludingBlockStraddlers) {
  auto reader = Open();
  EXPECT_EQ(reader->engine(), GetParam().engine);
  const uint64_t total = layer_->layout.total_rows;
  const int64_t rb = manifest_.row.bytes;
  std::vector<uint64_t> rows = {0, total - 1};
  for (uint64_t r = 1; r + 1 < total; ++r) {  // every row that crosses a 4 KiB boundary
    if ((r * rb) / 4096 != ((r + 1) * rb - 1) / 4096) rows.push_back(r);
  }
  ASSERT_GT(rows.size(), 3u);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 300; ++i) rows.push_back(rng() % total);
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  std::shuffle(rows.begin(), rows.end(), rng);
  std::vector<std::vector<uint8_t>> out(rows.size(), std::vector<uint8_t>(rb, 0xcd));
  std::vector<uint8_t*> dests;
  for (auto& o : out) dests.push_back(o.data());
  ASSERT_TRUE(reader->Read(rows, dests).ok());
  for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(out[i], Expected(rows[i])) << "row " << rows[i];
  // Rows sharing blocks were read together: fewer device reads than rows.
  EXPECT_LT(reader->stats().reads.load(), rows.size());
  EXPECT_EQ(reader->stats().rows.load(), rows.size());
}

TEST_P(NvmeReaderTest, EioFailsWithDataLossNamingTheRow) {
  NvmeOptions options;
  options.fault_hook = [](uint64_t offset, uint32_t, int64_t result) { return offset >= 8192 ? -EIO : result; };
  auto reader = Open(options);
  const uint64_t row = 20000 / manifest_.row.bytes;  // lives past byte 8192
  std::vector<uint8_t> out(manifest_.row.bytes), ok_out(manifest_.row.bytes);
  uint8_t* dests[] = {ok_out.data(), out.data()};
  const uint64_t rows[] = {0, row};
  const absl::Status s = reader->Read(rows, dests);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find(absl::StrCat("table 'small' layer 3 row ", row)), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("Input/output error"), absl::string_view::npos) << s;
  EXPECT_EQ(reader->stats().errors.load(), 1u);
}

TEST_P(NvmeReaderTest, ShortReadsAreRetriedThenFail) {
  std::atomic<int> short_left{1};
  NvmeOptions options;
  options.fault_hook = [&](uint64_t, uint32_t, int64_t result) {
    return short_left.fetch_sub(1) > 0 ? std::min<int64_t>(result, 64) : result;  // first read: 64 bytes
  };
  auto reader = Open(options);
  const uint64_t rows[] = {5};  // starts past byte 64 for every row size here
  std::vector<uint8_t> out(manifest_.row.bytes);
  uint8_t* dests[] = {out.data()};
  ASSERT_TRUE(reader->Read(rows, dests).ok());
  EXPECT_EQ(out, Expected(5));
  EXPECT_EQ(reader->stats().retries.load(), 1u);

  short_left = 1000;  // every attempt short
  const absl::Status s = reader->Read(rows, dests);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("short read"), absl::string_view::npos) << s;
}

TEST_P(NvmeReaderTest, ShortReadsAmongOthersInFlightAreRetriedAndEveryRowIsRight) {
  // A shallow queue kept full of other reads while every read comes back short once: each is sent
  // again (ahead of new reads) and every row still arrives with its own bytes.
  std::mutex mu;
  std::set<uint64_t> shortened;
  NvmeOptions options;
  options.queue_depth = 2;
  options.fault_hook = [&](uint64_t offset, uint32_t, int64_t result) {
    std::lock_guard<std::mutex> lock(mu);
    if (!shortened.insert(offset).second) return result;
    return std::min<int64_t>(result, 100);
  };
  auto reader = Open(options);
  const uint64_t total = layer_->layout.total_rows;
  std::mt19937_64 rng(11);
  std::vector<uint64_t> rows;
  for (int i = 0; i < 300; ++i) rows.push_back(rng() % total);
  std::sort(rows.begin(), rows.end());
  rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
  std::vector<std::vector<uint8_t>> out(rows.size(), std::vector<uint8_t>(manifest_.row.bytes, 0xcd));
  std::vector<uint8_t*> dests;
  for (auto& o : out) dests.push_back(o.data());
  ASSERT_TRUE(reader->Read(rows, dests).ok());
  for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(out[i], Expected(rows[i])) << "row " << rows[i];
  EXPECT_GT(shortened.size(), 2 * options.queue_depth);  // more reads than the queue holds
  EXPECT_EQ(reader->stats().retries.load(), shortened.size());
}

TEST_P(NvmeReaderTest, ARottenBlockFailsWithDataLossEveryTimeAndOtherBlocksServe) {
  ASSERT_FALSE(layer_->block_checksums_file.empty());  // packs are written with them
  std::vector<std::string> reported;
  NvmeOptions options;
  options.on_corrupt_block = [&](const absl::Status& s) { reported.emplace_back(s.message()); };
  auto reader = OpenVerified(options);
  EXPECT_TRUE(reader->verified());
  const int64_t rb = manifest_.row.bytes;
  const uint64_t bad_row = layer_->layout.total_rows / 2;
  const uint64_t bad_offset = bad_row * rb + rb / 2;
  const uint64_t bad_block = bad_offset / 4096;
  FlipByte(bad_offset);  // after open, before any read: rot the device picked up while serving
  std::vector<uint8_t> out(rb);
  uint8_t* dests[] = {out.data()};
  const uint64_t rows[] = {bad_row};
  for (int attempt = 0; attempt < 2; ++attempt) {
    const absl::Status s = reader->Read(rows, dests);
    ASSERT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    for (const std::string& needle :
         {absl::StrCat("table 'small' layer 3 row ", bad_row), absl::StrCat("block ", bad_block, " of "),
          std::string(dir_ / layer_->file), absl::StrCat("bytes ", bad_block * 4096, "..")}) {
      EXPECT_NE(s.message().find(needle), absl::string_view::npos) << needle << " not in: " << s;
    }
  }
  EXPECT_EQ(reader->stats().checksum_failures.load(), 2u);  // read, re-read, failed: each time
  ASSERT_EQ(reported.size(), 1u);                           // reported once per block
  // Rows in other blocks are served, and right.
  std::vector<uint64_t> good;
  for (uint64_t r = 0; r < layer_->layout.total_rows; r += 7) {
    if ((r * rb) / 4096 > bad_block || ((r + 1) * rb - 1) / 4096 < bad_block) good.push_back(r);
  }
  std::vector<std::vector<uint8_t>> outs(good.size(), std::vector<uint8_t>(rb));
  std::vector<uint8_t*> good_dests;
  for (auto& o : outs) good_dests.push_back(o.data());
  ASSERT_TRUE(reader->Read(good, good_dests).ok());
  for (size_t i = 0; i < good.size(); ++i) ASSERT_EQ(outs[i], Expected(good[i])) << "row " << good[i];
  EXPECT_GE(reader->stats().blocks_verified.load(), good.size() * rb / 4096);
}

TEST_P(NvmeReaderTest, ABlockThatReadsRightTheSecondTimeIsServed) {
  std::atomic<int> corrupt_left{1};
  NvmeOptions options;
  options.bytes_hook = [&](uint64_t, uint8_t* data, uint32_t bytes) {
    if (bytes > 0 && corrupt_left.fetch_sub(1) > 0) data[bytes / 2] ^= 0xff;  // a bad transfer, once
  };
  auto reader = OpenVerified(options);
  const uint64_t rows[] = {3};
  std::vector<uint8_t> out(manifest_.row.bytes);
  uint8_t* dests[] = {out.data()};
  ASSERT_TRUE(reader->Read(rows, dests).ok());
  EXPECT_EQ(out, Expected(3));
  EXPECT_EQ(reader->stats().checksum_retries.load(), 1u);
  EXPECT_EQ(reader->stats().checksum_failures.load(), 0u);
}

TEST_P(NvmeReaderTest, ChecksumsThatDoNotFitTheFileAreRefused) {
  std::vector<uint64_t> too_few(ChecksumBlocks(FileBytes()) - 1, 0);
  NvmeOptions options;
  options.engine = GetParam().engine;
  auto reader = NvmeReader::Open(dir_ / layer_->file, manifest_.row.bytes, layer_->layout.total_rows, options,
                                 "table 'small' layer 3", too_few);
  EXPECT_EQ(reader.status().code(), absl::StatusCode::kDataLoss);
  // A checksum file whose own hash is wrong is refused when loaded.
  auto sums = LoadBlockChecksums(dir_ / layer_->block_checksums_file, FileBytes(), "0000000000000000");
  EXPECT_EQ(sums.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(sums.status().message().find("are corrupt"), absl::string_view::npos) << sums.status();
}

INSTANTIATE_TEST_SUITE_P(
    DtypesAndEngines, NvmeReaderTest,
    ::testing::Values(Case{RowDtype::kF32, 100, IoEngine::kIoUring}, Case{RowDtype::kF32, 100, IoEngine::kPread},
                      Case{RowDtype::kBf16, 80, IoEngine::kIoUring}, Case{RowDtype::kF16, 96, IoEngine::kIoUring},
                      Case{RowDtype::kFp8E4m3Ue8m0x32, 256, IoEngine::kIoUring},
                      Case{RowDtype::kFp8E4m3Ue8m0x32, 256, IoEngine::kPread}),
    CaseName);

class CachedTableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    manifest_ = testing::CreateSmallPack(dir_.path(), RowDtype::kFp8E4m3Ue8m0x32, 256, /*vocab=*/900);
    TableOptions options;
    options.dram_budget_bytes = manifest_.total_bytes() / 5;  // the pack is 5x the budget
    auto table = Table::Open(dir_.path(), options);
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = table->get();
    ASSERT_FALSE(table_->resident());
    EngineOptions engine_options;
    engine_options.worker_threads = 1;
    engine_options.rows_per_piece = 256;
    engine_ = std::make_unique<Engine>(engine_options);
    ASSERT_TRUE(engine_->AddTable(std::move(*table)).ok());
  }
  void CheckRows(int layer_id, const std::vector<uint32_t>& indices, const std::vector<uint8_t>& out) {
    const auto& layout = manifest_.FindLayer(layer_id)->layout;
    const int heads = table_->heads();
    std::vector<float> scratch(256);
    std::vector<uint8_t> want(264);
    for (size_t i = 0; i < indices.size(); ++i) {
      SyntheticRow(99, layer_id, layout.head_offset[i % heads] + indices[i], 256, RowDtype::kFp8E4m3Ue8m0x32,
                   scratch.data(), want.data());
      ASSERT_EQ(0, std::memcmp(out.data() + i * 264, want.data(), 264)) << "position " << i;
    }
  }

  TempDir dir_;
  PackManifest manifest_;
  const Table* table_ = nullptr;
  std::unique_ptr<Engine> engine_;
};

TEST_F(CachedTableTest, ServesAPackLargerThanItsBudgetRowByRow) {
  const int heads = table_->heads();
  std::mt19937 rng(9);
  LookupStats first, second;
  std::vector<uint32_t> indices(300 * heads);
  for (auto& i : indices) i = rng() % 900;
  std::vector<uint8_t> out(indices.size() * 264);
  ASSERT_TRUE(engine_->Lookup(*table_, 7, 300, indices, absl::MakeSpan(out), &first).ok());
  CheckRows(7, indices, out);
  EXPECT_LT(first.rows_read, first.rows_requested);  // dedup runs for NVMe-backed tiers
  EXPECT_GT(first.tiers.rows[static_cast<int>(TierKind::kNvme)], 0u);
  std::fill(out.begin(), out.end(), 0);
  ASSERT_TRUE(engine_->Lookup(*table_, 7, 300, indices, absl::MakeSpan(out), &second).ok());
  CheckRows(7, indices, out);
  EXPECT_GT(second.tiers.rows[static_cast<int>(TierKind::kDram)], 0u);  // repeats now come from DRAM
  const auto* tier = dynamic_cast<const CachedNvmeTier*>(table_->FindLayer(7)->tier.get());
  ASSERT_NE(tier, nullptr);
  EXPECT_LE(tier->cache()->size(), tier->cache()->capacity_rows());
  EXPECT_LE(tier->cache()->memory_bytes(), manifest_.total_bytes() / 5 + (4u << 20));
}

TEST_F(CachedTableTest, ConcurrentRequestsGetCorrectRows) {
  const int heads = table_->heads();
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      for (int iter = 0; iter < 15; ++iter) {
        std::vector<uint32_t> indices(64 * heads);
        for (auto& i : indices) i = rng() % 50;  // a small hot range: concurrent misses overlap
        std::vector<uint8_t> out(indices.size() * 264);
        if (!engine_->Lookup(*table_, 3, 64, indices, absl::MakeSpan(out), nullptr).ok()) ++bad;
        if (::testing::Test::HasFailure()) return;
        CheckRows(3, indices, out);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST_F(CachedTableTest, WarmingFromAHotSetMakesThoseRowsHits) {
  auto* tier = const_cast<CachedNvmeTier*>(dynamic_cast<const CachedNvmeTier*>(table_->FindLayer(3)->tier.get()));
  std::vector<std::pair<uint64_t, uint32_t>> hot = {{10, 9}, {11, 8}, {12, 7}, {1u << 30, 5}};  // last one stale
  auto placed = tier->Warm(hot);
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(*placed, 3u);
  EXPECT_TRUE(tier->cache()->Contains(11));
  EXPECT_EQ(tier->cache()->HotSet(1)[0].first, 10u);
}

TEST(CachedTableFaultTest, ADeviceErrorFailsTheLookupAndLeavesTheCacheClean) {
  TempDir dir;
  const PackManifest m = testing::CreateSmallPack(dir.path(), RowDtype::kBf16, 64, /*vocab=*/500);
  std::atomic<bool> failing{true};
  TableOptions options;
  options.dram_budget_bytes = m.total_bytes() / 4;
  options.nvme.fault_hook = [&](uint64_t, uint32_t, int64_t result) { return failing.load() ? -EIO : result; };
  auto table = Table::Open(dir.path(), options);
  ASSERT_TRUE(table.ok()) << table.status();
  Engine engine(EngineOptions{});
  const Table* t = table->get();
  ASSERT_TRUE(engine.AddTable(std::move(*table)).ok());
  const int heads = t->heads();
  std::vector<uint32_t> indices(4 * heads, 7);
  std::vector<uint8_t> out(indices.size() * 128);
  const absl::Status s = engine.Lookup(*t, 3, 4, indices, absl::MakeSpan(out), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("table 'small' layer 3 row"), absl::string_view::npos) << s;
  const auto* tier = dynamic_cast<const CachedNvmeTier*>(t->FindLayer(3)->tier.get());
  EXPECT_EQ(tier->cache()->size(), 0u);  // nothing from a failed read was cached
  failing = false;  // the device recovers: the same request now succeeds with the right bytes
  ASSERT_TRUE(engine.Lookup(*t, 3, 4, indices, absl::MakeSpan(out), nullptr).ok());
  std::vector<float> scratch(64);
  std::vector<uint8_t> want(128);
  SyntheticRow(99, 3, m.layers[0].layout.head_offset[1] + 7, 64, RowDtype::kBf16, scratch.data(), want.data());
  EXPECT_EQ(0, std::memcmp(out.data() + 128, want.data(), 128));
}

TEST(NvmeUringTest, AFailedWaitLeavesNoReadInFlightForTheNextCall) {
  TempDir dir;
  const PackManifest m = testing::CreateSmallPack(dir.path(), RowDtype::kBf16, 64, /*vocab=*/900);
  const PackLayer& layer = m.layers[0];
  std::atomic<int> fail_left{1};
  NvmeOptions options;
  options.engine = IoEngine::kIoUring;
  options.queue_depth = 2;
  options.uring_wait_hook = [&](int rc) { return fail_left.fetch_sub(1) > 0 ? -EIO : rc; };
  auto reader = NvmeReader::Open(dir / layer.file, m.row.bytes, layer.layout.total_rows, options, "table 'small' layer 3");
  ASSERT_TRUE(reader.ok()) << reader.status();
  // Rows in many blocks: reads are in flight when the wait fails.
  std::vector<uint64_t> rows;
  for (uint64_t r = 0; r < layer.layout.total_rows; r += 40) rows.push_back(r);
  std::vector<std::vector<uint8_t>> out(rows.size(), std::vector<uint8_t>(m.row.bytes));
  std::vector<uint8_t*> dests;
  for (auto& o : out) dests.push_back(o.data());
  const absl::Status failed = (*reader)->Read(rows, dests);
  EXPECT_EQ(failed.code(), absl::StatusCode::kInternal) << failed;
  EXPECT_EQ((*reader)->stats().rings_abandoned.load(), 1u);
  // The next calls on this thread get exactly their own rows (no late completion of the failed call).
  std::vector<float> scratch(64);
  std::vector<uint8_t> want(m.row.bytes);
  for (int round = 0; round < 3; ++round) {
    for (auto& o : out) std::fill(o.begin(), o.end(), 0);
    ASSERT_TRUE((*reader)->Read(rows, dests).ok());
    for (size_t i = 0; i < rows.size(); ++i) {
      SyntheticRow(99, layer.id, rows[i], 64, RowDtype::kBf16, scratch.data(), want.data());
      ASSERT_EQ(out[i], want) << "row " << rows[i] << " round " << round;
    }
  }
}

// One request with cache hits and misses gets every row, with either engine (the pread engine
// once skipped the step that copies the hits).
TEST(CachedTableEngineTest, HitsAndMissesInOneRequestAreAllServed) {
  for (IoEngine engine : {IoEngine::kIoUring, IoEngine::kPread}) {
    TempDir dir;
    const PackManifest m = testing::CreateSmallPack(dir.path(), RowDtype::kBf16, 64, /*vocab=*/900);
    TableOptions options;
    options.dram_budget_bytes = m.total_bytes() / 2;
    options.nvme.engine = engine;
    auto table = Table::Open(dir.path(), options);
    ASSERT_TRUE(table.ok()) << table.status();
    RowTier* tier = (*table)->FindLayer(3)->tier.get();
    const std::vector<uint64_t> warm = {2, 300, 1200};
    std::vector<uint64_t> rows = {2, 5, 300, 700, 1200, 2000};  // three cached, three not
    std::vector<std::vector<uint8_t>> out(rows.size(), std::vector<uint8_t>(128));
    std::vector<uint8_t*> dests;
    for (auto& o : out) dests.push_back(o.data());
    TierCounts counts;
    ASSERT_TRUE(tier->ReadRows(warm, absl::MakeSpan(dests).subspan(0, warm.size()), &counts).ok());
    for (auto& o : out) std::fill(o.begin(), o.end(), 0);
    TierCounts mixed;
    ASSERT_TRUE(tier->ReadRows(rows, dests, &mixed).ok());
    EXPECT_EQ(mixed.rows[static_cast<int>(TierKind::kDram)], 3u);
    std::vector<float> scratch(64);
    std::vector<uint8_t> want(128);
    for (size_t i = 0; i < rows.size(); ++i) {
      SyntheticRow(99, 3, rows[i], 64, RowDtype::kBf16, scratch.data(), want.data());
      EXPECT_EQ(out[i], want) << "row " << rows[i] << (engine == IoEngine::kPread ? " (pread)" : " (io_uring)");
    }
  }
}

// A caller that rewrites its destinations while its read is in flight (as a shared-memory client
// can) changes only what it gets back, never what the cache keeps for everyone else.
TEST(CachedTableContractTest, WritingIntoDestsDuringAReadNeverReachesTheCache) {
  TempDir dir;
  const PackManifest m = testing::CreateSmallPack(dir.path(), RowDtype::kBf16, 64, /*vocab=*/900);
  TableOptions options;
  options.dram_budget_bytes = m.total_bytes() / 2;
  std::vector<uint8_t*> scribble_over;
  std::mutex mu;
  // Every completed device read: scribble over the request's dests, as a hostile client's thread would.
  options.nvme.bytes_hook = [&](uint64_t, uint8_t*, uint32_t) {
    std::lock_guard<std::mutex> lock(mu);
    for (uint8_t* d : scribble_over) std::memset(d, 0x5a, 128);
  };
  auto table = Table::Open(dir.path(), options);
  ASSERT_TRUE(table.ok()) << table.status();
  RowTier* tier = (*table)->FindLayer(3)->tier.get();
  std::vector<uint64_t> rows = {1, 50, 400, 999, 1500};
  std::vector<std::vector<uint8_t>> out(rows.size(), std::vector<uint8_t>(128));
  std::vector<uint8_t*> dests;
  for (auto& o : out) dests.push_back(o.data());
  {
    std::lock_guard<std::mutex> lock(mu);
    scribble_over = dests;
  }
  TierCounts counts;
  (void)tier->ReadRows(rows, dests, &counts);  // what this caller gets back is its own business
  {
    std::lock_guard<std::mutex> lock(mu);
    scribble_over.clear();
  }
  // Everyone after it reads the rows from the cache: the right bytes.
  std::vector<float> scratch(64);
  std::vector<uint8_t> want(128);
  for (auto& o : out) std::fill(o.begin(), o.end(), 0);
  TierCounts again;
  ASSERT_TRUE(tier->ReadRows(rows, dests, &again).ok());
  EXPECT_EQ(again.rows[static_cast<int>(TierKind::kDram)], rows.size());  // served by the cache
  for (size_t i = 0; i < rows.size(); ++i) {
    SyntheticRow(99, 3, rows[i], 64, RowDtype::kBf16, scratch.data(), want.data());
    ASSERT_EQ(out[i], want) << "row " << rows[i];
  }
}

}  // namespace
}  // namespace engram
