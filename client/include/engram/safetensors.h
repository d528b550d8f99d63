// Reading tensors from a safetensors file (8-byte little-endian header length, a JSON header
// naming each tensor's dtype, shape and byte range, then the data). Only what EngramLayer needs:
// F32, F16 and BF16 tensors, returned as f32. Every offset, size and shape in the header is checked
// against the file before use; a bad file is DataLoss naming the tensor or the field.
#ifndef ENGRAM_CLIENT_SAFETENSORS_H_
#define ENGRAM_CLIENT_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram {

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> values;  // row-major
};

class SafetensorsFile {
 public:
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  bool Has(const std::string& name) const { return entries_.count(name) > 0; }
  // The tensor as f32; NotFound when absent, InvalidArgument when its shape is not `shape`
  // (pass an empty `shape` to accept any).
  absl::StatusOr<Tensor> Read(const std::string& name, const std::vector<int64_t>& shape = {}) const;
  std::vector<std::string> names() const;

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;  // into data_
  };
  std::string path_;
  std::string data_;  // everything after the header
  std::map<std::string, Entry> entries_;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_SAFETENSORS_H_
