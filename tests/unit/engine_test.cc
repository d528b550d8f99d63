// Engine lookups: rows land where asked (repeats included), bad requests are refused with a
// status naming the first offender, and concurrent callers all get the right bytes.
#include "tiering/engine.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <random>
#include <thread>
#include <unordered_map>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/batch_dedup.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

using testing::CreateSmallPack;
using testing::TempDir;

class EngineTest : public ::testing::TestWithParam<EngineOptions::Dedup> {
 protected:
  void SetUp() override {
    manifest_ = CreateSmallPack(dir_.path(), RowDtype::kBf16, 64, /*vocab=*/1000);
    EngineOptions options;
    options.worker_threads = 2;
    options.rows_per_piece = 64;  // small pieces, so a batch crosses threads
    options.max_batch_rows = 4096;
    options.dedup = GetParam();
    engine_ = std::make_unique<Engine>(options);
    auto table = Table::Open(dir_.path(), TableOptions{});
    ASSERT_TRUE(table.ok()) << table.status();
    table_ = table->get();
    ASSERT_TRUE(engine_->AddTable(std::move(*table)).ok());
  }

  // The expected bytes of head-local index `idx` of head `h` in layer `layer_id`.
  std::vector<uint8_t> ExpectedRow(int layer_id, int h, uint32_t idx) {
    const auto& layout = manifest_.FindLayer(layer_id)->layout;
    std::vector<float> scratch(64);
    std::vector<uint8_t> row(128);
    SyntheticRow(99, layer_id, layout.head_offset[h] + idx, 64, RowDtype::kBf16, scratch.data(), row.data());
    return row;
  }

  void CheckRows(int layer_id, uint32_t tokens, const std::vector<uint32_t>& indices, const std::vector<uint8_t>& out) {
    const int heads = table_->heads();
    for (uint32_t t = 0; t < tokens; ++t) {
      for (int h = 0; h < heads; ++h) {
        const auto want = ExpectedRow(layer_id, h, indices[t * heads + h]);
        ASSERT_EQ(0, std::memcmp(out.data() + (static_cast<size_t>(t) * heads + h) * 128, want.data(), 128))
            << "token " << t << " head " << h;
      }
    }
  }

  TempDir dir_;
  PackManifest manifest_;
  std::unique_ptr<Engine> engine_;
  const Table* table_ = nullptr;
};

TEST_P(EngineTest, GathersRowsWithRepeats) {
  const int heads = table_->heads();
  const uint32_t tokens = 300;
  std::vector<uint32_t> indices(tokens * heads);
  std::mt19937 rng(1);
  for (size_t i = 0; i < indices.size(); ++i) {
    indices[i] = (i % 3 == 0) ? 5 : rng() % 1000;  // every third index is the same hot row
  }
  // Boundary rows: the first and last row of every head.
  for (int h = 0; h < heads; ++h) {
    indices[h] = 0;
    indices[heads + h] = static_cast<uint32_t>(manifest_.layers[0].layout.head_rows[h] - 1);
  }
  std::vector<uint8_t> out(indices.size() * 128);
  LookupStats stats;
  ASSERT_TRUE(engine_->Lookup("small", 3, tokens, indices, absl::MakeSpan(out), &stats).ok());
  CheckRows(3, tokens, indices, out);
  EXPECT_EQ(stats.rows_requested, indices.size());
  if (GetParam() == EngineOptions::Dedup::kOn) {
    EXPECT_LT(stats.rows_read, stats.rows_requested);  // repeats were read once per piece
  } else {
    // kOff, and kAuto over a resident DRAM table (whose repeats are cache hits): every row read.
    EXPECT_EQ(stats.rows_read, stats.rows_requested);
  }
  EXPECT_EQ(stats.tiers.rows[static_cast<int>(TierKind::kDram)], stats.rows_read);
}

