#include "tiering/hf_import.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tiering/block_checksums.h"
#include "tiering/pack_writer.h"
#include "xxhash.h"

namespace engram {
namespace {

using nlohmann::json;

constexpr char kLutFile[] = "compress_lut.i32";
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr uint64_t kRowsPerChunk = 1 << 16;

int DtypeBytes(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "F8_E4M3" || dtype == "F8_E5M2" || dtype == "F8_E8M0" || dtype == "I8" || dtype == "U8" ||
      dtype == "BOOL") {
    return 1;
  }
  return 0;
}

absl::StatusOr<json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  json doc = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  return doc;
}

absl::Status ReadAt(int fd, uint8_t* buf, uint64_t bytes, uint64_t offset, const std::string& what) {
  while (bytes > 0) {
    const ssize_t n = pread(fd, buf, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::DataLossError(
          absl::StrCat("reading ", what, " at byte ", offset, ": ", n == 0 ? "the file ends" : std::strerror(errno)));
    }
    buf += n;
    bytes -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

// A 4 KiB-aligned byte buffer (O_DIRECT reads and writes need aligned memory).
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t bytes = 0) { Resize(bytes); }
  ~AlignedBuffer() { std::free(data_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  void Resize(size_t bytes) {
    std::free(data_);
    size_ = (bytes + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    data_ = size_ == 0 ? nullptr : static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, size_));
    if (data_ != nullptr) std::memset(data_, 0, size_);
  }
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  static constexpr size_t kDirectAlign = 4096;

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

// Opens `path` for reading with O_DIRECT when its filesystem allows (no page cache: a 100 GB shard
// read once should not evict everything else), else buffered. *direct says which.
int OpenForRead(const std::string& path, bool* direct) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
  *direct = fd >= 0;
  if (fd < 0) fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  return fd;
}

// Reads [offset, offset + bytes) of a file: with `direct`, the aligned range around it into `buf`
// (which must hold bytes + 8 KiB); returns where in `buf` the wanted bytes begin.
absl::StatusOr<const uint8_t*> ReadRange(int fd, bool direct, AlignedBuffer* buf, uint64_t bytes, uint64_t offset,
                                         const std::string& what) {
  if (!direct) {
    if (absl::Status s = ReadAt(fd, buf->data(), bytes, offset, what); !s.ok()) return s;
    return buf->data();
  }
  const uint64_t a = AlignedBuffer::kDirectAlign;
  const uint64_t begin = offset / a * a, end = (offset + bytes + a - 1) / a * a;
  uint64_t got = 0;
  while (begin + got < offset + bytes) {
    const ssize_t n = pread(fd, buf->data() + got, end - begin - got, static_cast<off_t>(begin + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::DataLossError(absl::StrCat("reading ", what, " at byte ", begin + got, ": ",
                                              n == 0 ? "the file ends" : std::strerror(errno)));
    }
    got += static_cast<uint64_t>(n);
  }
  return buf->data() + (offset - begin);
}

// The shard file that holds `tensor`, from model.safetensors.index.json (or the single
// model.safetensors of a small checkpoint).
absl::StatusOr<std::string> ShardOf(const std::string& dir, const json& index, const std::string& tensor) {
  if (index.is_null()) return absl::StrCat(dir, "/model.safetensors");
  if (!index.contains("weight_map") || !index["weight_map"].contains(tensor)) {
    return absl::NotFoundError(absl::StrCat("model.safetensors.index.json names no shard for ", tensor));
  }
  if (!index["weight_map"][tensor].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat("model.safetensors.index.json: the shard of ", tensor, " is not a file name"));
  }
  const std::string file = index["weight_map"][tensor].get<std::string>();
  if (file.empty() || file.find('/') != std::string::npos || file[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat("the index names shard '", file, "' for ", tensor,
                                                   "; a shard must be a plain file name"));
  }
  return absl::StrCat(dir, "/", file);
}

// Everything about one Engram layer's table in the checkpoint.
struct LayerSource {
  int id = 0;
  int config_index = 0;
  LayerHashLayout layout;
  std::string weight_path, scale_path;
  SafetensorsTensor weight, scale;
  RowDtype dtype = RowDtype::kFp8E4m3Ue8m0x32;
  int64_t table_rows = 0;
};

struct Plan {
  HfEngramConfig config;
  HashConfig hash;
  std::vector<LayerHashLayout> all_layouts;  // every Engram layer of the config, in its order
  std::vector<LayerSource> layers;           // the ones to import
  std::vector<std::string> notes;
  std::string module = "demo";  // dsv41 when every imported layer has V4.1's module tensors
};

absl::StatusOr<Plan> MakePlan(const std::string& dir, const std::vector<int>& wanted, const std::vector<int32_t>& lut,
                              bool check_tensors) {
  Plan plan;
  auto config = ReadHfEngramConfig(dir + "/config.json");
  if (!config.ok()) return config.status();
  plan.config = *config;
  const HfEngramConfig& c = plan.config;
  plan.hash.max_ngram = c.max_ngram;
  plan.hash.heads_per_ngram = c.heads_per_ngram;
  plan.hash.seed = 0;
  plan.hash.vocab_per_ngram = c.vocab_per_ngram;
  plan.hash.pad_id = c.pad_id;
  if (!lut.empty()) {
    plan.hash.compress_lut = lut;
    plan.hash.compressed_vocab = int64_t{*std::max_element(lut.begin(), lut.end())} + 1;
    if (c.compressed_vocab != 0 && plan.hash.compressed_vocab != c.compressed_vocab) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the tokenizer.json compresses to ", plan.hash.compressed_vocab,
          " ids, but config.json engram_compressed_vocab_size says ", c.compressed_vocab,
          ": the multipliers (which depend on it) would not be the model's"));
    }
  } else {
    if (c.compressed_vocab == 0) {
      return absl::InvalidArgumentError("config.json has no engram_compressed_vocab_size to derive the layout from");
    }
    plan.hash.compressed_vocab = c.compressed_vocab;
  }
  if (absl::Status s = plan.hash.Validate(); !s.ok()) return s;
  auto layouts = DeriveLayerLayouts(plan.hash, c.layer_ids);  // primes shared in the config's layer order
  if (!layouts.ok()) return layouts.status();
  plan.all_layouts = std::move(*layouts);

  json index;
  if (check_tensors) {
    const std::string index_path = dir + "/model.safetensors.index.json";
    if (std::filesystem::exists(index_path)) {
      auto parsed = ReadJsonFile(index_path);
      if (!parsed.ok()) return parsed.status();
      index = std::move(*parsed);
    }
  }
  std::map<std::string, std::map<std::string, SafetensorsTensor>> headers;  // by shard path
  auto tensor_of = [&](const std::string& name, std::string* path) -> absl::StatusOr<SafetensorsTensor> {
    auto shard = ShardOf(dir, index, name);
    if (!shard.ok()) return shard.status();
    if (!headers.contains(*shard)) {
      auto h = ReadSafetensorsHeader(*shard);
      if (!h.ok()) return h.status();
      headers[*shard] = std::move(*h);
    }
    const auto& h = headers[*shard];
    auto it = h.find(name);
    if (it == h.end()) return absl::NotFoundError(absl::StrCat(*shard, " has no tensor ", name));
    *path = *shard;
    return it->second;
  };

  for (size_t i = 0; i < c.layer_ids.size(); ++i) {
    const int id = c.layer_ids[i];
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), id) == wanted.end()) continue;
    LayerSource src;
    src.id = id;
    src.config_index = static_cast<int>(i);
    src.layout = plan.all_layouts[i];
    const uint64_t addressed = src.layout.total_rows;
    const int64_t declared = c.num_embeddings[i];
    if (static_cast<int64_t>(addressed) > declared) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", id, ": config.json engram_num_embeddings[", i, "] = ", declared, " is smaller than the ",
          addressed, " rows its hash addresses (the sum of its ", src.layout.head_rows.size(), " head primes)"));
    }
    if (static_cast<int64_t>(addressed) < declared) {
      plan.notes.push_back(absl::StrCat("layer ", id, ": rows ", addressed, "..", declared - 1, " (", declared - addressed,
                                        ") are never addressed by the hash; the pack holds the ", addressed,
                                        " addressed rows"));
    }
    if (check_tensors) {
      const std::string weight_name = absl::StrCat("layers.", id, ".engram.embed.weight");
      auto weight = tensor_of(weight_name, &src.weight_path);
      if (!weight.ok()) return weight.status();
      src.weight = *weight;
      if (src.weight.shape.size() != 2 || src.weight.shape[1] != c.head_dim) {
        return absl::FailedPreconditionError(absl::StrCat(weight_name, " has shape [", absl::StrJoin(src.weight.shape, ", "),
                                                          "]; config.json says [rows, ", c.head_dim, "]"));
      }
      src.table_rows = src.weight.shape[0];
      if (src.table_rows != declared) {
        return absl::FailedPreconditionError(absl::StrCat(
            "layer ", id, ": ", weight_name, " has ", src.table_rows, " rows; config.json engram_num_embeddings[", i,
            "] says ", declared));
      }
      if (src.weight.dtype == "F8_E4M3") {
        const std::string scale_name = absl::StrCat("layers.", id, ".engram.embed.scale");
        auto scale = tensor_of(scale_name, &src.scale_path);
        if (!scale.ok()) return scale.status();
        src.scale = *scale;
        if (src.scale.dtype != "F8_E8M0" || src.scale.shape.size() != 2 || src.scale.shape[0] != src.table_rows ||
            src.scale.shape[1] * 32 != c.head_dim) {
          return absl::FailedPreconditionError(absl::StrCat(scale_name, " is ", src.scale.dtype, " [",
                                                            absl::StrJoin(src.scale.shape, ", "), "]; an F8_E4M3 table of ",
                                                            src.table_rows, " rows needs F8_E8M0 [", src.table_rows, ", ",
                                                            c.head_dim / 32, "]"));
        }
        src.dtype = RowDtype::kFp8E4m3Ue8m0x32;
      } else if (src.weight.dtype == "BF16") {
        src.dtype = RowDtype::kBf16;
      } else if (src.weight.dtype == "F16") {
        src.dtype = RowDtype::kF16;
      } else if (src.weight.dtype == "F32") {
        src.dtype = RowDtype::kF32;
      } else {
        return absl::FailedPreconditionError(absl::StrCat(weight_name, " is ", src.weight.dtype,
                                                          "; Engram tables are F8_E4M3 (+ F8_E8M0 scales), BF16, F16 or F32"));
      }
    }
    plan.layers.push_back(std::move(src));
  }
  if (plan.layers.empty()) return absl::InvalidArgumentError("none of the asked-for layers is an Engram layer of this checkpoint");
  if (check_tensors) {
    for (const auto& l : plan.layers) {
      if (l.dtype != plan.layers[0].dtype) {
        return absl::FailedPreconditionError("the Engram layers' tables have different dtypes; a pack has one row format");
      }
    }
    // V4.1's module: a fused wkv projection (and no ShortConv) in every imported layer.
    int with_wkv = 0;
    for (const auto& l : plan.layers) {
      std::string path;
      if (tensor_of(absl::StrCat("layers.", l.id, ".engram.wkv.weight"), &path).ok()) ++with_wkv;
    }
    if (with_wkv == static_cast<int>(plan.layers.size())) {
      plan.module = "dsv41";
      plan.notes.push_back("module: dsv41 (every layer has engram.wkv.weight: DeepSeek-V4.1's Engram module)");
    } else if (with_wkv > 0) {
      plan.notes.push_back(absl::StrCat("module: demo (only ", with_wkv, " of ", plan.layers.size(),
                                        " layers have engram.wkv.weight)"));
    }
  }
  return plan;
}

