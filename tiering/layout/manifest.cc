#include "tiering/layout/manifest.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace engram {
namespace {

using nlohmann::json;

std::string JoinPath(absl::string_view dir, absl::string_view file) {
  if (dir.empty()) return std::string(file);
  return absl::StrCat(dir, "/", file);
}

// Small accessor that turns JSON type and presence problems into messages naming the field.
class Reader {
 public:
  explicit Reader(absl::string_view source) : source_(source) {}

  template <typename T>
  absl::Status Get(const json& obj, const char* key, const std::string& path, T* out) const {
    if (!obj.is_object() || !obj.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat(source_, ": missing field '", path, key, "'"));
    }
    try {
      *out = obj.at(key).get<T>();
    } catch (const json::exception& e) {
      return absl::InvalidArgumentError(
          absl::StrCat(source_, ": field '", path, key, "' has the wrong type: ", e.what()));
    }
    return absl::OkStatus();
  }

  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", what));
  }

 private:
  std::string source_;
};

// Fields a manifest object may carry: anything else is a mistake (a typo, or a pack written by a
// newer engramd) that silently ignoring would turn into wrong rows.
absl::Status CheckKnownFields(const Reader& r, const json& obj, const std::string& path,
                              std::initializer_list<const char*> known) {
  if (!obj.is_object()) return absl::OkStatus();  // the typed reads report that
  for (const auto& [key, value] : obj.items()) {
    bool ok = false;
    for (const char* k : known) ok |= key == k;
    if (!ok) return r.Error(absl::StrCat("unknown field '", path, key, "'"));
  }
  return absl::OkStatus();
}

#define ENGRAM_RETURN_IF_ERROR(expr)      \
  do {                                    \
    if (absl::Status _s = (expr); !_s.ok()) return _s; \
  } while (0)

}  // namespace

absl::StatusOr<RowDtype> ParseRowDtype(absl::string_view name) {
  if (name == "f32") return RowDtype::kF32;
  if (name == "bf16") return RowDtype::kBf16;
  if (name == "f16") return RowDtype::kF16;
  if (name == "fp8_e4m3_ue8m0x32") return RowDtype::kFp8E4m3Ue8m0x32;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown row dtype '", name, "' (expected f32, bf16, f16 or fp8_e4m3_ue8m0x32)"));
}

absl::string_view RowDtypeName(RowDtype dtype) {
  switch (dtype) {
    case RowDtype::kF32: return "f32";
    case RowDtype::kBf16: return "bf16";
    case RowDtype::kF16: return "f16";
    case RowDtype::kFp8E4m3Ue8m0x32: return "fp8_e4m3_ue8m0x32";
  }
  return "?";
}

std::vector<int> PackManifest::layer_ids() const {
  std::vector<int> ids;
  for (const auto& l : layers) ids.push_back(l.id);
  return ids;
}

uint64_t PackManifest::total_bytes() const {
  uint64_t total = 0;
  for (const auto& l : layers) total += l.layout.total_rows * static_cast<uint64_t>(row.bytes);
  return total;
}

const PackLayer* PackManifest::FindLayer(int id) const {
  for (const auto& l : layers) {
    if (l.id == id) return &l;
  }
  return nullptr;
}

absl::StatusOr<std::vector<int32_t>> ReadInt32File(absl::string_view path) {
  std::ifstream in(std::string(path), std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const std::streamsize size = in.tellg();
  if (size % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " has ", size, " bytes, not a whole number of int32 values"));
  }
  std::vector<int32_t> values(static_cast<size_t>(size) / 4);
  in.seekg(0);
  if (!in.read(reinterpret_cast<char*>(values.data()), size)) {
    return absl::DataLossError(absl::StrCat("short read from ", path));
  }
  return values;
}

