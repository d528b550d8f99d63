// Finds the distinct rows of one batch piece so each is read once (real text is Zipf-like: a
// batch repeats many rows). Build() gives the unique rows in first-seen order and, for every
// repeat, which unique row it copies. Not thread-safe; use one per thread (scratch is reused).
#ifndef ENGRAM_TIERING_BATCH_DEDUP_H_
#define ENGRAM_TIERING_BATCH_DEDUP_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace engram {

class BatchDedup {
 public:
  struct Repeat {
    uint32_t position;     // index into the input that repeats a row
    uint32_t unique_index; // index into unique_rows() it repeats
  };

  void Build(absl::Span<const uint64_t> rows);

  const std::vector<uint64_t>& unique_rows() const { return unique_rows_; }
  // Input position of each unique row's first occurrence.
  const std::vector<uint32_t>& first_positions() const { return first_positions_; }
  const std::vector<Repeat>& repeats() const { return repeats_; }

 private:
  std::vector<uint64_t> slot_keys_;
  std::vector<uint32_t> slot_values_;
  std::vector<uint64_t> unique_rows_;
  std::vector<uint32_t> first_positions_;
  std::vector<Repeat> repeats_;
};

// For every position of `rows`, the first position that holds the same row (its own for a first
// occurrence): what a gather needs to read each distinct row once and copy it to the rest (the
// client's device path). Cheaper than BatchDedup when only that is wanted. `scratch` is reused
// between calls; use one per thread.
struct FirstPositionScratch {
  std::vector<uint64_t> keys;
  std::vector<uint32_t> positions;
};
void FirstPositions(absl::Span<const uint64_t> rows, FirstPositionScratch* scratch, std::vector<uint32_t>* first);

}  // namespace engram

#endif  // ENGRAM_TIERING_BATCH_DEDUP_H_