std::string Gigabytes(uint64_t bytes) { return absl::StrFormat("%.1f GB", static_cast<double>(bytes) / 1e9); }

}  // namespace

absl::StatusOr<std::map<std::string, SafetensorsTensor>> ReadSafetensorsHeader(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    close(fd);
    return absl::DataLossError(absl::StrCat("cannot stat ", path));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  uint64_t header_bytes = 0;
  absl::Status s = file_bytes >= 8 ? ReadAt(fd, reinterpret_cast<uint8_t*>(&header_bytes), 8, 0, path)
                                   : absl::DataLossError(absl::StrCat(path, " is ", file_bytes, " bytes: not a safetensors file"));
  if (s.ok() && (header_bytes > kMaxHeaderBytes || header_bytes > file_bytes - 8)) {
    s = absl::DataLossError(absl::StrCat(path, ": a header of ", header_bytes, " bytes does not fit the ", file_bytes,
                                         "-byte file"));
  }
  std::string header(s.ok() ? header_bytes : 0, '\0');
  if (s.ok()) s = ReadAt(fd, reinterpret_cast<uint8_t*>(header.data()), header_bytes, 8, path);
  close(fd);
  if (!s.ok()) return s;
  json doc = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) return absl::DataLossError(absl::StrCat(path, ": the header is not a JSON object"));
  const uint64_t data_begin = 8 + header_bytes, data_bytes = file_bytes - data_begin;
  std::map<std::string, SafetensorsTensor> out;
  for (const auto& [name, t] : doc.items()) {
    if (name == "__metadata__") continue;
    auto bad = [&](const std::string& what) { return absl::DataLossError(absl::StrCat(path, ": tensor ", name, " ", what)); };
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets") ||
        !t["dtype"].is_string() || !t["shape"].is_array() || !t["data_offsets"].is_array() ||
        t["data_offsets"].size() != 2) {
      return bad("has no dtype, shape and data_offsets [begin, end]");
    }
    SafetensorsTensor tensor;
    tensor.dtype = t["dtype"].get<std::string>();
    const int elem = DtypeBytes(tensor.dtype);
    if (elem == 0) return bad(absl::StrCat("has an unknown dtype '", tensor.dtype, "'"));
    uint64_t elements = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) return bad("has a negative or non-integer dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && elements > (uint64_t{1} << 62) / dim) return bad("has a shape too large to be real");
      elements *= dim;
      tensor.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& offsets = t["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) return bad("has non-integer data_offsets");
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_bytes) {
      return bad(absl::StrCat("has data_offsets [", begin, ", ", end, ") outside the file's ", data_bytes, " data bytes"));
    }
    if (end - begin != elements * static_cast<uint64_t>(elem)) {
      return bad(absl::StrCat("holds ", end - begin, " bytes, but ", tensor.dtype, " [", absl::StrJoin(tensor.shape, ", "),
                              "] needs ", elements * elem));
    }
    tensor.offset = data_begin + begin;
    tensor.bytes = end - begin;
    out[name] = tensor;
  }
  std::vector<std::pair<uint64_t, const std::string*>> by_offset;
  for (const auto& [name, t] : out) {
    if (t.bytes > 0) by_offset.push_back({t.offset, &name});
  }
  std::sort(by_offset.begin(), by_offset.end());
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsTensor& prev = out[*by_offset[i - 1].second];
    if (by_offset[i].first < prev.offset + prev.bytes) {
      return absl::DataLossError(absl::StrCat(path, ": tensors ", *by_offset[i - 1].second, " and ", *by_offset[i].second,
                                              " overlap"));
    }
  }
  return out;
}

