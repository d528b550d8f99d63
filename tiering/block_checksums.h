// Block checksums of a pack's row files: the xxh3_64 of every aligned 4096-byte block of
// `layer-<id>.rows` (the last block short), stored beside it as little-endian uint64 values in
// `layer-<id>.rows.xxh3` and named in the manifest (PackLayer::block_checksums_file, with that
// file's own xxh3_64). The NVMe tier checks every block it reads against them before any byte of
// it is used (tiering/nvme_reader.h). Plain functions and a streaming builder; no shared state.
#ifndef ENGRAM_TIERING_BLOCK_CHECKSUMS_H_
#define ENGRAM_TIERING_BLOCK_CHECKSUMS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

inline constexpr uint64_t kChecksumBlockBytes = 4096;

inline uint64_t ChecksumBlocks(uint64_t file_bytes) {
  return (file_bytes + kChecksumBlockBytes - 1) / kChecksumBlockBytes;
}
// "layer-1.rows" -> "layer-1.rows.xxh3".
std::string BlockChecksumFileName(const std::string& rows_file);

// xxh3_64 of one block's bytes.
uint64_t BlockChecksum(const uint8_t* data, size_t bytes);

// Feeds a row file's bytes in order (any chunking); Finish returns one checksum per block.
class BlockChecksumBuilder {
 public:
  void Update(const uint8_t* data, size_t bytes);
  std::vector<uint64_t> Finish();

 private:
  std::vector<uint64_t> sums_;
  std::vector<uint8_t> partial_;  // the start of a block not yet complete
};

// Reads `path` whole and returns its block checksums (for `pack checksum` and `pack verify`);
// `file_xxh3_hex`, when not null, receives the xxh3_64 of the whole file from the same pass.
absl::StatusOr<std::vector<uint64_t>> ComputeBlockChecksums(const std::string& path, std::string* file_xxh3_hex);

// Writes the checksum file atomically; returns its xxh3_64 (hex) for the manifest.
absl::StatusOr<std::string> WriteBlockChecksums(const std::string& path, absl::Span<const uint64_t> sums);

// Loads a checksum file, checking that it holds exactly the blocks of a `file_bytes`-byte row
// file and that its own xxh3_64 is `expected_hex`. DataLoss naming the file otherwise.
absl::StatusOr<std::vector<uint64_t>> LoadBlockChecksums(const std::string& path, uint64_t file_bytes,
                                                         const std::string& expected_hex);

}  // namespace engram

#endif  // ENGRAM_TIERING_BLOCK_CHECKSUMS_H_
