#include "engram/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engram/kernels/row_dtype.h"
#include "nlohmann/json.hpp"

namespace engram {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit

std::string ShapeText(const std::vector<int64_t>& shape) { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

// Bytes per element of the dtypes a safetensors file may hold; 0 for a name it does not define.
uint64_t ElementBytes(const std::string& dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "F8_E4M3" || dtype == "F8_E5M2" || dtype == "F8_E8M0" || dtype == "I8" || dtype == "U8" ||
      dtype == "BOOL") {
    return 1;
  }
  return 0;
}

absl::Status PreadAll(int fd, void* buffer, uint64_t bytes, uint64_t offset, const std::string& what) {
  auto* p = static_cast<uint8_t*>(buffer);
  while (bytes > 0) {
    const ssize_t n = pread(fd, p, std::min<uint64_t>(bytes, 1ull << 30), static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::DataLossError(absl::StrCat("reading ", what, ": ", std::strerror(errno)));
    if (n == 0) return absl::DataLossError(absl::StrCat("reading ", what, ": the file ends early"));
    p += n;
    bytes -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

class SafetensorsFile::Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { close(fd_); }
  int get() const { return fd_; }

 private:
  int fd_;
};

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  const int raw_fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (raw_fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  SafetensorsFile file;
  file.path_ = path;
  file.fd_ = std::make_shared<const Fd>(raw_fd);
  struct stat st {};
  if (fstat(raw_fd, &st) != 0) return absl::DataLossError(absl::StrCat("cannot stat ", path));
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8) return absl::DataLossError(absl::StrCat(path, " is too short to be a safetensors file"));
  uint8_t length[8];
  if (absl::Status s = PreadAll(raw_fd, length, 8, 0, path); !s.ok()) return s;
  uint64_t header_bytes = 0;
  for (int i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(length[i]) << (8 * i);
  if (header_bytes > file_bytes - 8 || header_bytes > kMaxHeaderBytes) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_bytes, " runs past the end of the ",
                                            file_bytes, "-byte file (or past the format's 100 MB limit)"));
  }
  std::string text(header_bytes, '\0');
  if (absl::Status s = PreadAll(raw_fd, text.data(), header_bytes, 8, path); !s.ok()) return s;
  file.data_start_ = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - file.data_start_;
  const nlohmann::json header = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
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
    const uint64_t element_bytes = ElementBytes(e.dtype);
    if (element_bytes == 0) return bad(absl::StrCat("dtype '", e.dtype, "' is not a safetensors dtype"));
    uint64_t elements = 1;
    if (!value["shape"].is_array()) return bad("shape is not a list");
    for (const auto& dim : value["shape"]) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (1ull << 40)) {
        return bad("shape holds something other than sizes below 2^40");
      }
      const uint64_t size = dim.get<uint64_t>();
      if (size != 0 && elements > (1ull << 60) / size) return bad("shape holds more than 2^60 elements");
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
    if (e.begin > e.end || e.end > data_bytes) {
      return bad(
          absl::StrCat("bytes [", e.begin, ", ", e.end, ") are not inside the ", data_bytes, "-byte data section"));
    }
    if (elements * element_bytes != e.end - e.begin) {
      return bad(absl::StrCat("shape ", ShapeText(e.shape), " of ", e.dtype, " needs ", elements * element_bytes,
                              " bytes; data_offsets give ", e.end - e.begin));
    }
    file.entries_[name] = std::move(e);
  }
  // No two tensors may share a byte.
  std::vector<std::pair<uint64_t, const std::string*>> starts;
  for (const auto& [name, e] : file.entries_) {
    if (e.end > e.begin) starts.emplace_back(e.begin, &name);
  }
  std::sort(starts.begin(), starts.end());
  for (size_t i = 1; i < starts.size(); ++i) {
    const Entry& previous = file.entries_.at(*starts[i - 1].second);
    if (previous.end > starts[i].first) {
      return absl::DataLossError(absl::StrCat(path, ": tensors '", *starts[i - 1].second, "' and '", *starts[i].second,
                                              "' overlap (bytes ", starts[i].first, " to ", previous.end,
                                              " of the data section)"));
    }
  }
  return file;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  return out;
}

absl::StatusOr<std::vector<uint8_t>> SafetensorsFile::ReadRange(const std::string& name, const Entry& e) const {
  std::vector<uint8_t> bytes(e.end - e.begin);
  if (absl::Status s = PreadAll(fd_->get(), bytes.data(), bytes.size(), data_start_ + e.begin,
                                absl::StrCat(path_, ": tensor '", name, "'"));
      !s.ok()) {
    return s;
  }
  return bytes;
}

absl::StatusOr<RawTensor> SafetensorsFile::ReadRaw(const std::string& name, const std::string& dtype,
                                                   const std::vector<int64_t>& shape) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, " has no tensor '", name, "'"));
  const Entry& e = it->second;
  if (!dtype.empty() && dtype != e.dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' is ", e.dtype, "; ", dtype, " expected"));
  }
  if (!shape.empty() && shape != e.shape) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", name, "' has shape ", ShapeText(e.shape), "; ",
                                                   ShapeText(shape), " expected"));
  }
  auto bytes = ReadRange(name, e);
  if (!bytes.ok()) return bytes.status();
  return RawTensor{e.dtype, e.shape, std::move(*bytes)};
}

absl::StatusOr<Tensor> SafetensorsFile::Read(const std::string& name, const std::vector<int64_t>& shape) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) return absl::NotFoundError(absl::StrCat(path_, " has no tensor '", name, "'"));
  const Entry& e = it->second;
  if (e.dtype != "F32" && e.dtype != "BF16" && e.dtype != "F16") {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' is ", e.dtype, "; only F32, F16 and BF16 read as numbers"));
  }
  auto raw = ReadRaw(name, "", shape);
  if (!raw.ok()) return raw.status();
  Tensor t;
  t.shape = e.shape;
  const RowDtype dtype = e.dtype == "F32" ? RowDtype::kF32 : e.dtype == "BF16" ? RowDtype::kBf16 : RowDtype::kF16;
  const size_t n = raw->bytes.size() / (dtype == RowDtype::kF32 ? 4 : 2);
  t.values.resize(n);
  // DecodeRow takes an int count: decode in pieces.
  constexpr size_t kPiece = 1 << 24;
  const size_t element_bytes = dtype == RowDtype::kF32 ? 4 : 2;
  for (size_t at = 0; at < n; at += kPiece) {
    const size_t count = std::min(kPiece, n - at);
    DecodeRow(raw->bytes.data() + at * element_bytes, static_cast<int>(count), dtype, t.values.data() + at);
  }
  return t;
}

}  // namespace engram
