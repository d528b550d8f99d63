// Writing and checking table packs on disk. CreateSyntheticPack streams each layer's rows (the
// synthetic formula, DESIGN.md) through a fixed-size buffer, so a pack of any size needs little
// memory; the manifest is written last and atomically, so a pack with a manifest is complete.
#ifndef ENGRAM_TIERING_PACK_WRITER_H_
#define ENGRAM_TIERING_PACK_WRITER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"

namespace engram {

struct PackPresetOptions {
  std::string preset;          // demo-v1 | dsv41-flash
  double scale = 1.0;          // multiplies every order's base table size
  std::optional<RowDtype> dtype;  // overrides the preset's dtype
  uint64_t seed = 1234;        // synthetic value seed
  std::vector<int32_t> compress_lut;  // the tokenizer's lut (both presets use one)
  std::string name;            // overrides the preset's name
};

// The manifest (derived fields filled, no checksums yet) for a preset.
absl::StatusOr<PackManifest> PresetManifest(const PackPresetOptions& options);
std::vector<std::string> PresetNames();

struct PackWriteOptions {
  std::string out_dir;
  bool force = false;  // allow writing into a non-empty directory
  int threads = 0;     // 0: hardware threads
  // Called after each chunk with (bytes written so far, bytes in all).
  std::function<void(uint64_t, uint64_t)> progress;
};

// Writes rows (synthetic_seed must be set), the lut (when the manifest has one) and manifest.json.
// Returns the manifest as written (with checksums).
absl::StatusOr<PackManifest> CreateSyntheticPack(PackManifest manifest, const PackWriteOptions& options);

struct PackVerifyReport {
  uint64_t bytes_checked = 0;
  uint64_t rows_sampled = 0;
  std::vector<std::string> problems;  // empty when the pack is sound
  std::vector<std::string> notes;     // worth saying, not wrong (no block checksums)
};

// Checks every layer file's size, xxh3_64 and block checksums (naming each failing block), and (for synthetic packs) `sample_rows` rows per
// layer against the formula. A non-OK status means the pack could not be read at all.
absl::StatusOr<PackVerifyReport> VerifyPack(const std::string& dir, uint64_t sample_rows);

// Writes block checksums (tiering/block_checksums.h) for every layer of the pack at `dir` that has
// none, after checking each row file against its xxh3_64, then rewrites the manifest atomically.
// Returns how many layers gained them. `progress` (optional) hears one line per layer.
absl::StatusOr<int> AddBlockChecksums(const std::string& dir, const std::function<void(const std::string&)>& progress);

// Writes all of `data` to `fd` (retrying short writes); errors name `path`.
absl::Status WriteAll(int fd, const uint8_t* data, size_t size, const std::string& path);
// Writes `contents` to path.tmp, fsyncs it and renames it over `path`.
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

// Hex xxh3_64 of a file, streamed.
absl::StatusOr<std::string> FileXxh3Hex(const std::string& path);

}  // namespace engram

#endif  // ENGRAM_TIERING_PACK_WRITER_H_