absl::StatusOr<HfEngramConfig> ReadHfEngramConfig(const std::string& path) {
  auto parsed = ReadJsonFile(path);
  if (!parsed.ok()) return parsed.status();
  const json& doc = *parsed;
  const json& c = doc.contains("text_config") && doc["text_config"].is_object() &&
                          doc["text_config"].contains("engram_layer_ids")
                      ? doc["text_config"]
                      : doc;
  HfEngramConfig out;
  auto field = [&](const char* name) -> absl::StatusOr<const json*> {
    if (!c.contains(name)) return absl::InvalidArgumentError(absl::StrCat(path, ": no field ", name));
    return &c[name];
  };
  try {
    for (const char* name : {"engram_layer_ids", "engram_num_embeddings", "engram_max_ngram_size", "engram_vocab_size",
                             "engram_n_heads", "engram_head_dim", "engram_pad_token_id"}) {
      if (auto f = field(name); !f.ok()) return f.status();
    }
    out.layer_ids = c["engram_layer_ids"].get<std::vector<int>>();
    out.num_embeddings = c["engram_num_embeddings"].get<std::vector<int64_t>>();
    out.max_ngram = c["engram_max_ngram_size"].get<int>();
    out.heads_per_ngram = c["engram_n_heads"].get<int>();
    out.head_dim = c["engram_head_dim"].get<int>();
    out.pad_id = c["engram_pad_token_id"].get<int64_t>();
    const json& vocab = c["engram_vocab_size"];
    if (vocab.is_array()) {
      out.vocab_per_ngram = vocab.get<std::vector<int64_t>>();
    } else {
      out.vocab_per_ngram.assign(std::max(0, out.max_ngram - 1), vocab.get<int64_t>());
    }
    if (c.contains("engram_compressed_vocab_size")) out.compressed_vocab = c["engram_compressed_vocab_size"].get<int64_t>();
    if (c.contains("vocab_size")) {
      out.vocab_size = c["vocab_size"].get<int64_t>();
    } else if (doc.contains("vocab_size")) {
      out.vocab_size = doc["vocab_size"].get<int64_t>();
    }
    for (const json* q : {&doc, &c}) {
      if (q->contains("quantization_config") && (*q)["quantization_config"].is_object()) {
        out.fp8 |= (*q)["quantization_config"].value("quant_method", "") == "fp8";
      }
    }
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": an Engram field has the wrong type: ", e.what()));
  }
  if (out.layer_ids.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": engram_layer_ids is empty"));
  if (out.num_embeddings.size() != out.layer_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": engram_num_embeddings has ", out.num_embeddings.size(),
                                                   " entries for ", out.layer_ids.size(), " engram_layer_ids"));
  }
  if (static_cast<int>(out.vocab_per_ngram.size()) != out.max_ngram - 1) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": engram_vocab_size has ", out.vocab_per_ngram.size(),
                                                   " entries; orders 2..", out.max_ngram, " need ", out.max_ngram - 1));
  }
  if (out.head_dim <= 0 || out.head_dim > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": engram_head_dim ", out.head_dim, " is not a row size"));
  }
  return out;
}

