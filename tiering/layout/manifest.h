// The table pack manifest (DESIGN.md "Data model"): parse, validate, derive, write.
//
// A pack is a directory with manifest.json and one raw row file per layer. PackManifest is plain
// data; LoadPackManifest reads and fully validates one (sizes, derived constants, lut), so anything
// holding a PackManifest may trust it. No I/O beyond small files here (no row data).
#ifndef ENGRAM_TIERING_LAYOUT_MANIFEST_H_
#define ENGRAM_TIERING_LAYOUT_MANIFEST_H_

#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "engram/kernels/row_dtype.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

inline constexpr absl::string_view kPackFormat = "engram-pack/1";
inline constexpr absl::string_view kManifestFile = "manifest.json";

struct RowFormat {
  RowDtype dtype = RowDtype::kBf16;
  int dim = 64;
  int64_t bytes = 128;
};

struct PackLayer {
  int id = 0;
  std::string file;          // relative to the pack directory
  std::string xxh3_64;       // hex; empty while the pack is being written
  // The file of per-4096-byte-block xxh3_64 values beside `file` (tiering/block_checksums.h) and
  // that file's own xxh3_64; both empty for a pack written before block checksums.
  std::string block_checksums_file;
  std::string block_checksums_xxh3_64;
  LayerHashLayout layout;    // head_rows, multipliers, offsets
};

struct PackManifest {
  std::string name;
  RowFormat row;
  std::string hash_kind = "engram-v1";  // or "explicit"
  HashConfig hash;                      // compress_lut holds the loaded table, if any
  std::string compress_lut_file;        // relative to the pack; empty when none
  std::vector<PackLayer> layers;
  std::optional<uint64_t> synthetic_seed;
  // The Engram module the table's rows feed: "demo" (the reference demo; also when absent) or
  // "dsv41" (DeepSeek-V4.1: set by `pack import` of a V4.1 checkpoint). Tells engramctl forward
  // and clients which module to run; the daemon itself serves rows either way.
  std::string module = "demo";

  std::vector<int> layer_ids() const;
  uint64_t total_bytes() const;
  const PackLayer* FindLayer(int id) const;
};

absl::StatusOr<RowDtype> ParseRowDtype(absl::string_view name);
absl::string_view RowDtypeName(RowDtype dtype);

// Reads a manifest-shaped JSON document. With `derive`, head_rows/multipliers/file are computed
// (engram-v1) rather than read: that is the `--layout` input of `engramctl pack create`.
// `base_dir` resolves the compress lut path. Every error names the field and the file.
absl::StatusOr<PackManifest> ParseManifestJson(absl::string_view json_text, absl::string_view base_dir,
                                               absl::string_view source_name, bool derive);

// Loads DIR/manifest.json, validating it against the derivation and the lut.
absl::StatusOr<PackManifest> LoadPackManifest(absl::string_view pack_dir);

// Serializes to the manifest.json form (derived fields included).
std::string ManifestToJson(const PackManifest& manifest);

// Reads a little-endian int32 file (a compress lut or a token trace).
absl::StatusOr<std::vector<int32_t>> ReadInt32File(absl::string_view path);

}  // namespace engram

#endif  // ENGRAM_TIERING_LAYOUT_MANIFEST_H_