TEST_P(EngineTest, OutOfRangeIndexNamesTheFirstOffender) {
  const int heads = table_->heads();
  std::vector<uint32_t> indices(4 * heads, 1);
  const int64_t limit = manifest_.layers[1].layout.head_rows[2];
  indices[2 * heads + 2] = static_cast<uint32_t>(limit);      // token 2, head 2: one past the end
  indices[3 * heads + 0] = 4000000000u;                        // a later offender
  std::vector<uint8_t> out(indices.size() * 128, 0xee);
  const absl::Status s = engine_->Lookup("small", 7, 4, indices, absl::MakeSpan(out), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find(absl::StrCat("index ", limit, " for token 2, head 2")), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find(absl::StrCat("has ", limit, " rows")), absl::string_view::npos) << s;
}

TEST_P(EngineTest, ShapeAndNameErrors) {
  const int heads = table_->heads();
  std::vector<uint32_t> indices(2 * heads, 0);
  std::vector<uint8_t> out(indices.size() * 128);
  EXPECT_EQ(engine_->Lookup("nope", 3, 2, indices, absl::MakeSpan(out), nullptr).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->Lookup("small", 4, 2, indices, absl::MakeSpan(out), nullptr).code(), absl::StatusCode::kNotFound);
  const absl::Status short_indices = engine_->Lookup("small", 3, 3, indices, absl::MakeSpan(out), nullptr);
  EXPECT_EQ(short_indices.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(short_indices.message().find("expected"), absl::string_view::npos);
  std::vector<uint32_t> many(5000 * heads, 0);
  std::vector<uint8_t> big(many.size() * 128);
  EXPECT_EQ(engine_->Lookup("small", 3, 5000, many, absl::MakeSpan(big), nullptr).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(engine_->Lookup("small", 3, 0, {}, {}, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(EngineTest, ConcurrentCallersGetTheirOwnRows) {
  const int heads = table_->heads();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int c = 0; c < 4; ++c) {
    threads.emplace_back([&, c] {
      std::mt19937 rng(c);
      for (int iter = 0; iter < 20; ++iter) {
        const uint32_t tokens = 1 + rng() % 200;
        std::vector<uint32_t> indices(tokens * heads);
        for (auto& i : indices) i = rng() % 997;
        std::vector<uint8_t> out(indices.size() * 128);
        const int layer = iter % 2 ? 3 : 7;
        if (!engine_->Lookup(*table_, layer, tokens, indices, absl::MakeSpan(out), nullptr).ok()) {
          ++failures;
          continue;
        }
        for (size_t i = 0; i < indices.size(); i += 7) {
          if (std::memcmp(out.data() + i * 128, ExpectedRow(layer, static_cast<int>(i % heads), indices[i]).data(), 128) != 0) {
            ++failures;
          }
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_P(EngineTest, HashTokensMatchesTheHasher) {
  std::vector<int32_t> tokens = {5, 9, 2, 700, 5, 9};
  std::vector<uint32_t> indices;
  ASSERT_TRUE(Engine::HashTokens(*table_, 7, tokens, 2, 3, &indices).ok());
  std::vector<int64_t> all;
  ASSERT_TRUE(table_->hasher().HashAllLayers(tokens, 2, 3, &all).ok());
  const int heads = table_->heads();
  for (int t = 0; t < 6; ++t) {
    for (int h = 0; h < heads; ++h) EXPECT_EQ(indices[t * heads + h], all[(t * 2 + 1) * heads + h]);
  }
  EXPECT_EQ(Engine::HashTokens(*table_, 8, tokens, 2, 3, &indices).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(Engine::HashTokens(*table_, 7, tokens, 2, 4, &indices).code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(DedupModes, EngineTest,
                         ::testing::Values(EngineOptions::Dedup::kAuto, EngineOptions::Dedup::kOn,
                                           EngineOptions::Dedup::kOff),
                         [](const auto& info) {
                           return info.param == EngineOptions::Dedup::kAuto ? "auto"
                                  : info.param == EngineOptions::Dedup::kOn ? "on" : "off";
                         });

// A shared resident table: its memfd holds exactly the rows the table serves, and nobody (the
// daemon included) can write, resize or map it writable: clients can be handed it safely.
TEST(SharedResidentTableTest, MemfdIsSealedReadOnlyAndHoldsTheRows) {
  TempDir dir;
  const PackManifest manifest = CreateSmallPack(dir.path(), RowDtype::kBf16, 64, /*vocab=*/1000);
  TableOptions options;
  options.share_resident = true;
  auto table = Table::Open(dir.path(), options);
  ASSERT_TRUE(table.ok()) << table.status();
  for (const auto& layer : (*table)->layers()) {
    const int fd = layer.tier->shared_fd();
    ASSERT_GE(fd, 0);
    EXPECT_EQ(layer.tier->description(), "dram-resident-shared");
    struct stat st {};
    ASSERT_EQ(fstat(fd, &st), 0);
    const uint64_t bytes = layer.tier->total_rows() * 128;
    ASSERT_GE(static_cast<uint64_t>(st.st_size), bytes);
    EXPECT_EQ(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), MAP_FAILED);
    EXPECT_EQ(errno, EPERM);
    EXPECT_NE(ftruncate(fd, 4096), 0);
    EXPECT_NE(pwrite(fd, "x", 1, 0), 1);
    void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    ASSERT_NE(p, MAP_FAILED);
    EXPECT_NE(mprotect(p, bytes, PROT_READ | PROT_WRITE), 0) << "a read-only mapping must not become writable";
    const auto& layout = layer.pack_layer->layout;
    std::vector<float> scratch(64);
    std::vector<uint8_t> want(128);
    for (uint64_t row : {uint64_t{0}, layout.total_rows / 2, layout.total_rows - 1}) {
      SyntheticRow(99, layer.pack_layer->id, row, 64, RowDtype::kBf16, scratch.data(), want.data());
      EXPECT_EQ(0, std::memcmp(static_cast<uint8_t*>(p) + row * 128, want.data(), 128)) << "row " << row;
    }
    munmap(p, bytes);
  }
  // Not shared by default in a plain Table: no descriptor to hand out.
  auto plain = Table::Open(dir.path(), TableOptions{});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->layers()[0].tier->shared_fd(), -1);
}

// The device path's dedup: every position names the first position of its row, which holds the
// same row and names itself; reused scratch from a bigger request leaves no trace.
TEST(FirstPositionsTest, EachPositionNamesTheFirstOccurrenceOfItsRow) {
  FirstPositionScratch scratch;
  std::vector<uint32_t> first;
  std::mt19937_64 rng(9);
  for (size_t n : {size_t{0}, size_t{1}, size_t{5000}, size_t{70000}, size_t{300}}) {
    std::vector<uint64_t> rows(n);
    for (auto& r : rows) r = (rng() % 4 == 0 ? rng() : rng() % 97) & ((uint64_t{1} << 40) - 1);  // many repeats
    FirstPositions(rows, &scratch, &first);
    ASSERT_EQ(first.size(), n);
    std::unordered_map<uint64_t, uint32_t> seen;
    size_t repeats = 0;
    for (size_t i = 0; i < n; ++i) {
      const auto [it, inserted] = seen.try_emplace(rows[i], static_cast<uint32_t>(i));
      EXPECT_EQ(first[i], it->second) << "position " << i << " of " << n;
      repeats += inserted ? 0 : 1;
    }
    if (n >= 5000) {
      EXPECT_GT(repeats, n / 2);  // the test must have repeats to check
    }
  }
}

TEST(EngineOptionsTest, ParseDedup) {
  EXPECT_EQ(*ParseDedup("on"), EngineOptions::Dedup::kOn);
  EXPECT_EQ(ParseDedup("sometimes").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace engram
