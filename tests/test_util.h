// Helpers shared by the tests: temporary directories, small synthetic packs, test data paths.
#ifndef ENGRAM_TESTS_TEST_UTIL_H_
#define ENGRAM_TESTS_TEST_UTIL_H_

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/synthetic.h"
#include "tiering/pack_writer.h"

namespace engram::testing {

inline std::string TestDataPath(const std::string& file) { return std::string(ENGRAM_TEST_DATA_DIR) + "/" + file; }

// What a synthetic pack holds at head-local index `idx` of head `h` of `layer_id`: the formula's row.
inline std::vector<uint8_t> FormulaRow(const PackManifest& m, int layer_id, int h, uint32_t idx) {
  const auto& layout = m.FindLayer(layer_id)->layout;
  std::vector<float> scratch(m.row.dim);
  std::vector<uint8_t> row(m.row.bytes);
  SyntheticRow(*m.synthetic_seed, layer_id, layout.head_offset[h] + idx, m.row.dim, m.row.dtype, scratch.data(),
               row.data());
  return row;
}

// A fresh directory under $TMPDIR, removed when the object goes away.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "engram-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// A small synthetic pack: two layers (ids 3 and 7), orders 2..max_ngram, tiny prime heads, no lut.
// Writes an F32 safetensors file of the Engram module's tensors (the reference names) with
// random values: G branches, hidden size D, embedding width M.
inline void WriteRandomEngramWeights(const std::string& path, int G, int64_t D, int64_t M, uint32_t seed) {
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
  for (int g = 0; g < G; ++g) {
    const std::string i = std::to_string(g);
    tensors.push_back({"key_projs." + i + ".weight", {D, M}});
    tensors.push_back({"key_projs." + i + ".bias", {D}});
    tensors.push_back({"norm1." + i + ".weight", {D}});
    tensors.push_back({"norm2." + i + ".weight", {D}});
    tensors.push_back({"short_conv.norms." + i + ".weight", {D}});
  }
  tensors.push_back({"value_proj.weight", {D, M}});
  tensors.push_back({"value_proj.bias", {D}});
  tensors.push_back({"short_conv.conv.weight", {G * D, 1, 4}});
  std::string header = "{", data;
  uint64_t state = seed * 2654435761u + 1;
  for (const auto& [name, shape] : tensors) {
    size_t n = 1;
    std::string dims;
    for (int64_t d : shape) {
      n *= static_cast<size_t>(d);
      dims += (dims.empty() ? "" : ",") + std::to_string(d);
    }
    const size_t begin = data.size();
    for (size_t k = 0; k < n; ++k) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const float v = (static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f) * 0.2f +
                      (name.find("norm") != std::string::npos ? 1.0f : 0.0f);
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
    header += (header.size() > 1 ? "," : "") + std::string("\"") + name + "\":{\"dtype\":\"F32\",\"shape\":[" + dims +
              "],\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(data.size()) + "]}";
  }
  header += "}";
  std::ofstream o(path, std::ios::binary);
  const uint64_t len = header.size();
  o.write(reinterpret_cast<const char*>(&len), 8);
  o << header << data;
}

inline PackManifest SmallManifest(RowDtype dtype, int dim, int64_t vocab = 97, int max_ngram = 3, int heads = 2) {
  PackManifest m;
  m.name = "small";
  m.row = {dtype, dim, RowBytesFor(dtype, dim)};
  m.hash.max_ngram = max_ngram;
  m.hash.heads_per_ngram = heads;
  m.hash.seed = 5;
  m.hash.vocab_per_ngram.assign(max_ngram - 1, vocab);
  m.hash.pad_id = 2;
  m.hash.compressed_vocab = 1000;
  auto layouts = DeriveLayerLayouts(m.hash, std::vector<int>{3, 7});
  EXPECT_TRUE(layouts.ok()) << layouts.status();
  for (auto& layout : *layouts) {
    PackLayer layer;
    layer.id = layout.layer_id;
    layer.file = "layer-" + std::to_string(layer.id) + ".rows";
    layer.layout = layout;
    m.layers.push_back(layer);
  }
  m.synthetic_seed = 99;
  return m;
}

inline PackManifest CreateSmallPack(const std::string& dir, RowDtype dtype, int dim, int64_t vocab = 97) {
  PackWriteOptions options;
  options.out_dir = dir;
  options.force = true;
  auto written = CreateSyntheticPack(SmallManifest(dtype, dim, vocab), options);
  EXPECT_TRUE(written.ok()) << written.status();
  return *written;
}

}  // namespace engram::testing

#endif  // ENGRAM_TESTS_TEST_UTIL_H_
