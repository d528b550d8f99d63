// The CPU twin and EngramLayer as a user sees them: gathered and dequantized rows equal each
// row decoded alone (duplicates and the first and last rows included); the module is causal in
// time (a later token never changes an earlier output, so decode with T=1 equals the first step
// of prefill); bad weights, shapes and safetensors files are refused naming what is wrong.
#include <cmath>
#include <fstream>
#include <random>

#include "engram/engram_layer.h"
#include "engram/kernels/cpu_twin.h"
#include "engram/kernels/gather_host.h"
#include "engram/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace engram {
namespace {

using kernels::EngramWeights;
using kernels::ForwardShape;

EngramWeights RandomWeights(int G, int D, int M, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto fill = [&](std::vector<float>* v, size_t count, float scale, float mean) {
    v->resize(count);
    for (float& x : *v) x = mean + scale * n(rng);
  };
  EngramWeights w;
  w.branches = G;
  w.hidden = D;
  w.embed = M;
  fill(&w.projection, static_cast<size_t>((G + 1) * D * M), 1.0f / std::sqrt(static_cast<float>(M)), 0.0f);
  fill(&w.projection_bias, static_cast<size_t>((G + 1) * D), 0.1f, 0.0f);
  fill(&w.key_norm, static_cast<size_t>(G * D), 0.1f, 1.0f);
  fill(&w.query_norm, static_cast<size_t>(G * D), 0.1f, 1.0f);
  fill(&w.conv_norm, static_cast<size_t>(G * D), 0.1f, 1.0f);
  fill(&w.conv_taps, static_cast<size_t>(G * D * kernels::kShortConvTaps), 0.5f, 0.0f);
  return w;
}

std::vector<float> RandomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

TEST(CpuTwinTest, GatherAndDequantizeDuplicateAndBoundaryRows) {
  for (RowDtype dtype : {RowDtype::kF32, RowDtype::kBf16, RowDtype::kF16, RowDtype::kFp8E4m3Ue8m0x32}) {
    const int dim = 64;
    const int64_t row_bytes = RowBytesFor(dtype, dim);
    const uint64_t rows_in_table = 50;
    std::vector<uint8_t> table(rows_in_table * row_bytes);
    for (uint64_t r = 0; r < rows_in_table; ++r) {
      const auto values = RandomVector(dim, static_cast<uint32_t>(r));
      EncodeRow(values.data(), dim, dtype, table.data() + r * row_bytes);
    }
    const std::vector<uint64_t> picks = {0, rows_in_table - 1, 7, 7, 0, 23, rows_in_table - 1, 7};
    std::vector<uint8_t> gathered(picks.size() * row_bytes);
    kernels::GatherRowsHost(
        table.data(), static_cast<uint64_t>(row_bytes), picks.size(), [&](size_t i) { return picks[i]; },
        [&](size_t i) { return gathered.data() + i * row_bytes; });
    std::vector<float> all(picks.size() * dim);
    kernels::DequantizeRows(gathered.data(), static_cast<int64_t>(picks.size()), dim, dtype, all.data(), 3);
    for (size_t i = 0; i < picks.size(); ++i) {
      std::vector<float> one(dim);
      DecodeRow(table.data() + picks[i] * row_bytes, dim, dtype, one.data());
      ASSERT_EQ(0, std::memcmp(one.data(), all.data() + i * dim, dim * 4)) << "dtype " << int(dtype) << " pick " << i;
    }
  }
}

TEST(CpuTwinTest, OutputIsCausalInTimeSoDecodeMatchesPrefill) {
  const int B = 2, T = 11, G = 3, D = 40, M = 48, dilation = 3;
  const EngramWeights w = RandomWeights(G, D, M, 5);
  const auto E = RandomVector(static_cast<size_t>(B * T * M), 6);
  auto H = RandomVector(static_cast<size_t>(B * T * G * D), 7);
  std::vector<float> y(H.size()), y2(H.size());
  ASSERT_TRUE(kernels::EngramForwardCpu(w, {B, T, dilation}, E, H, absl::MakeSpan(y), 2).ok());
  // Change everything at t >= 6 in batch 1: outputs before t = 6 stay, bit for bit.
  auto E2 = E;
  for (int t = 6; t < T; ++t) {
    for (int m = 0; m < M; ++m) E2[static_cast<size_t>((1 * T + t) * M + m)] += 1.0f;
    for (int i = 0; i < G * D; ++i) H[static_cast<size_t>((1 * T + t) * G * D + i)] -= 2.0f;
  }
  ASSERT_TRUE(kernels::EngramForwardCpu(w, {B, T, dilation}, E2, H, absl::MakeSpan(y2), 2).ok());
  const size_t per_t = static_cast<size_t>(G * D);
  for (int t = 0; t < T; ++t) {
    const bool changed = std::memcmp(&y[(1 * T + t) * per_t], &y2[(1 * T + t) * per_t], per_t * 4) != 0;
    EXPECT_EQ(changed, t >= 6) << "t=" << t;
    EXPECT_EQ(0, std::memcmp(&y[t * per_t], &y2[t * per_t], per_t * 4)) << "batch 0 changed at t=" << t;
  }
  // Decode (T=1) on the first token of batch 0 is the first prefill step.
  std::vector<float> one(per_t);
  ASSERT_TRUE(kernels::EngramForwardCpu(w, {1, 1, dilation}, absl::MakeSpan(E).subspan(0, M),
                                        absl::MakeSpan(H).subspan(0, per_t), absl::MakeSpan(one), 1)
                  .ok());
  for (size_t i = 0; i < per_t; ++i) EXPECT_NEAR(one[i], y[i], 1e-6) << i;
}

TEST(CpuTwinTest, ThreadCountDoesNotChangeTheResult) {
  const int B = 3, T = 7, G = 2, D = 32, M = 64;
  const EngramWeights w = RandomWeights(G, D, M, 9);
  const auto E = RandomVector(static_cast<size_t>(B * T * M), 10);
  const auto H = RandomVector(static_cast<size_t>(B * T * G * D), 11);
  std::vector<float> y1(H.size()), y3(H.size());
  ASSERT_TRUE(kernels::EngramForwardCpu(w, {B, T, 2}, E, H, absl::MakeSpan(y1), 1).ok());
  ASSERT_TRUE(kernels::EngramForwardCpu(w, {B, T, 2}, E, H, absl::MakeSpan(y3), 3).ok());
  for (size_t i = 0; i < y1.size(); ++i) ASSERT_NEAR(y1[i], y3[i], 1e-5) << i;
}

TEST(CpuTwinTest, BadWeightsAndShapesNameTheProblem) {
  EngramWeights w = RandomWeights(2, 8, 16, 1);
  w.conv_taps.pop_back();
  absl::Status s = w.Validate();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("conv_taps has 63 values; 64 expected"), std::string::npos) << s;
  w = RandomWeights(2, 8, 16, 1);
  std::vector<float> E(2 * 16), H(2 * 2 * 8), Y(2 * 2 * 8);
  s = kernels::EngramForwardCpu(w, {1, 3, 1}, E, H, absl::MakeSpan(Y));
  EXPECT_NE(s.message().find("embeddings has 32 values; 48 expected"), std::string::npos) << s;
  s = kernels::EngramForwardCpu(w, {1, 2, 0}, E, H, absl::MakeSpan(Y));
  EXPECT_NE(s.message().find("dilation=0"), std::string::npos) << s;
}

