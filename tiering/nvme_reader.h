// NvmeReader: reads rows of one layer file straight from the device with O_DIRECT, through
// io_uring (a ring per thread, at most `queue_depth` reads in flight) or, where io_uring cannot
// be set up, a pool of pread threads. Rows are turned into block-aligned extents; rows that share
// a block, or sit in adjacent blocks, are read by one request. A failed or short read fails the
// whole call with DataLoss naming the table, layer, row and file; no row of a failed extent is
// copied out. Thread-safe: any number of threads may call Read concurrently.
#ifndef ENGRAM_TIERING_NVME_READER_H_
#define ENGRAM_TIERING_NVME_READER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

enum class IoEngine { kAuto, kIoUring, kPread };
absl::StatusOr<IoEngine> ParseIoEngine(absl::string_view text);

struct NvmeOptions {
  uint32_t queue_depth = 64;       // reads in flight per calling thread
  IoEngine engine = IoEngine::kAuto;
  uint32_t max_extent_bytes = 64 << 10;  // adjacent blocks are merged up to this size
  // Test hook: sees each completed read (file offset, length asked, result) and may change the
  // result (a negative errno, or fewer bytes). Empty in production.
  std::function<int64_t(uint64_t offset, uint32_t length, int64_t result)> fault_hook;
};

struct NvmeStats {
  std::atomic<uint64_t> reads{0};       // extents read
  std::atomic<uint64_t> bytes{0};       // bytes read from the device
  std::atomic<uint64_t> rows{0};        // rows delivered
  std::atomic<uint64_t> retries{0};     // short reads re-issued
  std::atomic<uint64_t> errors{0};      // calls failed with DataLoss
};

class NvmeReader {
 public:
  // `label` names the table and layer in errors ("table 'demo' layer 1").
  static absl::StatusOr<std::unique_ptr<NvmeReader>> Open(const std::string& path, int64_t row_bytes,
                                                          uint64_t total_rows, const NvmeOptions& options,
                                                          std::string label);
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
};

}  // namespace engram

#endif  // ENGRAM_TIERING_NVME_READER_H_
