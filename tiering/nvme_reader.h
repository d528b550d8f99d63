// NvmeReader: reads rows of one layer file straight from the device with O_DIRECT, through
// io_uring (a ring per thread, at most `queue_depth` reads in flight) or, where io_uring cannot
// be set up, a pool of pread threads. Rows are turned into block-aligned extents; rows that share
// a block, or sit in adjacent blocks, are read by one request. A failed or short read fails the
// whole call with DataLoss naming the table, layer, row and file; no row of a failed extent is
// copied out. When the pack has block checksums (tiering/block_checksums.h), every 4096-byte block
// a read brings in is checked before any byte of it is used: a block that fails is read once more,
// and if it fails again the call fails with DataLoss naming the table, layer, row, file and offset
// (counted in NvmeStats::checksum_failures, reported once per block through on_corrupt_block).
// Rows are copied out of the reader's own buffers only. Thread-safe: any number of threads may
// call Read concurrently.
#ifndef ENGRAM_TIERING_NVME_READER_H_
#define ENGRAM_TIERING_NVME_READER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

enum class IoEngine { kAuto, kIoUring, kPread };
absl::StatusOr<IoEngine> ParseIoEngine(absl::string_view text);

struct NvmeOptions {
  uint32_t queue_depth = 64;  // reads in flight per calling thread
  IoEngine engine = IoEngine::kAuto;
  uint32_t max_extent_bytes = 64 << 10;  // adjacent blocks are merged up to this size
  // Test hook: sees each completed read (file offset, length asked, result) and may change the
  // result (a negative errno, or fewer bytes). Empty in production.
  std::function<int64_t(uint64_t offset, uint32_t length, int64_t result)> fault_hook;
  // Test hook: sees each completed read's bytes (file offset, buffer, bytes read) and may change
  // them, as a device returning rotten data would. Empty in production.
  std::function<void(uint64_t offset, uint8_t* data, uint32_t bytes)> bytes_hook;
  // Test hook: may replace the result of each io_uring wait (a negative errno fails it).
  std::function<int(int result)> uring_wait_hook;
  // Hears each block that failed its checksum twice, once per block (engramd logs it).
  std::function<void(const absl::Status& what)> on_corrupt_block;
};

struct NvmeStats {
  std::atomic<uint64_t> reads{0};              // extents read
  std::atomic<uint64_t> bytes{0};              // bytes read from the device
  std::atomic<uint64_t> rows{0};               // rows delivered
  std::atomic<uint64_t> retries{0};            // short reads re-issued
  std::atomic<uint64_t> errors{0};             // calls failed with DataLoss
  std::atomic<uint64_t> blocks_verified{0};    // blocks checked against their checksums
  std::atomic<uint64_t> checksum_retries{0};   // blocks that failed, then passed when read again
  std::atomic<uint64_t> checksum_failures{0};  // blocks that failed twice (their requests: DataLoss)
  std::atomic<uint64_t> rings_abandoned{0};    // io_uring waits that failed with reads in flight
};

class NvmeReader {
 public:
  // `label` names the table and layer in errors ("table 'demo' layer 1").
  static absl::StatusOr<std::unique_ptr<NvmeReader>> Open(const std::string& path, int64_t row_bytes,
                                                          uint64_t total_rows, const NvmeOptions& options,
                                                          std::string label,
                                                          std::vector<uint64_t> block_checksums = {});
  ~NvmeReader();

  // Copies rows[i] to dests[i]. `while_in_flight`, if set, runs once the first reads are
  // submitted (io_uring) so the caller can do other work, e.g. copy cache hits.
  // REQUIRES: rows < total_rows.
  // `max_in_flight` (if non-zero) lowers the queue depth for this call: background prefetch uses
  // it to leave the device to demand reads.
  absl::Status Read(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests,
                    const std::function<void()>& while_in_flight = nullptr, uint32_t max_in_flight = 0);

  IoEngine engine() const { return engine_; }
  uint64_t total_rows() const { return total_rows_; }
  int64_t row_bytes() const { return row_bytes_; }
  const std::string& path() const { return path_; }
  absl::string_view engine_name() const { return engine_ == IoEngine::kIoUring ? "io_uring" : "pread"; }
  bool direct() const { return direct_; }
  // True when every block read is checked against the pack's block checksums.
  bool verified() const { return !block_checksums_.empty(); }
  // Bytes of memory the block checksums take.
  uint64_t checksum_bytes() const { return block_checksums_.size() * sizeof(uint64_t); }
  const NvmeStats& stats() const { return stats_; }

 private:
  struct Extent;
  NvmeReader() = default;
  absl::Status ReadUring(std::vector<Extent>& extents, const std::function<void()>& while_in_flight,
                         uint32_t queue_depth);
  absl::Status ReadPread(std::vector<Extent>& extents);
  // Checks a completed extent and copies its rows out; DataLoss if it came back short or failed.
  absl::Status FinishExtent(Extent& extent, int64_t result);
  absl::Status ExtentError(const Extent& extent, const std::string& what) const;
  // Checks the blocks of a completed extent that hold requested rows; a failing block is read
  // once more into the extent's buffer. DataLoss when it fails again.
  absl::Status VerifyExtent(Extent& extent);
  // One block `b` of the extent (`row`: a requested row in it, for the error).
  absl::Status VerifyBlock(Extent& extent, uint64_t b, uint64_t row);

  std::string path_, label_;
  int fd_ = -1;
  bool direct_ = true;
  int64_t row_bytes_ = 0;
  uint64_t total_rows_ = 0;
  uint64_t file_bytes_ = 0;
  uint32_t block_bytes_ = 4096;
  NvmeOptions options_;
  IoEngine engine_ = IoEngine::kIoUring;
  NvmeStats stats_;
  std::vector<uint64_t> block_checksums_;  // empty: not verified
  std::mutex reported_mu_;
  absl::flat_hash_set<uint64_t> reported_blocks_ ABSL_GUARDED_BY(reported_mu_);  // logged once each
};

}  // namespace engram

#endif  // ENGRAM_TIERING_NVME_READER_H_
