// DeepSeek-V4.1's Engram module on the CPU twin, as a user of EngramLayer sees it: a dead position
// leaves its streams untouched; bf16 streams are the f32 update rounded once; the update may run in
// place; block-quantized weights take each element's scale from its 32x32 block (ragged edges
// too); LoadDsv41Weights reads a checkpoint in the released layout by tensor name and refuses a
// checkpoint whose shapes, dtypes or config disagree, naming what is wrong. The equations
// themselves are checked against PyTorch in tests/crosscheck/dsv41_module_test.py.
#include <cmath>
#include <fstream>
#include <random>

#include "engram/engram_layer.h"
#include "engram/kernels/cpu_twin.h"
#include "engram/safetensors.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace engram {
namespace {

using kernels::Dsv41Weights;

std::vector<float> Normal(size_t n, uint32_t seed, float scale = 1.0f, float mean = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = mean + scale * d(rng);
  return v;
}

Dsv41Weights RandomDsv41(int K, int D, int M, uint32_t seed) {
  Dsv41Weights w;
  w.streams = K;
  w.hidden = D;
  w.embed = M;
  w.eps = 1e-20f;
  w.wkv = Normal(static_cast<size_t>((K + 1) * D * M), seed, 1.0f / std::sqrt(static_cast<float>(M)));
  w.q_weight = Normal(static_cast<size_t>(K * D), seed + 1, 0.1f, 1.0f);
  w.k_weight = Normal(static_cast<size_t>(K * D), seed + 2, 0.1f, 1.0f);
  return w;
}

TEST(Dsv41ModuleTest, DeadPositionsLeaveTheirStreamsUntouched) {
  const int K = 4, D = 48, M = 64;
  const int64_t T = 6;
  const Dsv41Weights w = RandomDsv41(K, D, M, 3);
  const auto E = Normal(static_cast<size_t>(T * M), 4);
  const auto H = Normal(static_cast<size_t>(T * K * D), 5);
  const std::vector<uint8_t> dead = {1, 0, 0, 1, 0, 1};  // start, middle, end
  std::vector<float> out(H.size());
  ASSERT_TRUE(kernels::Dsv41ForwardCpu(w, T, E, dead, H, absl::MakeSpan(out), 2).ok());
  const size_t per_token = static_cast<size_t>(K * D);
  for (int64_t t = 0; t < T; ++t) {
    const bool same = std::memcmp(&H[t * per_token], &out[t * per_token], per_token * 4) == 0;
    EXPECT_EQ(same, dead[t] == 1) << "token " << t;
  }
  // Every stream of a live token moves by its own gate times the one shared value: the update
  // divided by the value is constant within a stream and differs between streams.
  std::vector<float> kv(static_cast<size_t>((K + 1) * D));
  for (int c = 0; c < (K + 1) * D; ++c) {
    double acc = 0;
    for (int m = 0; m < M; ++m) acc += double{w.wkv[static_cast<size_t>(c) * M + m]} * E[1 * M + m];
    kv[c] = static_cast<float>(acc);
  }
  std::vector<float> gates;
  for (int k = 0; k < K; ++k) {
    const int d = 7;
    const float g = (out[per_token + k * D + d] - H[per_token + k * D + d]) / kv[K * D + d];
    EXPECT_GT(g, 0.0f);
    EXPECT_LT(g, 1.0f);
    for (int d2 : {0, 20, D - 1}) {
      EXPECT_NEAR(out[per_token + k * D + d2], H[per_token + k * D + d2] + g * kv[K * D + d2], 1e-4);
    }
    gates.push_back(g);
  }
  EXPECT_NE(gates[0], gates[1]);
}

TEST(Dsv41ModuleTest, Bf16StreamsAreTheF32UpdateRoundedOnceAndInPlaceIsTheSame) {
  const int K = 3, D = 40, M = 32;
  const int64_t T = 5;
  const Dsv41Weights w = RandomDsv41(K, D, M, 7);
  const auto E = Normal(static_cast<size_t>(T * M), 8);
  const auto H = Normal(static_cast<size_t>(T * K * D), 9, 4.0f);
  const std::vector<uint8_t> dead = {0, 1, 0, 0, 0};
  std::vector<uint16_t> hb(H.size());
  std::vector<float> hf(H.size());
  for (size_t i = 0; i < H.size(); ++i) {
    hb[i] = FloatToBf16(H[i]);
    hf[i] = Bf16ToFloat(hb[i]);
  }
  std::vector<float> yf(H.size());
  std::vector<uint16_t> yb(H.size());
  ASSERT_TRUE(kernels::Dsv41ForwardCpu(w, T, E, dead, hf, absl::MakeSpan(yf), 1).ok());
  ASSERT_TRUE(kernels::Dsv41ForwardCpu(w, T, E, dead, hb, absl::MakeSpan(yb), 2).ok());
  int moved = 0;
  for (size_t i = 0; i < H.size(); ++i) {
    ASSERT_EQ(yb[i], FloatToBf16(yf[i])) << i;
    moved += yb[i] != hb[i];
  }
  EXPECT_GT(moved, static_cast<int>(H.size() / 2));
  // In place (out = hidden), as an engine updates its residual streams.
  std::vector<float> in_place = hf;
  ASSERT_TRUE(kernels::Dsv41ForwardCpu(w, T, E, dead, in_place, absl::MakeSpan(in_place), 2).ok());
  EXPECT_EQ(0, std::memcmp(in_place.data(), yf.data(), yf.size() * 4));
}

TEST(Dsv41ModuleTest, BlockQuantizedWeightsUseTheirBlocksScaleAtRaggedEdges) {
  const int64_t rows = 70, cols = 40;  // blocks of 32: 3 x 2, the last ones partial
  std::vector<uint8_t> values(rows * cols), scales(3 * 2);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<uint8_t>((i * 37) % 0x7e);  // no NaN
  for (size_t i = 0; i < scales.size(); ++i) scales[i] = static_cast<uint8_t>(120 + i);
  std::vector<float> out(values.size());
  kernels::DequantizeBlockFp8(values.data(), scales.data(), rows, cols, out.data(), 2);
  for (int64_t r : {0L, 31L, 32L, 63L, 64L, 69L}) {
    for (int64_t c : {0L, 31L, 32L, 39L}) {
      const int scale_exponent = scales[(r / 32) * 2 + c / 32] - 127;
      EXPECT_EQ(out[r * cols + c], std::ldexp(E4m3ToFloat(values[r * cols + c]), scale_exponent)) << r << "," << c;
    }
  }
}

TEST(Dsv41ModuleTest, BadWeightsAndShapesNameTheProblem) {
  Dsv41Weights w = RandomDsv41(2, 8, 16, 1);
  w.k_weight.pop_back();
  absl::Status s = w.Validate();
  EXPECT_NE(s.message().find("k_weight has 15 values; 16 expected"), std::string::npos) << s;
  w = RandomDsv41(2, 8, 16, 1);
  std::vector<float> E(3 * 16), H(3 * 2 * 8), Y(H.size());
  std::vector<uint8_t> dead(2);
  s = kernels::Dsv41ForwardCpu(w, 3, E, dead, H, absl::MakeSpan(Y));
  EXPECT_NE(s.message().find("dead-position mask has 2 values; 3 expected"), std::string::npos) << s;
  w.eps = -1.0f;
  EXPECT_NE(w.Validate().message().find("rms_norm_eps"), std::string::npos);
}

// ---- a checkpoint in the released layout ------------------------------------------------------

struct StTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

void WriteShard(const std::string& path, const std::vector<StTensor>& tensors,
                const std::string& header_override = "") {
  nlohmann::json header = {{"__metadata__", {{"format", "pt"}}}};
  std::string data;
  for (const auto& t : tensors) {
    header[t.name] = {
        {"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + t.bytes.size()}}};
    data += t.bytes;
  }
  const std::string text = header_override.empty() ? header.dump() : header_override;
  std::ofstream o(path, std::ios::binary);
  const uint64_t len = text.size();
  o.write(reinterpret_cast<const char*>(&len), 8);
  o << text << data;
}

std::string RandomBytes(size_t n, uint32_t seed, int lo, int hi) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(d(rng));
  return s;
}

std::string Bf16Bytes(const std::vector<float>& v) {
  std::string s;
  for (float x : v) {
    const uint16_t b = FloatToBf16(x);
    s.push_back(static_cast<char>(b & 0xff));
    s.push_back(static_cast<char>(b >> 8));
  }
  return s;
}

class Dsv41CheckpointTest : public ::testing::Test {
 protected:
  static constexpr int kK = 2, kD = 40, kM = 64, kLayer = 3;
  void Write(int64_t wkv_rows = (kK + 1) * kD, const std::string& wkv_dtype = "F8_E4M3", bool with_eps = true) {
    nlohmann::json text = {{"hc_mult", kK}, {"hidden_size", kD}};
    if (with_eps) text["rms_norm_eps"] = 1e-20;
    std::ofstream(dir_ / "config.json") << nlohmann::json{{"text_config", text}}.dump();
    const std::string p = "layers." + std::to_string(kLayer) + ".engram.";
    wkv_ = RandomBytes(static_cast<size_t>(wkv_rows * kM), 1, 0, 0x7e);
    scale_ = RandomBytes(static_cast<size_t>(((wkv_rows + 31) / 32) * 2), 2, 118, 130);
    q_ = Normal(kK * kD, 3, 0.1f, 1.0f);
    k_ = Normal(kK * kD, 4, 0.1f, 1.0f);
    WriteShard(dir_ / "model-00001-of-00002.safetensors",
               {{p + "wkv.weight", wkv_dtype, {wkv_rows, kM}, wkv_},
                {p + "wkv.scale", "F8_E8M0", {(wkv_rows + 31) / 32, 2}, scale_}});
    WriteShard(dir_ / "model-00002-of-00002.safetensors",
               {{"layers.3.attn.wq.weight", "BF16", {2, 2}, std::string(8, '\1')},
                {p + "q_weight", "BF16", {kK, kD}, Bf16Bytes(q_)},
                {p + "k_weight", "BF16", {kK, kD}, Bf16Bytes(k_)}});
    nlohmann::json map = {{p + "wkv.weight", "model-00001-of-00002.safetensors"},
                          {p + "wkv.scale", "model-00001-of-00002.safetensors"},
                          {p + "q_weight", "model-00002-of-00002.safetensors"},
                          {p + "k_weight", "model-00002-of-00002.safetensors"}};
    std::ofstream(dir_ / "model.safetensors.index.json") << nlohmann::json{{"weight_map", map}}.dump();
  }
  testing::TempDir dir_;
  std::string wkv_, scale_;
  std::vector<float> q_, k_;
};

TEST_F(Dsv41CheckpointTest, LoadsTheReleasedNamesFromTheirShards) {
  Write();
  auto w = LoadDsv41Weights(dir_.path(), kLayer, kM);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(w->streams, kK);
  EXPECT_EQ(w->hidden, kD);
  EXPECT_EQ(w->embed, kM);
  EXPECT_EQ(w->eps, 1e-20f);
  // Element (r, c) of wkv: its E4M3 byte times its 32x32 block's scale; q/k are the BF16 values.
  for (int64_t r : {0L, 33L, (kK + 1) * kD - 1L}) {
    for (int64_t c : {0L, 40L, kM - 1L}) {
      const float want = std::ldexp(E4m3ToFloat(static_cast<uint8_t>(wkv_[r * kM + c])),
                                    static_cast<uint8_t>(scale_[(r / 32) * 2 + c / 32]) - 127);
      EXPECT_EQ(w->wkv[r * kM + c], want) << r << "," << c;
    }
  }
  EXPECT_EQ(w->q_weight[5], Bf16ToFloat(FloatToBf16(q_[5])));
  EXPECT_EQ(w->k_weight[kK * kD - 1], Bf16ToFloat(FloatToBf16(k_[kK * kD - 1])));
}

TEST_F(Dsv41CheckpointTest, RefusesCheckpointsThatDisagreeNamingWhat) {
  Write();
  auto other_layer = LoadDsv41Weights(dir_.path(), 4);
  EXPECT_EQ(other_layer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(other_layer.status().message().find("layers.4.engram.wkv.weight"), std::string::npos)
      << other_layer.status();
  auto wrong_width = LoadDsv41Weights(dir_.path(), kLayer, 96);
  EXPECT_NE(wrong_width.status().message().find("has shape [120, 64]; [(hc_mult + 1) x hidden_size = 120, 96]"),
            std::string::npos)
      << wrong_width.status();

  Write((kK + 1) * kD + 1);
  auto rows = LoadDsv41Weights(dir_.path(), kLayer);
  EXPECT_NE(rows.status().message().find("hc_mult 2, hidden_size 40"), std::string::npos) << rows.status();

  Write((kK + 1) * kD, "BF16");  // the right byte count for half the columns would not pass the header
  auto dtype = LoadDsv41Weights(dir_.path(), kLayer);
  EXPECT_FALSE(dtype.ok());

  Write((kK + 1) * kD, "F8_E4M3", /*with_eps=*/false);
  auto eps = LoadDsv41Weights(dir_.path(), kLayer);
  EXPECT_NE(eps.status().message().find("rms_norm_eps must be a number"), std::string::npos) << eps.status();
}

TEST(SafetensorsRangesTest, ReadsRawFp8AndRefusesOverlapsAndUnknownDtypes) {
  testing::TempDir dir;
  WriteShard(dir / "a.safetensors", {{"w", "F8_E4M3", {2, 3}, "abcdef"}, {"s", "F8_E8M0", {1, 1}, "\x7f"}});
  auto file = SafetensorsFile::Open(dir / "a.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto w = file->ReadRaw("w", "F8_E4M3", {2, 3});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(std::string(w->bytes.begin(), w->bytes.end()), "abcdef");
  EXPECT_EQ(file->ReadRaw("s", "F8_E4M3").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file->Read("w").status().message().find("only F32, F16 and BF16 read as numbers"), std::string::npos);

  WriteShard(dir / "overlap.safetensors", {}, R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                               "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})");
  { std::ofstream(dir / "overlap.safetensors", std::ios::app) << "123456"; }
  auto overlap = SafetensorsFile::Open(dir / "overlap.safetensors");
  EXPECT_EQ(overlap.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(overlap.status().message().find("tensors 'a' and 'b' overlap"), std::string::npos) << overlap.status();

  WriteShard(dir / "odd.safetensors", {}, R"({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}})");
  { std::ofstream(dir / "odd.safetensors", std::ios::app) << "1234"; }
  auto odd = SafetensorsFile::Open(dir / "odd.safetensors");
  EXPECT_NE(odd.status().message().find("dtype 'Q4' is not a safetensors dtype"), std::string::npos) << odd.status();
}

TEST(Dsv41LayerTest, RefusesMismatchedWeightsAndBf16ForTheDemo) {
  HashConfig config;
  config.max_ngram = 3;
  config.heads_per_ngram = 2;
  config.vocab_per_ngram = {101, 103};
  config.compressed_vocab = 100;
  config.dead_token_id = -1;
  auto layouts = DeriveLayerLayouts(config, {4});
  ASSERT_TRUE(layouts.ok());
  auto hasher = NgramHasher::Create(config, *layouts);
  ASSERT_TRUE(hasher.ok());
  RowSource source;
  source.hasher = hasher->get();
  source.dtype = RowDtype::kF32;
  source.row_dim = 8;  // 4 heads x 8 = 32
  std::vector<float> table_row(8, 0.5f);
  source.lookup = [&](int, uint32_t, absl::Span<const uint32_t>, absl::Span<uint8_t> rows) {
    for (size_t i = 0; i < rows.size(); i += 32) std::memcpy(rows.data() + i, table_row.data(), 32);
    return absl::OkStatus();
  };
  auto wide = EngramLayer::Create(source, 4, RandomDsv41(2, 16, 48, 1));
  EXPECT_NE(wide.status().message().find("4 heads x 8 = 32"), std::string::npos) << wide.status();
  auto layer = EngramLayer::Create(source, 4, RandomDsv41(2, 16, 32, 1), {EngramDevice::kCpu, 1});
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ((*layer)->variant(), EngramVariant::kDsv41);
  // Token -1 is the table's dead id: its streams come back unchanged, the others move.
  const std::vector<int32_t> ids = {5, -1, 7};
  const auto H = Normal(3 * 2 * 16, 2);
  std::vector<float> out(H.size());
  ASSERT_TRUE((*layer)->Forward(ids, 1, 3, H, absl::MakeSpan(out)).ok());
  EXPECT_EQ(0, std::memcmp(&H[32], &out[32], 32 * 4));
  EXPECT_NE(0, std::memcmp(&H[0], &out[0], 32 * 4));
  EXPECT_NE(0, std::memcmp(&H[64], &out[64], 32 * 4));

  testing::TempDir dir;
  testing::WriteRandomEngramWeights(dir / "w.safetensors", 2, 16, 32, 1);
  auto demo = EngramLayer::Create(source, 4, *LoadEngramWeights(dir / "w.safetensors"), {EngramDevice::kCpu, 1});
  ASSERT_TRUE(demo.ok()) << demo.status();
  std::vector<uint16_t> hb(3 * 2 * 16), ob(hb.size());
  EXPECT_NE(
      (*demo)->ForwardHost({5, 6, 7}, 1, 3, hb, absl::MakeSpan(ob)).message().find("bf16 streams are for the dsv41"),
      std::string::npos);
}

}  // namespace
}  // namespace engram
