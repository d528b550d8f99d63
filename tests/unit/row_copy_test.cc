// The row copy the CUDA gather and scatter kernels run (row_copy.h), on the host: every lane of
// a 32-lane warp run in turn must together write exactly the row, for the sizes engramd serves
// (1, 8, 264: V4.1's fp8 rows, 1032) and others, from aligned and misaligned buffers, and the word
// chosen must be the widest the alignment allows.
#include "engram/kernels/row_copy.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace engram::kernels {
namespace {

TEST(RowCopyTest, TheWidestWordTheRowsAndBuffersAllow) {
  const uintptr_t aligned = 4096;
  EXPECT_EQ(RowCopyWidth(264, aligned), 8);  // 16 x 16 + 8: every other row starts off 16
  EXPECT_EQ(RowCopyWidth(1032, aligned), 8);
  EXPECT_EQ(RowCopyWidth(256, aligned), 16);
  EXPECT_EQ(RowCopyWidth(128, aligned), 16);
  EXPECT_EQ(RowCopyWidth(8, aligned), 8);
  EXPECT_EQ(RowCopyWidth(1, aligned), 1);
  EXPECT_EQ(RowCopyWidth(6, aligned), 2);
  EXPECT_EQ(RowCopyWidth(12, aligned), 4);
  EXPECT_EQ(RowCopyWidth(256, aligned + 8), 8);  // a buffer's start limits it too
  EXPECT_EQ(RowCopyWidth(264, aligned | (aligned + 4)), 4);
  EXPECT_EQ(RowCopyWidth(264, aligned + 1), 1);
}

// Gathers `picks` of a table at `offset` from an aligned start, as the kernel does: one row per
// warp, each of the 32 lanes copying its words.
void ExpectWarpGatherEqualsMemcpy(int64_t row_bytes, int64_t offset) {
  const int64_t rows = 50;
  std::vector<uint8_t> table_store(rows * row_bytes + 32), out_store(rows * row_bytes + 32, 0xee);
  uint8_t* table = table_store.data() + (16 - reinterpret_cast<uintptr_t>(table_store.data()) % 16) % 16 + offset;
  uint8_t* out = out_store.data() + (16 - reinterpret_cast<uintptr_t>(out_store.data()) % 16) % 16 + offset;
  for (int64_t i = 0; i < rows * row_bytes; ++i) table[i] = static_cast<uint8_t>(i * 131 + 17);
  const std::vector<int64_t> picks = {0, 49, 7, 7, 1, 48, 0};
  const int width = RowCopyWidth(row_bytes, reinterpret_cast<uintptr_t>(table) | reinterpret_cast<uintptr_t>(out));
  for (size_t i = 0; i < picks.size(); ++i) {
    for (int lane = 0; lane < 32; ++lane) {
      CopyRowLaneAnyWidth(width, table + picks[i] * row_bytes, out + i * row_bytes, row_bytes, lane, 32);
    }
  }
  for (size_t i = 0; i < picks.size(); ++i) {
    ASSERT_EQ(0, std::memcmp(out + i * row_bytes, table + picks[i] * row_bytes, row_bytes))
        << row_bytes << "-byte rows at offset " << offset << " in " << width << "-byte words, row " << i;
  }
  // Nothing past the last row was written.
  EXPECT_EQ(out[picks.size() * row_bytes], 0xee);
}

TEST(RowCopyTest, A32LaneWarpCopiesEveryRowExactlyForEverySizeAndAlignment) {
  for (int64_t row_bytes : {1, 2, 3, 6, 8, 12, 128, 144, 256, 264, 1032, 1033}) {
    for (int64_t offset : {0, 1, 2, 4, 8}) ExpectWarpGatherEqualsMemcpy(row_bytes, offset);
  }
}

TEST(RowCopyTest, V41RowsGoAsEightByteWordsOverAllLanes) {
  // 264 bytes = 33 words of 8: lane 0 copies words 0 and 32, lanes 1..31 one word each.
  std::vector<uint64_t> src(33), dst(33, 0);
  for (int i = 0; i < 33; ++i) src[i] = 0x0101010101010101ull * (i + 1);
  const auto* s = reinterpret_cast<const uint8_t*>(src.data());
  auto* d = reinterpret_cast<uint8_t*>(dst.data());
  ASSERT_EQ(RowCopyWidth(264, reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d)), 8);
  CopyRowLane<8>(s, d, 264, 0, 32);
  EXPECT_EQ(dst[0], src[0]);
  EXPECT_EQ(dst[32], src[32]);
  EXPECT_EQ(dst[1], 0u);  // lane 1's word, not lane 0's
  for (int lane = 1; lane < 32; ++lane) CopyRowLane<8>(s, d, 264, lane, 32);
  EXPECT_EQ(src, dst);
}

}  // namespace
}  // namespace engram::kernels
