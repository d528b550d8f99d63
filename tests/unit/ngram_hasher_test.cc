// Hashing must match the reference demo bit for bit: every case of hash_vectors.json (made with
// numpy from the reference semantics), plus the error paths a user can hit.
#include "tiering/layout/ngram_hasher.h"

#include <fstream>

#include "gtest/gtest.h"
#include "engram/client.h"
#include "engram/v1/engram.pb.h"
#include "nlohmann/json.hpp"
#include "service/grpc_service.h"
#include "tiering/pack_writer.h"
#include "tiering/table.h"
#include "tests/test_util.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/numpy_rng.h"

namespace engram {
namespace {

using testing::TestDataPath;

nlohmann::json LoadVectors() {
  std::ifstream in(TestDataPath("hash_vectors.json"));
  return nlohmann::json::parse(in);
}

HashConfig ConfigFor(const nlohmann::json& c) {
  const auto& cfg = c["config"];
  HashConfig hc;
  hc.max_ngram = cfg["max_ngram"];
  hc.heads_per_ngram = cfg["heads"];
  hc.seed = cfg["seed"];
  hc.vocab_per_ngram = cfg["vocab"].get<std::vector<int64_t>>();
  hc.pad_id = cfg["pad_id"];
  if (cfg.value("compress", true)) {
    hc.compress_lut = *ReadInt32File(std::string(ENGRAM_LUT_PATH));
  }
  hc.compressed_vocab = c["compressed_vocab"];
  return hc;
}

TEST(NgramHasherTest, MatchesEveryReferenceVector) {
  const auto vectors = LoadVectors();
  ASSERT_GE(vectors.size(), 3u);
  for (const auto& c : vectors) {
    SCOPED_TRACE(c["config"]["name"].get<std::string>());
    const HashConfig hc = ConfigFor(c);
    const auto layer_ids = c["config"]["layers"].get<std::vector<int>>();
    auto layouts = DeriveLayerLayouts(hc, layer_ids);
    ASSERT_TRUE(layouts.ok()) << layouts.status();
    for (const auto& layout : *layouts) {
      const std::string key = std::to_string(layout.layer_id);
      EXPECT_EQ(layout.multipliers, c["multipliers"][key].get<std::vector<int64_t>>());
      std::vector<int64_t> primes;
      for (const auto& order : c["primes"][key]) {
        for (const auto& p : order) primes.push_back(p);
      }
      EXPECT_EQ(layout.head_rows, primes);
    }
    auto hasher = NgramHasher::Create(hc, *layouts);
    ASSERT_TRUE(hasher.ok()) << hasher.status();
    const int batch = c["config"]["B"], seq_len = c["config"]["T"];
    std::vector<int32_t> raw;
    for (const auto& row : c["raw_token_ids"]) {
      for (const auto& t : row) raw.push_back(t);
    }
    std::vector<int64_t> out;
    ASSERT_TRUE((*hasher)->HashAllLayers(raw, batch, seq_len, &out).ok());
    const int heads = hc.heads_per_layer();
    const int layers = static_cast<int>(layer_ids.size());
    int mismatches = 0;
    for (int l = 0; l < layers; ++l) {
      const auto& want = c["hashes"][std::to_string(layer_ids[l])];
      for (int b = 0; b < batch; ++b) {
        for (int t = 0; t < seq_len; ++t) {
          for (int h = 0; h < heads; ++h) {
            const int64_t have = out[((static_cast<size_t>(b) * seq_len + t) * layers + l) * heads + h];
            if (have != want[b][t][h].get<int64_t>()) ++mismatches;
          }
        }
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(NgramHasherTest, PadCompressedMatchesVectors) {
  for (const auto& c : LoadVectors()) {
    const HashConfig hc = ConfigFor(c);
    const int64_t pad = hc.compress_lut.empty() ? hc.pad_id : hc.compress_lut[hc.pad_id];
    EXPECT_EQ(pad, c["pad_id_compressed"].get<int64_t>());
  }
}

TEST(NgramHasherTest, LaterLayersContinueThePrimeSearch) {
  HashConfig hc;
  hc.max_ngram = 3;
  hc.heads_per_ngram = 2;
  hc.vocab_per_ngram = {10, 10};
  hc.compressed_vocab = 1000;
  auto layouts = DeriveLayerLayouts(hc, std::vector<int>{4, 2});
  ASSERT_TRUE(layouts.ok());
  // Layer 4 first (configured order): 11 13 | 17 19 ; layer 2 continues: 23 29 | 31 37.
  EXPECT_EQ((*layouts)[0].head_rows, (std::vector<int64_t>{11, 13, 17, 19}));
  EXPECT_EQ((*layouts)[1].head_rows, (std::vector<int64_t>{23, 29, 31, 37}));
  EXPECT_EQ((*layouts)[1].head_offset, (std::vector<uint64_t>{0, 23, 52, 83}));
  EXPECT_EQ((*layouts)[1].total_rows, 120u);
}

TEST(NgramHasherTest, NegativeMixUsesFloorModulo) {
  // A multiplier chosen so the wrapped product is negative: the index must still be in [0, p).
  HashConfig hc;
  hc.max_ngram = 2;
  hc.heads_per_ngram = 1;
  hc.vocab_per_ngram = {100};
  hc.compressed_vocab = 1000;
  hc.pad_id = 0;
  LayerHashLayout layout;
  layout.layer_id = 0;
  layout.head_rows = {101};
  layout.multipliers = {-1, 3};  // token 5 times -1 is -5; the pad (0) adds nothing
  auto hasher = NgramHasher::Create(hc, {layout});
  ASSERT_TRUE(hasher.ok());
  std::vector<int64_t> out(1);
  (*hasher)->HashCompressed(std::vector<int64_t>{5}, 1, 1, 0, absl::MakeSpan(out));
  EXPECT_EQ(out[0], 96);  // floor(-5 mod 101) = 96, where C++'s % would give -5
}

TEST(NgramHasherTest, RejectsTokenOutsideTheLut) {
  HashConfig hc;
  hc.max_ngram = 2;
  hc.heads_per_ngram = 1;
  hc.vocab_per_ngram = {50};
  hc.compress_lut = {0, 1, 2, 2};
  hc.compressed_vocab = 3;
  hc.pad_id = 1;
  auto layouts = DeriveLayerLayouts(hc, std::vector<int>{0});
  ASSERT_TRUE(layouts.ok());
  auto hasher = NgramHasher::Create(hc, *layouts);
  std::vector<int64_t> out;
  const absl::Status s = (*hasher)->HashAllLayers(std::vector<int32_t>{1, 3, 4}, 1, 3, &out);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("token id 4 at position 2"), absl::string_view::npos) << s;
}

TEST(NgramHasherTest, ValidateNamesTheBadField) {
  HashConfig hc;
  hc.max_ngram = 3;
  hc.vocab_per_ngram = {100};  // needs 2 entries
  hc.compressed_vocab = 10;
  const absl::Status s = hc.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("vocab_per_ngram"), absl::string_view::npos) << s;
}

TEST(NumpyRngTest, RefusesRangesOnNumpys32BitPath) {
  EXPECT_FALSE(NumpyIntegers(0, 1000, 3).ok());
  EXPECT_TRUE(NumpyIntegers(0, 1ull << 40, 3).ok());
}

TEST(PrimesTest, NextPrimeAbove) {
  EXPECT_EQ(NextPrimeAbove(646399), 646403);
  EXPECT_EQ(NextPrimeAbove(1), 2);
  EXPECT_EQ(NextPrimeAbove(13), 17);
  EXPECT_FALSE(IsPrime(3215031751ULL));  // a strong pseudoprime to bases 2, 3, 5, 7
  // Agrees with trial division around the DeepSeek-V4.1 head sizes.
  for (uint64_t n = 15999000; n < 16001000; ++n) {
    bool trial = true;
    for (uint64_t d = 2; d * d <= n; ++d) {
      if (n % d == 0) {
        trial = false;
        break;
      }
    }
    ASSERT_EQ(IsPrime(n), trial) << n;
  }
}

// A table whose manifest has dead positions hands them to clients with its layout (GetTable /
// OpenTable), so a client's own hashing of -1 ids agrees with the daemon's; the dsv41-flash preset
// has them, the demo preset does not.
TEST(NgramHasherTest, DeadPositionsTravelWithTheTableLayoutToClients) {
  testing::TempDir dir;
  PackManifest m = testing::SmallManifest(RowDtype::kBf16, 64);
  m.hash.dead_token_id = -1;
  PackWriteOptions options;
  options.out_dir = dir.path();
  options.force = true;
  ASSERT_TRUE(CreateSyntheticPack(m, options).ok());
  auto table = Table::Open(dir.path(), TableOptions{});
  ASSERT_TRUE(table.ok()) << table.status();
  ASSERT_EQ((*table)->hasher().config().dead_token_id, -1);
  v1::TableInfo info;
  FillTableInfo(**table, 1 << 20, &info);
  auto handle = TableHandle::FromTableInfo(info.SerializeAsString());
  ASSERT_TRUE(handle.ok()) << handle.status();
  ASSERT_EQ((*handle)->hasher().config().dead_token_id, -1);
  const std::vector<int32_t> raw = {-1, 5, 9, -1, 7, 3, 3, 8, -1};
  std::vector<int64_t> daemon_side, client_side;
  ASSERT_TRUE((*table)->hasher().HashAllLayers(raw, 1, static_cast<int>(raw.size()), &daemon_side).ok());
  ASSERT_TRUE((*handle)->hasher().HashAllLayers(raw, 1, static_cast<int>(raw.size()), &client_side).ok());
  EXPECT_EQ(daemon_side, client_side);
  // Every dead position hashes as all-pad, like any other.
  const size_t per_token = daemon_side.size() / raw.size();
  for (size_t t : {size_t{3}, size_t{8}}) {
    EXPECT_TRUE(std::equal(daemon_side.begin() + t * per_token, daemon_side.begin() + (t + 1) * per_token,
                           daemon_side.begin()))
        << "position " << t;
  }
  PackPresetOptions preset;
  preset.preset = "dsv41-flash";
  preset.scale = 0.001;
  preset.compress_lut = {0, 1, 2, 3};
  auto v41 = PresetManifest(preset);
  ASSERT_TRUE(v41.ok()) << v41.status();
  EXPECT_EQ(v41->hash.dead_token_id, -1);
  preset.preset = "demo-v1";
  auto demo = PresetManifest(preset);
  ASSERT_TRUE(demo.ok()) << demo.status();
  EXPECT_FALSE(demo->hash.dead_token_id.has_value());
}

TEST(NgramHasherTest, ADeadTokenIdMustBeNegative) {
  HashConfig config = testing::SmallManifest(RowDtype::kBf16, 64).hash;
  config.dead_token_id = 5;
  const absl::Status s = config.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("hash.dead_token_id must be negative"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace engram