// A small safetensors writer for the tests (F32 only, or raw bytes for broken files).
void WriteSafetensors(const std::string& path, const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                      uint32_t seed, const std::string& header_override = "") {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const auto& [name, shape] : tensors) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    const auto values = RandomVector(n, seed++);
    header[name] = {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + n * 4}}};
    data.append(reinterpret_cast<const char*>(values.data()), n * 4);
  }
  const std::string text = header_override.empty() ? header.dump() : header_override;
  std::ofstream o(path, std::ios::binary);
  const uint64_t len = text.size();
  o.write(reinterpret_cast<const char*>(&len), 8);
  o << text << data;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> ModuleTensors(int G, int64_t D, int64_t M) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> t;
  for (int g = 0; g < G; ++g) {
    t.push_back({"key_projs." + std::to_string(g) + ".weight", {D, M}});
    t.push_back({"key_projs." + std::to_string(g) + ".bias", {D}});
    t.push_back({"norm1." + std::to_string(g) + ".weight", {D}});
    t.push_back({"norm2." + std::to_string(g) + ".weight", {D}});
    t.push_back({"short_conv.norms." + std::to_string(g) + ".weight", {D}});
  }
  t.push_back({"value_proj.weight", {D, M}});
  t.push_back({"value_proj.bias", {D}});
  t.push_back({"short_conv.conv.weight", {G * D, 1, 4}});
  return t;
}

