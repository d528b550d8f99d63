#include "tiering/hot_set.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"

namespace engram {
namespace {

constexpr char kMagic[4] = {'E', 'H', 'S', '1'};

template <typename T>
void Put(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(v));
}

class Cursor {
 public:
  Cursor(absl::string_view bytes, absl::string_view source) : bytes_(bytes), source_(source) {}
  template <typename T>
  bool Get(T* v) {
    if (bytes_.size() - pos_ < sizeof(T)) return false;
    std::memcpy(v, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return true;
  }
  bool GetString(std::string* s) {
    uint32_t n = 0;
    if (!Get(&n) || bytes_.size() - pos_ < n) return false;
    s->assign(bytes_.data() + pos_, n);
    pos_ += n;
    return true;
  }
  size_t remaining() const { return bytes_.size() - pos_; }
  absl::Status Truncated() const {
    return absl::DataLossError(absl::StrCat(source_, ": hot set is truncated or corrupt at byte ", pos_));
  }

 private:
  absl::string_view bytes_;
  std::string source_;
  size_t pos_ = 0;
};

}  // namespace

const LayerHotSet* HotSet::FindLayer(int layer_id) const {
  for (const auto& l : layers) {
    if (l.layer_id == layer_id) return &l;
  }
  return nullptr;
}

std::string PackFingerprint(const PackManifest& m) {
  std::string fp = absl::StrCat(m.name, ";", RowDtypeName(m.row.dtype), "x", m.row.dim);
  for (const auto& l : m.layers) absl::StrAppend(&fp, ";", l.id, ":", l.layout.total_rows, ":", l.xxh3_64);
  return fp;
}

std::string EncodeHotSet(const HotSet& h) {
  std::string out(kMagic, 4);
  Put<uint32_t>(&out, static_cast<uint32_t>(h.table.size()));
  out += h.table;
  Put<uint32_t>(&out, static_cast<uint32_t>(h.fingerprint.size()));
  out += h.fingerprint;
  Put<uint32_t>(&out, static_cast<uint32_t>(h.layers.size()));
  for (const auto& l : h.layers) {
    Put<int32_t>(&out, l.layer_id);
    Put<uint64_t>(&out, l.rows.size());
    for (const auto& [row, count] : l.rows) {
      Put<uint64_t>(&out, row);
      Put<uint32_t>(&out, count);
    }
  }
  return out;
}

absl::StatusOr<HotSet> DecodeHotSet(absl::string_view bytes, absl::string_view source) {
  if (bytes.size() < 4 || std::memcmp(bytes.data(), kMagic, 4) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(source, " is not a hot set (no EHS1 header)"));
  }
  Cursor c(bytes.substr(4), source);
  HotSet h;
  uint32_t layers = 0;
  if (!c.GetString(&h.table) || !c.GetString(&h.fingerprint) || !c.Get(&layers)) return c.Truncated();
  for (uint32_t i = 0; i < layers; ++i) {
    LayerHotSet l;
    uint64_t n = 0;
    if (!c.Get(&l.layer_id) || !c.Get(&n) || n > c.remaining() / 12) return c.Truncated();
    l.rows.resize(n);
    for (auto& [row, count] : l.rows) {
      if (!c.Get(&row) || !c.Get(&count)) return c.Truncated();
    }
    h.layers.push_back(std::move(l));
  }
  return h;
}

absl::Status WriteHotSetFile(const HotSet& hot_set, const std::string& path) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    const std::string bytes = EncodeHotSet(hot_set);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return absl::InternalError(absl::StrCat("cannot rename ", tmp));
  return absl::OkStatus();
}

absl::StatusOr<HotSet> ReadHotSetFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open hot set ", path));
  std::stringstream bytes;
  bytes << in.rdbuf();
  return DecodeHotSet(bytes.str(), path);
}

absl::StatusOr<HotSet> ProfileTokens(const PackManifest& manifest, const std::vector<int32_t>& tokens,
                                     uint32_t seq_len, double fraction) {
  if (!(fraction > 0 && fraction <= 1)) return absl::InvalidArgumentError("the profile fraction must be in (0, 1]");
  std::vector<LayerHashLayout> layouts;
  for (const auto& l : manifest.layers) layouts.push_back(l.layout);
  auto hasher = NgramHasher::Create(manifest.hash, layouts);
  if (!hasher.ok()) return hasher.status();
  std::vector<int64_t> compressed(tokens.size());
  if (absl::Status s = (*hasher)->Compress(tokens, absl::MakeSpan(compressed)); !s.ok()) return s;
  HotSet hot;
  hot.table = manifest.name;
  hot.fingerprint = PackFingerprint(manifest);
  for (size_t li = 0; li < manifest.layers.size(); ++li) {
    const LayerHashLayout& layout = manifest.layers[li].layout;
    absl::flat_hash_map<uint64_t, uint32_t> counts;
    for (uint64_t row : (*hasher)->TraceRows(compressed, seq_len, static_cast<int>(li))) {
      uint32_t& c = counts[row];
      if (c < UINT32_MAX) ++c;
    }
    LayerHotSet layer{manifest.layers[li].id, {counts.begin(), counts.end()}};
    const size_t keep = std::min(layer.rows.size(), static_cast<size_t>(static_cast<double>(layout.total_rows) * fraction));
    std::partial_sort(layer.rows.begin(), layer.rows.begin() + keep, layer.rows.end(),
                      [](const auto& a, const auto& b) { return a.second > b.second || (a.second == b.second && a.first < b.first); });
    layer.rows.resize(keep);
    hot.layers.push_back(std::move(layer));
  }
  return hot;
}

}  // namespace engram
