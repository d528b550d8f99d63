// DramResidentTier: a whole layer's rows held in host memory (huge pages where the kernel gives
// them), loaded once from the pack file and then read-only. ReadRows is a gather with software
// prefetch; safe from any number of threads.
#ifndef ENGRAM_TIERING_DRAM_TIER_H_
#define ENGRAM_TIERING_DRAM_TIER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"
#include "tiering/row_tier.h"

namespace engram {

// Host memory for rows, huge-page advised, released on destruction. Either an anonymous mapping
// (private to this process) or a memfd that other processes can map: after SealReadOnly the file
// can never again be written, shrunk or grown, so handing its descriptor to a client gives it
// read-only access and nothing more.
class HostRegion {
 public:
  static absl::StatusOr<HostRegion> Allocate(uint64_t bytes);
  // The same over a memfd named `name` (shown in /proc/PID/fd and /proc/PID/maps).
  static absl::StatusOr<HostRegion> AllocateShared(uint64_t bytes, const std::string& name);
  HostRegion() = default;
  HostRegion(HostRegion&& other) noexcept;
  HostRegion& operator=(HostRegion&& other) noexcept;
  ~HostRegion();

  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  uint64_t mapped_bytes() const { return mapped_; }
  // Makes the contents read-only from here on (a stray write faults). A shared region is also
  // sealed (F_SEAL_FUTURE_WRITE, SHRINK, GROW, SEAL): nobody can map it writable or resize it;
  // where the kernel cannot seal, the region stops being shared (fd() becomes -1).
  absl::Status SealReadOnly();
  // The memfd of a shared region, -1 for an anonymous one. Owned by the region.
  int fd() const { return fd_; }

 private:
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  uint64_t mapped_ = 0;
  int fd_ = -1;
};

class DramResidentTier final : public RowTier {
 public:
  // Reads `path` (exactly total_rows * row_bytes bytes) into memory. With `expected_xxh3_hex`
  // non-empty, the checksum must match (a corrupt pack is refused with DataLoss naming the file).
  // With `shareable`, the rows live in a sealed memfd that clients may map (see shared_fd), where
  // the kernel allows it; otherwise in private memory.
  static absl::StatusOr<std::unique_ptr<DramResidentTier>> Load(const std::string& path,
                                                                uint64_t total_rows,
                                                                int64_t row_bytes,
                                                                const std::string& expected_xxh3_hex,
                                                                bool shareable = false);

  absl::Status ReadRows(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests,
                        TierCounts* counts) override;
  uint64_t total_rows() const override { return total_rows_; }
  int64_t row_bytes() const override { return row_bytes_; }
  uint64_t resident_bytes() const override { return region_.size(); }
  bool dedup_saves_reads() const override { return false; }
  absl::string_view description() const override {
    return region_.fd() >= 0 ? "dram-resident-shared" : "dram-resident";
  }
  int shared_fd() const override { return region_.fd(); }
  const uint8_t* resident_rows() const override { return region_.data(); }

  const uint8_t* row(uint64_t r) const { return region_.data() + r * static_cast<uint64_t>(row_bytes_); }

 private:
  DramResidentTier(HostRegion region, uint64_t total_rows, int64_t row_bytes)
      : region_(std::move(region)), total_rows_(total_rows), row_bytes_(row_bytes) {}

  HostRegion region_;
  uint64_t total_rows_;
  int64_t row_bytes_;
};

// Copies rows with software prefetch a few rows ahead. Shared by tiers and the bench's ceiling.
void GatherRows(const uint8_t* base, int64_t row_bytes, absl::Span<const uint64_t> rows,
                absl::Span<uint8_t* const> dests);

}  // namespace engram

#endif  // ENGRAM_TIERING_DRAM_TIER_H_
