// Helpers shared by the tests: temporary directories, small synthetic packs, test data paths.
#ifndef ENGRAM_TESTS_TEST_UTIL_H_
#define ENGRAM_TESTS_TEST_UTIL_H_

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tiering/layout/manifest.h"
#include "tiering/pack_writer.h"

namespace engram::testing {

inline std::string TestDataPath(const std::string& file) { return std::string(ENGRAM_TEST_DATA_DIR) + "/" + file; }

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
