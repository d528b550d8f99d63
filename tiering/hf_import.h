// Importing a Hugging Face checkpoint's Engram tables into a pack (DSV41.md): the Engram settings
// from config.json (under `text_config` or at the top level), the hash layout derived from them and
// checked against the checkpoint's tensors, and each layer's table streamed from its safetensors
// shard into the pack's row file. An FP8 table (`layers.L.engram.embed.weight` F8_E4M3 [rows, dim]
// and `.scale` F8_E8M0 [rows, dim/32]) becomes fp8_e4m3_ue8m0x32 rows (the dim value bytes, then the
// scale bytes); a BF16/F16/F32 [rows, dim] table becomes rows of that dtype. Memory stays constant
// whatever the size (fixed-size chunks, ranged reads); the manifest is written last, atomically, so
// an interrupted import leaves no pack engramd would take as complete. Not thread-safe (one import
// at a time per output directory).
#ifndef ENGRAM_TIERING_HF_IMPORT_H_
#define ENGRAM_TIERING_HF_IMPORT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"

namespace engram {

// One tensor of a safetensors file, as its (validated) header describes it.
struct SafetensorsTensor {
  std::string dtype;           // F32, F16, BF16, F8_E4M3, F8_E8M0, ...
  std::vector<int64_t> shape;
  uint64_t offset = 0;         // of its first byte in the file
  uint64_t bytes = 0;
};

// Reads and checks a safetensors header without reading any tensor data: every tensor's dtype is
// known, its byte size is dtype x shape, its range lies inside the file, and no two overlap.
// DataLoss naming the file and the tensor otherwise.
absl::StatusOr<std::map<std::string, SafetensorsTensor>> ReadSafetensorsHeader(const std::string& path);

// The Engram settings of a checkpoint's config.json.
struct HfEngramConfig {
  std::vector<int> layer_ids;
  std::vector<int64_t> num_embeddings;   // rows of each layer's table tensor
  int max_ngram = 0;
  std::vector<int64_t> vocab_per_ngram;  // engram_vocab_size: one number for every order, or a list
  int heads_per_ngram = 0;
  int head_dim = 0;
  int64_t pad_id = 0;
  int64_t compressed_vocab = 0;          // engram_compressed_vocab_size (0: not given)
  int64_t vocab_size = 0;                // the embedding's rows (0: not given)
  bool fp8 = false;                      // quantization_config says fp8
};
absl::StatusOr<HfEngramConfig> ReadHfEngramConfig(const std::string& config_json_path);

struct HfImportOptions {
  std::string checkpoint_dir;
  std::string out_dir;
  std::string name;            // empty: "engram"
  std::vector<int> layers;     // empty: every Engram layer
  bool force = false;          // allow a non-empty out_dir
  // The compression table built from the checkpoint's tokenizer.json (engramctl builds it).
  std::vector<int32_t> compress_lut;
  std::function<void(const std::string&)> log;                 // one line per event
  std::function<void(uint64_t done, uint64_t all)> progress;   // bytes written so far
};

// The layout the config gives (derived hash layout per layer, rows, bytes) and the checks against
// the checkpoint's tensors (when `check_tensors`), as lines to print; an error when a check fails.
absl::StatusOr<std::vector<std::string>> DescribeHfLayout(const std::string& checkpoint_dir, bool check_tensors);

// Imports; returns the manifest written.
absl::StatusOr<PackManifest> ImportHfCheckpoint(const HfImportOptions& options);

}  // namespace engram

#endif  // ENGRAM_TIERING_HF_IMPORT_H_