TEST(SafetensorsTest, LoadsTheReferenceNamesAndRefusesBadFiles) {
  testing::TempDir dir;
  const std::string good = dir.path() + "/w.safetensors";
  WriteSafetensors(good, ModuleTensors(3, 8, 12), 1);
  auto w = LoadEngramWeights(good);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->branches, 3);
  EXPECT_EQ(w->hidden, 8);
  EXPECT_EQ(w->embed, 12);
  EXPECT_TRUE(w->Validate().ok());
  // The value projection follows the key projections in the fused matrix.
  auto file = SafetensorsFile::Open(good);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->Read("value_proj.weight")->values[0], w->projection[3 * 8 * 12]);

  auto missing = ModuleTensors(2, 8, 12);
  missing.pop_back();
  WriteSafetensors(dir.path() + "/missing.safetensors", missing, 1);
  auto m = LoadEngramWeights(dir.path() + "/missing.safetensors");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("short_conv.conv.weight"), std::string::npos) << m.status();

  auto wrong = ModuleTensors(2, 8, 12);
  wrong[2].second = {9};  // norm1.0.weight
  WriteSafetensors(dir.path() + "/wrong.safetensors", wrong, 1);
  auto bad_shape = LoadEngramWeights(dir.path() + "/wrong.safetensors");
  EXPECT_EQ(bad_shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_shape.status().message().find("'norm1.0.weight' has shape [9]; [8] expected"), std::string::npos)
      << bad_shape.status();

  WriteSafetensors(dir.path() + "/past.safetensors", {{"a", {4}}}, 1,
                   R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4000]}})");
  auto past = SafetensorsFile::Open(dir.path() + "/past.safetensors");
  EXPECT_EQ(past.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(past.status().message().find("tensor 'a'"), std::string::npos) << past.status();

  WriteSafetensors(dir.path() + "/size.safetensors", {{"a", {4}}}, 1,
                   R"({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}})");
  auto size = SafetensorsFile::Open(dir.path() + "/size.safetensors");
  EXPECT_NE(size.status().message().find("needs 20 bytes"), std::string::npos) << size.status();

  {
    std::ofstream o(dir.path() + "/short.safetensors", std::ios::binary);
    const uint64_t len = 1 << 20;
    o.write(reinterpret_cast<const char*>(&len), 8);
    o << "{}";
  }
  EXPECT_EQ(SafetensorsFile::Open(dir.path() + "/short.safetensors").status().code(), absl::StatusCode::kDataLoss);
}

TEST(EngramLayerTest, RefusesWeightsThatDoNotFitTheTable) {
  HashConfig config;
  config.max_ngram = 3;
  config.heads_per_ngram = 2;
  config.vocab_per_ngram = {101, 103};
  config.compressed_vocab = 100;
  auto layouts = DeriveLayerLayouts(config, {4});
  ASSERT_TRUE(layouts.ok());
  auto hasher = NgramHasher::Create(config, *layouts);
  ASSERT_TRUE(hasher.ok());
  RowSource source;
  source.hasher = hasher->get();
  source.dtype = RowDtype::kF32;
  source.row_dim = 8;  // 4 heads x 8 = 32
  source.lookup = [](int, uint32_t, absl::Span<const uint32_t>, absl::Span<uint8_t>) { return absl::OkStatus(); };
  auto layer = EngramLayer::Create(source, 4, RandomWeights(2, 16, 24, 1));
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(layer.status().message().find("4 heads x 8 = 32"), std::string::npos) << layer.status();
  EXPECT_EQ(EngramLayer::Create(source, 5, RandomWeights(2, 16, 32, 1)).status().code(), absl::StatusCode::kNotFound);
  auto ok = EngramLayer::Create(source, 4, RandomWeights(2, 16, 32, 1), {EngramDevice::kCpu, 1});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->device(), EngramDevice::kCpu);
  // Shapes that do not match the token ids or hidden states.
  std::vector<int32_t> ids(6, 5);
  std::vector<float> hidden(6 * 2 * 16), out(hidden.size());
  EXPECT_EQ((*ok)->Forward(ids, 2, 4, hidden, absl::MakeSpan(out)).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> small(5);
  absl::Status s = (*ok)->Forward(ids, 2, 3, small, absl::MakeSpan(out));
  EXPECT_NE(s.message().find("hidden states has 5 values"), std::string::npos) << s;
}

}  // namespace
}  // namespace engram
