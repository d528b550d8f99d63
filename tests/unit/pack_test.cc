// Packs on disk: create -> verify -> load -> rows equal the synthetic formula, for every dtype;
// and a damaged pack is refused with an error naming what is wrong.
#include <fstream>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/dram_tier.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/synthetic.h"
#include "tiering/pack_writer.h"
#include "tiering/table.h"

namespace engram {
namespace {

using testing::CreateSmallPack;
using testing::TempDir;

class PackRoundTrip : public ::testing::TestWithParam<RowDtype> {};

TEST_P(PackRoundTrip, EveryRowMatchesTheFormula) {
  TempDir dir;
  const RowDtype dtype = GetParam();
  const PackManifest written = CreateSmallPack(dir.path(), dtype, 64);
  auto report = VerifyPack(dir.path(), 16);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(report->problems.empty()) << report->problems[0];
  EXPECT_EQ(report->rows_sampled, 32u);

  auto loaded = LoadPackManifest(dir.path());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->row.dtype, dtype);
  EXPECT_EQ(loaded->layers.size(), 2u);
  EXPECT_EQ(loaded->layers[1].xxh3_64, written.layers[1].xxh3_64);

  auto table = Table::Open(dir.path(), TableOptions{});
  ASSERT_TRUE(table.ok()) << table.status();
  std::vector<float> scratch(64);
  std::vector<uint8_t> want(loaded->row.bytes);
  for (const auto& layer : (*table)->layers()) {
    const auto* tier = dynamic_cast<const DramResidentTier*>(layer.tier.get());
    ASSERT_NE(tier, nullptr);
    for (uint64_t r = 0; r < tier->total_rows(); ++r) {
      SyntheticRow(99, layer.pack_layer->id, r, 64, dtype, scratch.data(), want.data());
      ASSERT_EQ(0, std::memcmp(tier->row(r), want.data(), want.size())) << "layer " << layer.pack_layer->id << " row " << r;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, PackRoundTrip,
                         ::testing::Values(RowDtype::kF32, RowDtype::kBf16, RowDtype::kF16,
                                           RowDtype::kFp8E4m3Ue8m0x32),
                         [](const auto& info) { return std::string(RowDtypeName(info.param)); });

TEST(PackTest, ManifestSurvivesJsonRoundTrip) {
  TempDir dir;
  const PackManifest m = CreateSmallPack(dir.path(), RowDtype::kBf16, 32);
  auto again = ParseManifestJson(ManifestToJson(m), dir.path(), "test", false);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(ManifestToJson(*again), ManifestToJson(m));
}

TEST(PackTest, CorruptRowFileIsRefused) {
  TempDir dir;
  CreateSmallPack(dir.path(), RowDtype::kBf16, 64);
  {
    std::fstream f(dir / "layer-7.rows", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('\x5a');
  }
  auto report = VerifyPack(dir.path(), 0);
  ASSERT_TRUE(report.ok());
  ASSERT_EQ(report->problems.size(), 2u);  // the file's xxh3_64, and the block that holds byte 1000
  EXPECT_NE(report->problems[0].find("layer 7"), std::string::npos) << report->problems[0];
  EXPECT_NE(report->problems[1].find("layer 7: block 0 of "), std::string::npos) << report->problems[1];
  EXPECT_NE(report->problems[1].find("bytes 0..4095"), std::string::npos) << report->problems[1];
  auto table = Table::Open(dir.path(), TableOptions{});
  EXPECT_EQ(table.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(table.status().message().find("layer-7.rows is corrupt"), absl::string_view::npos) << table.status();
}

TEST(PackTest, TruncatedRowFileIsRefused) {
  TempDir dir;
  CreateSmallPack(dir.path(), RowDtype::kF16, 64);
  std::filesystem::resize_file(dir / "layer-3.rows", 1000);
  auto table = Table::Open(dir.path(), TableOptions{});
  EXPECT_EQ(table.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(table.status().message().find("has 1000 bytes"), absl::string_view::npos) << table.status();
  auto report = VerifyPack(dir.path(), 4);
  ASSERT_TRUE(report.ok());
  EXPECT_FALSE(report->problems.empty());
}

TEST(PackTest, ManifestErrorsNameTheField) {
  TempDir dir;
  const PackManifest m = CreateSmallPack(dir.path(), RowDtype::kBf16, 64);
  std::string json = ManifestToJson(m);
  auto expect_error = [&](const std::string& text, const std::string& needle) {
    auto parsed = ParseManifestJson(text, dir.path(), "manifest.json", false);
    ASSERT_FALSE(parsed.ok());
    EXPECT_NE(parsed.status().message().find(needle), absl::string_view::npos) << parsed.status();
  };
  expect_error("{", "not valid JSON");
  std::string bad_dtype = json;
  bad_dtype.replace(bad_dtype.find("\"bf16\""), 6, "\"bf17\"");
  expect_error(bad_dtype, "unknown row dtype 'bf17'");
  std::string renamed = json;
  renamed.replace(renamed.find("\"name\""), 6, "\"nom\"");
  expect_error(renamed, "unknown field 'nom'");  // a field no engramd knows is an error, not ignored
  std::string no_name = json;
  const std::string name_field = "\"name\": \"small\",";
  ASSERT_NE(no_name.find(name_field), std::string::npos) << no_name;
  no_name.erase(no_name.find(name_field), name_field.size());
  expect_error(no_name, "missing field 'name'");
  std::string bad_rows = json;
  const size_t at = bad_rows.find("\"head_rows\"");
  const size_t digit = bad_rows.find_first_of("0123456789", at);
  bad_rows.insert(digit, "9");
  expect_error(bad_rows, "differ from the engram-v1 derivation");
  expect_error(absl::StrCat("{\"format\": \"engram-pack/2\"}"), "expected 'engram-pack/1'");
}

TEST(PackTest, PresetSizesFollowTheirDefinition) {
  PackPresetOptions options;
  options.preset = "dsv41-flash";
  options.compress_lut = *ReadInt32File(ENGRAM_LUT_PATH);
  auto m = PresetManifest(options);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->row.bytes, 264);
  EXPECT_EQ(m->hash.heads_per_layer(), 24);
  EXPECT_EQ(m->layer_ids(), (std::vector<int>{1, 14}));
  // About 384M rows per layer, about 200 GB in all.
  EXPECT_NEAR(static_cast<double>(m->layers[0].layout.total_rows), 384e6, 1e6);
  EXPECT_NEAR(static_cast<double>(m->total_bytes()), 203e9, 2e9);
  options.preset = "demo-v1";
  options.scale = 0.01;
  auto demo = PresetManifest(options);
  ASSERT_TRUE(demo.ok());
  EXPECT_EQ(demo->layers[0].layout.head_rows[0], 6469);  // first prime above 6464 - 1
  options.preset = "nope";
  EXPECT_EQ(PresetManifest(options).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace engram
