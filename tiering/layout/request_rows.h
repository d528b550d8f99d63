// The checks every lookup path applies to a request before touching a row, and the mapping of
// head-local indices to a layer's global rows. The daemon's engine, its shared-memory server
// (before it copies anything out of a client's arena) and a client gathering from a mapped table
// all call these, so a request is refused the same way, with the same message, wherever it runs.
// Pure functions; thread-safe.
#ifndef ENGRAM_TIERING_LAYOUT_REQUEST_ROWS_H_
#define ENGRAM_TIERING_LAYOUT_REQUEST_ROWS_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

// num_tokens >= 1; num_tokens x heads within max_batch_rows (ResourceExhausted); index_count ==
// num_tokens x heads (InvalidArgument, in bytes as the wire carries them). Overflow-safe.
absl::Status CheckRequestShape(uint32_t num_tokens, uint64_t heads, uint64_t index_count, uint64_t max_batch_rows);

// CheckRequestShape, then every index against its head's size (the first offender named), then
// rows[i] = head_offset[h] + indices[i] for indices [num_tokens][heads].
absl::Status ResolveHeadIndices(const LayerHashLayout& layout, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                uint64_t max_batch_rows, std::vector<uint64_t>* rows);

}  // namespace engram

#endif  // ENGRAM_TIERING_LAYOUT_REQUEST_ROWS_H_
