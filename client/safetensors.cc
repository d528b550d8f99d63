#include "engram/safetensors.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engram/kernels/row_dtype.h"
#include "nlohmann/json.hpp"

namespace engram {
namespace {

std::string ShapeText(const std::vector<int64_t>& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

}  // namespace

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream buffer;
  buffer << in.rdbuf();
  const std::string all = buffer.str();
  if (all.size() < 8) return absl::DataLossError(absl::StrCat(path, " is too short to be a safetensors file"));
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(static_cast<uint8_t>(all[i])) << (8 * i);
  if (header_bytes > all.size() - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_bytes, " runs past the end of the file"));
  }
  SafetensorsFile file;
  file.path_ = path;
  file.data_ = all.substr(8 + header_bytes);
  const nlohmann::json header = nlohmann::json::parse(all.substr(8, header_bytes), nullptr, /*allow_exceptions=*/false);
  if (!header.is_object()) return absl::DataLossError(absl::StrCat(path, ": the header is not a JSON object"));
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") continue;
    const auto bad = [&](const std::string& what) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", name, "': ", what));
    };
    if (!value.is_object() || !value.contains("dtype") || !value.contains("shape") || !value.contains("data_offsets")) {
      return bad("needs dtype, shape and data_offsets");
    }
    Entry e;
    if (!value["dtype"].is_string()) return bad("dtype is not a string");
    e.dtype = value["dtype"].get<std::string>();
    uint64_t elements = 1;
    if (!value["shape"].is_array()) return bad("shape is not a list");
    for (const auto& dim : value["shape"]) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (1ull << 40)) {
        return bad("shape holds something other than sizes below 2^40");
      }
      const uint64_t size = dim.get<uint64_t>();
      if (size != 0 && elements > (1ull << 62) / size) return bad("shape holds more than 2^62 elements");
      e.shape.push_back(static_cast<int64_t>(size));
      elements *= size;
    }
    const auto& offsets = value["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      return bad("data_offsets is not [begin, end]");
    }
    e.begin = offsets[0].get<uint64_t>();
    e.end = offsets[1].get<uint64_t>();
    if (e.begin > e.end || e.end > file.data_.size()) {
      return bad(absl::StrCat("bytes [", e.begin, ", ", e.end, ") are not inside the ", file.data_.size(),
                              "-byte data section"));
    }
    const uint64_t element_bytes = e.dtype == "F32" ? 4 : (e.dtype == "F16" || e.dtype == "BF16") ? 2 : 0;
    if (element_bytes != 0 && elements * element_bytes != e.end - e.begin) {
      return bad(absl::StrCat("shape ", ShapeText(e.shape), " of ", e.dtype, " needs ", elements * element_bytes,
                              " bytes; data_offsets give ", e.end - e.begin));
    }
    file.entries_[name] = std::move(e);
  }
  return file;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

absl::StatusOr<Tensor> SafetensorsFile::Read(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, " has no tensor '", name, "'"));
  const Entry& e = it->second;
  if (!shape.empty() && shape != e.shape) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", name, "' has shape ", ShapeText(e.shape),
                                                   "; ", ShapeText(shape), " expected"));
  }
  Tensor t;
  t.shape = e.shape;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(data_.data()) + e.begin;
  if (e.dtype == "F32") {
    t.values.resize((e.end - e.begin) / 4);
    DecodeRow(p, static_cast<int>(t.values.size()), RowDtype::kF32, t.values.data());
  } else if (e.dtype == "BF16" || e.dtype == "F16") {
    t.values.resize((e.end - e.begin) / 2);
    DecodeRow(p, static_cast<int>(t.values.size()), e.dtype == "BF16" ? RowDtype::kBf16 : RowDtype::kF16,
              t.values.data());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' is ", e.dtype, "; only F32, F16 and BF16 can be read"));
  }
  return t;
}

}  // namespace engram
