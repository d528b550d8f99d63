#include "tiering/layout/request_rows.h"

#include "absl/strings/str_cat.h"

namespace engram {

absl::Status CheckRequestShape(uint32_t num_tokens, uint64_t heads, uint64_t index_count, uint64_t max_batch_rows) {
  if (num_tokens == 0) return absl::InvalidArgumentError("num_tokens must be at least 1");
  const uint64_t total = uint64_t{num_tokens} * heads;  // < 2^32 * heads: no overflow for any real head count
  if (total > max_batch_rows) {
    return absl::ResourceExhaustedError(absl::StrCat(num_tokens, " tokens x ", heads, " heads = ", total,
                                                     " rows exceeds the limit of ", max_batch_rows,
                                                     " rows per request"));
  }
  if (index_count != total) {
    return absl::InvalidArgumentError(absl::StrCat("indices hold ", index_count * 4, " bytes; ", num_tokens,
                                                   " tokens x ", heads, " heads x 4 bytes = ", total * 4, " expected"));
  }
  return absl::OkStatus();
}

absl::Status ResolveHeadIndices(const LayerHashLayout& layout, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                uint64_t max_batch_rows, std::vector<uint64_t>* rows) {
  const size_t heads = layout.head_rows.size();
  if (absl::Status s = CheckRequestShape(num_tokens, heads, indices.size(), max_batch_rows); !s.ok()) return s;
  rows->resize(indices.size());
  for (uint32_t t = 0; t < num_tokens; ++t) {
    for (size_t h = 0; h < heads; ++h) {
      const size_t i = static_cast<size_t>(t) * heads + h;
      const uint32_t idx = indices[i];
      if (idx >= static_cast<uint64_t>(layout.head_rows[h])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "index ", idx, " for token ", t, ", head ", h, " is out of range: head ", h, " of layer ", layout.layer_id,
            " has ", layout.head_rows[h], " rows (valid 0..", layout.head_rows[h] - 1, ")"));
      }
      (*rows)[i] = layout.head_offset[h] + idx;
    }
  }
  return absl::OkStatus();
}

}  // namespace engram
