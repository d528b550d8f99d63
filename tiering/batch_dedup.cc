#include "tiering/batch_dedup.h"

#include <algorithm>
#include <bit>

namespace engram {
namespace {
constexpr uint64_t kEmpty = ~uint64_t{0};  // never a row number (rows < 2^40 per layer)
}  // namespace

void BatchDedup::Build(absl::Span<const uint64_t> rows) {
  unique_rows_.clear();
  first_positions_.clear();
  repeats_.clear();
  const size_t capacity = std::bit_ceil(std::max<size_t>(16, rows.size() * 2));
  const int shift = 64 - std::countr_zero(capacity);
  slot_keys_.assign(capacity, kEmpty);
  slot_values_.resize(capacity);
  const size_t mask = capacity - 1;
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint64_t row = rows[i];
    size_t slot = static_cast<size_t>((row * 0x9E3779B97F4A7C15ULL) >> shift);
    for (;;) {
      const uint64_t key = slot_keys_[slot];
      if (key == row) {
        repeats_.push_back({static_cast<uint32_t>(i), slot_values_[slot]});
        break;
      }
      if (key == kEmpty) {
        slot_keys_[slot] = row;
        slot_values_[slot] = static_cast<uint32_t>(unique_rows_.size());
        unique_rows_.push_back(row);
        first_positions_.push_back(static_cast<uint32_t>(i));
        break;
      }
      slot = (slot + 1) & mask;
    }
  }
}

void FirstPositions(absl::Span<const uint64_t> rows, FirstPositionScratch* scratch, std::vector<uint32_t>* first) {
  const size_t capacity = std::bit_ceil(std::max<size_t>(16, rows.size() * 2));
  const int shift = 64 - std::countr_zero(capacity);
  scratch->keys.assign(capacity, kEmpty);
  scratch->positions.resize(capacity);
  first->resize(rows.size());
  uint64_t* keys = scratch->keys.data();
  uint32_t* positions = scratch->positions.data();
  uint32_t* out = first->data();
  const size_t mask = capacity - 1;
  for (size_t i = 0; i < rows.size(); ++i) {
    const uint64_t row = rows[i];
    for (size_t slot = static_cast<size_t>((row * 0x9E3779B97F4A7C15ULL) >> shift);; slot = (slot + 1) & mask) {
      if (keys[slot] == row) {
        out[i] = positions[slot];
        break;
      }
      if (keys[slot] == kEmpty) {
        keys[slot] = row;
        positions[slot] = out[i] = static_cast<uint32_t>(i);
        break;
      }
    }
  }
}

}  // namespace engram