absl::StatusOr<std::vector<std::string>> DescribeHfLayout(const std::string& dir, bool check_tensors) {
  absl::StatusOr<Plan> plan;
  try {
    plan = MakePlan(dir, {}, {}, check_tensors);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": a checkpoint file is not as expected: ", e.what()));
  }
  if (!plan.ok()) return plan.status();
  std::vector<std::string> lines;
  const HfEngramConfig& c = plan->config;
  lines.push_back(absl::StrCat("hash: engram-v1, orders 2..", c.max_ngram, ", ", c.heads_per_ngram, " heads per order (",
                               plan->hash.heads_per_layer(), " per layer), vocab per order [",
                               absl::StrJoin(c.vocab_per_ngram, ", "), "], seed 0, pad id ", c.pad_id,
                               ", compressed vocab ", plan->hash.compressed_vocab));
  const int64_t row_bytes = RowBytesFor(RowDtype::kFp8E4m3Ue8m0x32, c.head_dim);
  for (const LayerSource& l : plan->layers) {
    const auto& rows = l.layout.head_rows;
    lines.push_back(absl::StrCat("layer ", l.id, ": head primes ", absl::StrJoin(rows, " "), " (sum ",
                                 l.layout.total_rows, ")"));
    lines.push_back(absl::StrCat("layer ", l.id, ": multipliers [", absl::StrJoin(l.layout.multipliers, ", "), "]"));
    lines.push_back(absl::StrCat("layer ", l.id, ": head offsets ", absl::StrJoin(l.layout.head_offset, " ")));
    const int64_t declared = c.num_embeddings[l.config_index];
    lines.push_back(absl::StrCat("layer ", l.id, ": rows ", l.layout.total_rows, " addressed, engram_num_embeddings ",
                                 declared, static_cast<int64_t>(l.layout.total_rows) == declared ? " (equal: ok)" : "",
                                 "; ", c.head_dim, "-value rows, ", row_bytes, " bytes each as fp8_e4m3_ue8m0x32: ",
                                 Gigabytes(l.layout.total_rows * static_cast<uint64_t>(row_bytes))));
  }
  for (const auto& n : plan->notes) lines.push_back("note: " + n);
  return lines;
}

