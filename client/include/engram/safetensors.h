// Reading tensors from a safetensors file (8-byte little-endian header length, a JSON header
// naming each tensor's dtype, shape and byte range, then the data). Open reads and checks only the
// header: every tensor's dtype is known, its byte range is dtype x shape and lies inside the file,
// and no two ranges overlap; a bad file is DataLoss naming the tensor or the field. Tensors are then
// read one at a time with ranged reads, so a 100 GB shard costs only the tensors asked for.
// F32, F16 and BF16 tensors read as f32 (Read); any tensor, including F8_E4M3 and F8_E8M0, reads
// as its raw little-endian bytes (ReadRaw). Copies share the open file; thread-compatible.
#ifndef ENGRAM_CLIENT_SAFETENSORS_H_
#define ENGRAM_CLIENT_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> values;  // row-major
};

struct RawTensor {
  std::string dtype;  // F32, F16, BF16, F8_E4M3, F8_E8M0, ...
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // row-major, as stored
};

class SafetensorsFile {
 public:
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  bool Has(const std::string& name) const { return entries_.count(name) > 0; }
  // The tensor as f32; NotFound when absent, InvalidArgument when its shape is not `shape`
  // (pass an empty `shape` to accept any) or its dtype is not F32/F16/BF16.
  absl::StatusOr<Tensor> Read(const std::string& name, const std::vector<int64_t>& shape = {}) const;
  // The tensor's bytes; InvalidArgument when its dtype is not `dtype` (empty: any) or its shape
  // is not `shape` (empty: any).
  absl::StatusOr<RawTensor> ReadRaw(const std::string& name, const std::string& dtype = "",
                                    const std::vector<int64_t>& shape = {}) const;
  std::vector<std::string> names() const;
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // into the data section
  };
  class Fd;
  absl::StatusOr<std::vector<uint8_t>> ReadRange(const std::string& name, const Entry& e) const;

  std::string path_;
  std::shared_ptr<const Fd> fd_;
  uint64_t data_start_ = 0;  // file offset of the data section
  std::map<std::string, Entry> entries_;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_SAFETENSORS_H_