absl::StatusOr<PackManifest> ParseManifestJson(absl::string_view json_text, absl::string_view base_dir,
                                               absl::string_view source_name, bool derive) {
  const Reader r(source_name);
  json doc;
  try {
    doc = json::parse(json_text);
  } catch (const json::exception& e) {
    return r.Error(absl::StrCat("not valid JSON: ", e.what()));
  }
  PackManifest m;
  std::string format;
  ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, doc, "", {"format", "name", "row", "hash", "layers", "synthetic", "module"}));
  ENGRAM_RETURN_IF_ERROR(r.Get(doc, "format", "", &format));
  if (format != kPackFormat) {
    return r.Error(absl::StrCat("format is '", format, "', expected '", kPackFormat, "'"));
  }
  ENGRAM_RETURN_IF_ERROR(r.Get(doc, "name", "", &m.name));
  if (m.name.empty() || m.name.size() > 128 ||
      !std::all_of(m.name.begin(), m.name.end(),
                   [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.'; })) {
    return r.Error(absl::StrCat("name '", m.name, "' must be 1-128 characters of [A-Za-z0-9._-]"));
  }

  json row;
  ENGRAM_RETURN_IF_ERROR(r.Get(doc, "row", "", &row));
  std::string dtype_name;
  ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, row, "row.", {"dtype", "dim", "bytes"}));
  ENGRAM_RETURN_IF_ERROR(r.Get(row, "dtype", "row.", &dtype_name));
  auto dtype = ParseRowDtype(dtype_name);
  if (!dtype.ok()) return r.Error(dtype.status().message());
  m.row.dtype = *dtype;
  ENGRAM_RETURN_IF_ERROR(r.Get(row, "dim", "row.", &m.row.dim));
  if (m.row.dim < 1 || m.row.dim > 65536) return r.Error("row.dim must be in [1, 65536]");
  const int64_t expected_bytes = RowBytesFor(m.row.dtype, m.row.dim);
  if (expected_bytes == 0) {
    return r.Error(absl::StrCat("row.dim ", m.row.dim, " is not a multiple of 32, as ", dtype_name,
                                " needs"));
  }
  if (row.contains("bytes")) {
    ENGRAM_RETURN_IF_ERROR(r.Get(row, "bytes", "row.", &m.row.bytes));
    if (m.row.bytes != expected_bytes) {
      return r.Error(absl::StrCat("row.bytes is ", m.row.bytes, " but ", dtype_name, " x ", m.row.dim,
                                  " needs ", expected_bytes));
    }
  }
  m.row.bytes = expected_bytes;

  json hash;
  ENGRAM_RETURN_IF_ERROR(r.Get(doc, "hash", "", &hash));
  ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, hash, "hash.",
                                          {"kind", "max_ngram", "heads_per_ngram", "seed", "vocab_per_ngram", "pad_id",
                                           "compress_lut", "compressed_vocab", "dead_token_id"}));
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "kind", "hash.", &m.hash_kind));
  if (m.hash_kind != "engram-v1" && m.hash_kind != "explicit") {
    return r.Error(absl::StrCat("hash.kind '", m.hash_kind, "' is not engram-v1 or explicit"));
  }
  if (derive && m.hash_kind == "explicit") {
    return r.Error("hash.kind explicit needs head_rows and multipliers: write a full manifest instead");
  }
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "max_ngram", "hash.", &m.hash.max_ngram));
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "heads_per_ngram", "hash.", &m.hash.heads_per_ngram));
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "seed", "hash.", &m.hash.seed));
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "vocab_per_ngram", "hash.", &m.hash.vocab_per_ngram));
  ENGRAM_RETURN_IF_ERROR(r.Get(hash, "pad_id", "hash.", &m.hash.pad_id));
  if (hash.contains("dead_token_id") && !hash["dead_token_id"].is_null()) {
    int64_t dead = 0;
    ENGRAM_RETURN_IF_ERROR(r.Get(hash, "dead_token_id", "hash.", &dead));
    m.hash.dead_token_id = dead;
  }
  if (hash.contains("compress_lut") && !hash["compress_lut"].is_null()) {
    ENGRAM_RETURN_IF_ERROR(r.Get(hash, "compress_lut", "hash.", &m.compress_lut_file));
    auto lut = ReadInt32File(JoinPath(base_dir, m.compress_lut_file));
    if (!lut.ok()) return r.Error(absl::StrCat("hash.compress_lut: ", lut.status().message()));
    m.hash.compress_lut = std::move(*lut);
    if (m.hash.compress_lut.empty()) return r.Error("hash.compress_lut is an empty file");
    const int64_t lut_vocab =
        int64_t{*std::max_element(m.hash.compress_lut.begin(), m.hash.compress_lut.end())} + 1;
    if (hash.contains("compressed_vocab")) {
      ENGRAM_RETURN_IF_ERROR(r.Get(hash, "compressed_vocab", "hash.", &m.hash.compressed_vocab));
      if (m.hash.compressed_vocab != lut_vocab) {
        return r.Error(absl::StrCat("hash.compressed_vocab is ", m.hash.compressed_vocab,
                                    " but the lut maps onto ", lut_vocab, " ids"));
      }
    }
    m.hash.compressed_vocab = lut_vocab;
  } else {
    ENGRAM_RETURN_IF_ERROR(r.Get(hash, "compressed_vocab", "hash.", &m.hash.compressed_vocab));
  }
  if (absl::Status s = m.hash.Validate(); !s.ok()) return r.Error(s.message());

  json layers;
  ENGRAM_RETURN_IF_ERROR(r.Get(doc, "layers", "", &layers));
  if (!layers.is_array() || layers.empty()) return r.Error("layers must be a non-empty array");
  std::vector<int> ids;
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string path = absl::StrCat("layers[", i, "].");
    PackLayer layer;
    ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, layers[i], path,
                                            {"id", "file", "head_rows", "multipliers", "xxh3_64", "block_checksums"}));
    ENGRAM_RETURN_IF_ERROR(r.Get(layers[i], "id", path, &layer.id));
    if (layer.id < 0 || layer.id > 100000) return r.Error(absl::StrCat(path, "id must be in [0, 100000]"));
    if (std::find(ids.begin(), ids.end(), layer.id) != ids.end()) {
      return r.Error(absl::StrCat("layer id ", layer.id, " appears twice"));
    }
    ids.push_back(layer.id);
    layer.layout.layer_id = layer.id;
    if (!derive) {
      ENGRAM_RETURN_IF_ERROR(r.Get(layers[i], "file", path, &layer.file));
      if (layer.file.empty() || layer.file.find('/') != std::string::npos || layer.file[0] == '.') {
        return r.Error(absl::StrCat(path, "file '", layer.file, "' must be a plain file name"));
      }
      ENGRAM_RETURN_IF_ERROR(r.Get(layers[i], "head_rows", path, &layer.layout.head_rows));
      ENGRAM_RETURN_IF_ERROR(r.Get(layers[i], "multipliers", path, &layer.layout.multipliers));
      if (layers[i].contains("xxh3_64")) {
        ENGRAM_RETURN_IF_ERROR(r.Get(layers[i], "xxh3_64", path, &layer.xxh3_64));
      }
      if (layers[i].contains("block_checksums") && !layers[i]["block_checksums"].is_null()) {
        const json& blocks = layers[i]["block_checksums"];
        const std::string bpath = path + "block_checksums.";
        ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, blocks, bpath, {"file", "block_bytes", "xxh3_64"}));
        uint64_t block_bytes = 0;
        ENGRAM_RETURN_IF_ERROR(r.Get(blocks, "file", bpath, &layer.block_checksums_file));
        ENGRAM_RETURN_IF_ERROR(r.Get(blocks, "block_bytes", bpath, &block_bytes));
        ENGRAM_RETURN_IF_ERROR(r.Get(blocks, "xxh3_64", bpath, &layer.block_checksums_xxh3_64));
        if (block_bytes != 4096) {
          return r.Error(absl::StrCat(bpath, "block_bytes is ", block_bytes, "; this engramd checks 4096-byte blocks"));
        }
        const std::string& f = layer.block_checksums_file;
        if (f.empty() || f.find('/') != std::string::npos || f[0] == '.' || f == layer.file) {
          return r.Error(absl::StrCat(bpath, "file '", f, "' must be a plain file name other than the rows file"));
        }
        if (layer.block_checksums_xxh3_64.size() != 16) {
          return r.Error(absl::StrCat(bpath, "xxh3_64 '", layer.block_checksums_xxh3_64, "' is not 16 hex digits"));
        }
      }
    } else {
      layer.file = absl::StrCat("layer-", layer.id, ".rows");
    }
    m.layers.push_back(std::move(layer));
  }

  if (m.hash_kind == "engram-v1") {
    auto derived = DeriveLayerLayouts(m.hash, ids);
    if (!derived.ok()) return r.Error(derived.status().message());
    for (size_t i = 0; i < m.layers.size(); ++i) {
      LayerHashLayout& have = m.layers[i].layout;
      const LayerHashLayout& want = (*derived)[i];
      if (!derive && (have.head_rows != want.head_rows || have.multipliers != want.multipliers)) {
        return r.Error(absl::StrCat("layer ", m.layers[i].id,
                                    ": head_rows/multipliers differ from the engram-v1 derivation "
                                    "(use hash.kind explicit for checkpoints that differ)"));
      }
      have = want;
    }
  }
  for (auto& layer : m.layers) {
    if (static_cast<int>(layer.layout.head_rows.size()) != m.hash.heads_per_layer() ||
        static_cast<int>(layer.layout.multipliers.size()) != m.hash.max_ngram) {
      return r.Error(absl::StrCat("layer ", layer.id, " needs ", m.hash.heads_per_layer(),
                                  " head_rows and ", m.hash.max_ngram, " multipliers"));
    }
    for (int64_t rows : layer.layout.head_rows) {
      if (rows < 1 || rows > (int64_t{1} << 40)) {
        return r.Error(absl::StrCat("layer ", layer.id, " has a head of ", rows, " rows"));
      }
    }
    layer.layout.ComputeOffsets();
  }

  if (doc.contains("module")) {
    ENGRAM_RETURN_IF_ERROR(r.Get(doc, "module", "", &m.module));
    if (m.module != "demo" && m.module != "dsv41") {
      return r.Error(absl::StrCat("module is '", m.module, "'; demo or dsv41 expected"));
    }
  }
  if (doc.contains("synthetic") && !doc["synthetic"].is_null()) {
    uint64_t seed = 0;
    ENGRAM_RETURN_IF_ERROR(CheckKnownFields(r, doc["synthetic"], "synthetic.", {"seed"}));
    ENGRAM_RETURN_IF_ERROR(r.Get(doc["synthetic"], "seed", "synthetic.", &seed));
    m.synthetic_seed = seed;
  }
  return m;
}