absl::StatusOr<PackManifest> ImportHfCheckpoint(const HfImportOptions& o) {
  namespace fs = std::filesystem;
  absl::StatusOr<Plan> plan;
  try {
    plan = MakePlan(o.checkpoint_dir, o.layers, o.compress_lut, /*check_tensors=*/true);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(o.checkpoint_dir, ": a checkpoint file is not as expected: ", e.what()));
  }
  if (!plan.ok()) return plan.status();
  std::error_code ec;
  if (fs::exists(o.out_dir, ec) && !fs::is_empty(o.out_dir, ec) && !o.force) {
    return absl::AlreadyExistsError(absl::StrCat(o.out_dir, " exists and is not empty (use --force to overwrite)"));
  }
  fs::create_directories(o.out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", o.out_dir, ": ", ec.message()));
  fs::remove(fs::path(o.out_dir) / std::string(kManifestFile), ec);  // no manifest until the pack is whole
  for (const auto& n : plan->notes) {
    if (o.log) o.log(n);
  }

  PackManifest m;
  m.name = o.name.empty() ? "engram" : o.name;
  const RowDtype dtype = plan->layers[0].dtype;
  m.row = {dtype, plan->config.head_dim, RowBytesFor(dtype, plan->config.head_dim)};
  // All Engram layers in the config's order re-derive to the same primes; a subset does not (the
  // prime search is shared across layers), so it carries its layout explicitly.
  bool all = plan->layers.size() == plan->config.layer_ids.size();
  m.hash_kind = all ? "engram-v1" : "explicit";
  m.hash = plan->hash;
  // DeepSeek-V4.1's FP8 tables come with dead positions (token id -1); the demo's do not.
  if (dtype == RowDtype::kFp8E4m3Ue8m0x32) m.hash.dead_token_id = -1;
  m.module = plan->module;
  m.compress_lut_file = kLutFile;
  {
    std::string bytes(reinterpret_cast<const char*>(m.hash.compress_lut.data()), m.hash.compress_lut.size() * 4);
    if (absl::Status s = WriteFileAtomically(absl::StrCat(o.out_dir, "/", kLutFile), bytes); !s.ok()) return s;
  }
  uint64_t all_bytes = 0, done = 0;
  for (const auto& l : plan->layers) all_bytes += l.layout.total_rows * static_cast<uint64_t>(m.row.bytes);
  const uint64_t value_bytes = static_cast<uint64_t>(dtype == RowDtype::kFp8E4m3Ue8m0x32 ? m.row.dim
                                                                                        : m.row.bytes);
  const uint64_t scale_bytes = dtype == RowDtype::kFp8E4m3Ue8m0x32 ? static_cast<uint64_t>(m.row.dim / 32) : 0;
  // Two read buffers: the next chunk is read (sequential preads on a thread of its own) while this
  // one is interleaved, hashed and written, so the disk never waits for the CPU. Reads and writes
  // bypass the page cache where the filesystem allows (O_DIRECT): the bytes are used once, and
  // copying them through the cache is most of the cost.
  struct Chunk {
    AlignedBuffer values, scales;
    const uint8_t* value_at = nullptr;  // where the chunk's bytes begin in the buffers
    const uint8_t* scale_at = nullptr;
  };
  Chunk chunks[2];
  for (Chunk& c : chunks) {
    c.values.Resize(kRowsPerChunk * value_bytes + 2 * AlignedBuffer::kDirectAlign);
    c.scales.Resize(kRowsPerChunk * scale_bytes + 2 * AlignedBuffer::kDirectAlign);
  }
  AlignedBuffer rows(kRowsPerChunk * static_cast<uint64_t>(m.row.bytes) + AlignedBuffer::kDirectAlign);
  for (const LayerSource& l : plan->layers) {
    PackLayer layer;
    layer.id = l.id;
    layer.file = absl::StrCat("layer-", l.id, ".rows");
    layer.layout = l.layout;
    const std::string out_path = absl::StrCat(o.out_dir, "/", layer.file);
    bool wdirect = false, sdirect = false;
    const int wfd = OpenForRead(l.weight_path, &wdirect);
    const int sfd = scale_bytes > 0 ? OpenForRead(l.scale_path, &sdirect) : -1;
    int ofd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
    bool odirect = ofd >= 0;
    if (ofd < 0) ofd = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    absl::Status s;
    if (wfd < 0 || (scale_bytes > 0 && sfd < 0) || ofd < 0) {
      s = absl::InternalError(absl::StrCat("cannot open the shards of layer ", l.id, " or ", out_path, ": ",
                                           std::strerror(errno)));
    }
    if (s.ok() && !wdirect) posix_fadvise(wfd, 0, 0, POSIX_FADV_SEQUENTIAL);
    XXH3_state_t* state = XXH3_createState();
    XXH3_64bits_reset(state);
    BlockChecksumBuilder blocks;
    const uint64_t total = l.layout.total_rows;
    const uint64_t file_bytes = total * static_cast<uint64_t>(m.row.bytes);
    const auto start = std::chrono::steady_clock::now();
    auto read_chunk = [&, wfd, sfd, wdirect, sdirect](uint64_t first, Chunk* c) -> absl::Status {
      const uint64_t n = std::min(kRowsPerChunk, total - first);
      auto values = ReadRange(wfd, wdirect, &c->values, n * value_bytes, l.weight.offset + first * value_bytes,
                              absl::StrCat(l.weight_path, " (layers.", l.id, ".engram.embed.weight)"));
      if (!values.ok()) return values.status();
      c->value_at = *values;
      if (scale_bytes > 0) {
        auto scales = ReadRange(sfd, sdirect, &c->scales, n * scale_bytes, l.scale.offset + first * scale_bytes,
                                absl::StrCat(l.scale_path, " (layers.", l.id, ".engram.embed.scale)"));
        if (!scales.ok()) return scales.status();
        c->scale_at = *scales;
      }
      return absl::OkStatus();
    };
    std::future<absl::Status> pending;
    if (s.ok() && total > 0) pending = std::async(std::launch::async, read_chunk, 0, &chunks[0]);
    for (uint64_t first = 0, k = 0; first < total && s.ok(); first += kRowsPerChunk, ++k) {
      s = pending.get();
      if (!s.ok()) break;
      const Chunk& cur = chunks[k % 2];
      const uint64_t n = std::min(kRowsPerChunk, total - first);
      if (first + n < total) pending = std::async(std::launch::async, read_chunk, first + n, &chunks[(k + 1) % 2]);
      if (scale_bytes > 0) {  // the row: its values, then its scales
        for (uint64_t r = 0; r < n; ++r) {
          std::memcpy(rows.data() + r * m.row.bytes, cur.value_at + r * value_bytes, value_bytes);
          std::memcpy(rows.data() + r * m.row.bytes + value_bytes, cur.scale_at + r * scale_bytes, scale_bytes);
        }
      } else {
        std::memcpy(rows.data(), cur.value_at, n * value_bytes);
      }
      const size_t bytes = static_cast<size_t>(n * m.row.bytes);
      XXH3_64bits_update(state, rows.data(), bytes);
      blocks.Update(rows.data(), bytes);
      // Direct writes go in whole 4 KiB units: the last one is padded and the file cut back after.
      size_t write_bytes = bytes;
      if (odirect && bytes % AlignedBuffer::kDirectAlign != 0) {
        write_bytes = (bytes + AlignedBuffer::kDirectAlign - 1) / AlignedBuffer::kDirectAlign * AlignedBuffer::kDirectAlign;
        std::memset(rows.data() + bytes, 0, write_bytes - bytes);
      }
      s = WriteAll(ofd, rows.data(), write_bytes, out_path);
      done += bytes;
      if (o.progress) o.progress(done, all_bytes);
    }
    if (s.ok() && odirect && ftruncate(ofd, static_cast<off_t>(file_bytes)) != 0) {
      s = absl::InternalError(absl::StrCat("ftruncate ", out_path, ": ", std::strerror(errno)));
    }
    if (pending.valid()) pending.wait();  // a read still in flight must finish before its buffer goes
    layer.xxh3_64 = absl::StrFormat("%016x", XXH3_64bits_digest(state));
    XXH3_freeState(state);
    if (s.ok() && fsync(ofd) != 0) s = absl::InternalError(absl::StrCat("fsync ", out_path, ": ", std::strerror(errno)));
    for (int fd : {wfd, sfd, ofd}) {
      if (fd >= 0) close(fd);
    }
    if (!s.ok()) return s;
    layer.block_checksums_file = BlockChecksumFileName(layer.file);
    auto hex = WriteBlockChecksums(absl::StrCat(o.out_dir, "/", layer.block_checksums_file), blocks.Finish());
    if (!hex.ok()) return hex.status();
    layer.block_checksums_xxh3_64 = *hex;
    if (o.log) {
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      o.log(absl::StrCat("layer ", l.id, ": ", total, " rows, ", Gigabytes(total * m.row.bytes), " in ",
                         absl::StrFormat("%.1f", secs), " s"));
    }
    m.layers.push_back(std::move(layer));
  }
  if (absl::Status s = WriteFileAtomically(absl::StrCat(o.out_dir, "/", kManifestFile), ManifestToJson(m)); !s.ok()) {
    return s;
  }
  return m;
}

}  // namespace engram