absl::StatusOr<PackManifest> LoadPackManifest(absl::string_view pack_dir) {
  const std::string path = JoinPath(pack_dir, kManifestFile);
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("no pack at ", pack_dir, ": cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  return ParseManifestJson(text.str(), pack_dir, path, /*derive=*/false);
}

std::string ManifestToJson(const PackManifest& m) {
  json doc;
  doc["format"] = kPackFormat;
  doc["name"] = m.name;
  doc["row"] = {{"dtype", RowDtypeName(m.row.dtype)}, {"dim", m.row.dim}, {"bytes", m.row.bytes}};
  json hash = {{"kind", m.hash_kind},
               {"max_ngram", m.hash.max_ngram},
               {"heads_per_ngram", m.hash.heads_per_ngram},
               {"seed", m.hash.seed},
               {"vocab_per_ngram", m.hash.vocab_per_ngram},
               {"pad_id", m.hash.pad_id},
               {"compressed_vocab", m.hash.compressed_vocab}};
  if (m.hash.dead_token_id) hash["dead_token_id"] = *m.hash.dead_token_id;
  hash["compress_lut"] = m.compress_lut_file.empty() ? json(nullptr) : json(m.compress_lut_file);
  doc["hash"] = hash;
  doc["layers"] = json::array();
  for (const auto& l : m.layers) {
    json layer = {{"id", l.id},
                  {"file", l.file},
                  {"head_rows", l.layout.head_rows},
                  {"multipliers", l.layout.multipliers},
                  {"xxh3_64", l.xxh3_64}};
    if (!l.block_checksums_file.empty()) {
      layer["block_checksums"] = {
          {"file", l.block_checksums_file}, {"block_bytes", 4096}, {"xxh3_64", l.block_checksums_xxh3_64}};
    }
    doc["layers"].push_back(std::move(layer));
  }
  if (m.synthetic_seed) doc["synthetic"] = {{"seed", *m.synthetic_seed}};
  if (m.module != "demo") doc["module"] = m.module;
  return doc.dump(2) + "\n";
}

}  // namespace engram
