#include "tiering/dram_tier.h"

#include "tiering/memfd_seals.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engram/kernels/gather_host.h"
#include "xxhash.h"

namespace engram {
namespace {

constexpr uint64_t kHugePage = 2ull << 20;

// memfd names are limited to 249 bytes; the end of the path is the telling part.
std::string MemfdName(const std::string& path) {
  const size_t keep = 200;
  return absl::StrCat("engram-rows:", path.size() > keep ? path.substr(path.size() - keep) : path);
}

}  // namespace

absl::StatusOr<HostRegion> HostRegion::Allocate(uint64_t bytes) {
  HostRegion region;
  region.size_ = bytes;
  region.mapped_ = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (region.mapped_ == 0) region.mapped_ = kHugePage;
  void* p = mmap(nullptr, region.mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map ", bytes, " bytes of host memory: ", std::strerror(errno)));
  }
  madvise(p, region.mapped_, MADV_HUGEPAGE);  // advisory; fine if the kernel says no
  region.data_ = static_cast<uint8_t*>(p);
  return region;
}

absl::StatusOr<HostRegion> HostRegion::AllocateShared(uint64_t bytes, const std::string& name) {
  HostRegion region;
  region.size_ = bytes;
  region.mapped_ = std::max<uint64_t>((bytes + kHugePage - 1) / kHugePage * kHugePage, kHugePage);
  region.fd_ = memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (region.fd_ < 0) {
    return absl::ResourceExhaustedError(absl::StrCat("memfd_create(", name, "): ", std::strerror(errno)));
  }
  if (ftruncate(region.fd_, static_cast<off_t>(region.mapped_)) != 0) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot size shared memory ", name, " to ", region.mapped_, " bytes: ", std::strerror(errno)));
  }
  void* p = mmap(nullptr, region.mapped_, PROT_READ | PROT_WRITE, MAP_SHARED, region.fd_, 0);
  if (p == MAP_FAILED) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot map ", bytes, " bytes of shared memory ", name, ": ", std::strerror(errno)));
  }
  madvise(p, region.mapped_, MADV_HUGEPAGE);  // honoured when shmem THP is "advise" or better
  region.data_ = static_cast<uint8_t*>(p);
  return region;
}

absl::Status HostRegion::SealReadOnly() {
  if (fd_ >= 0) {
    // FUTURE_WRITE rather than WRITE: it refuses every new writable mapping and write() while our
    // own mapping stays, and F_SEAL_WRITE would wait on page references the load may still hold.
    // A kernel without it (before 5.1) cannot seal: then the rows are not shared at all.
    if (fcntl(fd_, F_ADD_SEALS, F_SEAL_FUTURE_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      close(fd_);
      fd_ = -1;
    }
  }
  mprotect(data_, mapped_, PROT_READ);  // a stray write of ours faults
  return absl::OkStatus();
}

HostRegion::HostRegion(HostRegion&& other) noexcept { *this = std::move(other); }

HostRegion& HostRegion::operator=(HostRegion&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) munmap(data_, mapped_);
    if (fd_ >= 0) close(fd_);
    data_ = other.data_;
    size_ = other.size_;
    mapped_ = other.mapped_;
    fd_ = other.fd_;
    other.data_ = nullptr;
    other.size_ = other.mapped_ = 0;
    other.fd_ = -1;
  }
  return *this;
}

HostRegion::~HostRegion() {
  if (data_ != nullptr) munmap(data_, mapped_);
  if (fd_ >= 0) close(fd_);
}

absl::StatusOr<std::unique_ptr<DramResidentTier>> DramResidentTier::Load(
    const std::string& path, uint64_t total_rows, int64_t row_bytes,
    const std::string& expected_xxh3_hex, bool shareable) {
  const uint64_t bytes = total_rows * static_cast<uint64_t>(row_bytes);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != bytes) {
    close(fd);
    return absl::DataLossError(absl::StrCat(path, " has ", st.st_size, " bytes; the manifest says ",
                                            total_rows, " rows x ", row_bytes, " = ", bytes));
  }
  // A memfd that cannot be made (seccomp, an old kernel) is no reason to refuse the table: the
  // rows go to private memory and the table is simply not shared (its start-up line says so).
  absl::StatusOr<HostRegion> region = absl::UnavailableError("not shared");
  if (shareable) region = HostRegion::AllocateShared(bytes, MemfdName(path));
  if (!region.ok()) region = HostRegion::Allocate(bytes);
  if (!region.ok()) {
    close(fd);
    return region.status();
  }
  XXH3_state_t* hash_state = XXH3_createState();
  XXH3_64bits_reset(hash_state);
  uint64_t done = 0;
  while (done < bytes) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(bytes - done, 64ull << 20));
    const ssize_t got = pread(fd, region->data() + done, want, static_cast<off_t>(done));
    if (got <= 0) {
      const int err = errno;
      XXH3_freeState(hash_state);
      close(fd);
      return absl::DataLossError(absl::StrCat("reading ", path, " at byte ", done, ": ",
                                              got == 0 ? "unexpected end of file" : std::strerror(err)));
    }
    XXH3_64bits_update(hash_state, region->data() + done, static_cast<size_t>(got));
    done += static_cast<uint64_t>(got);
  }
  close(fd);
  const uint64_t digest = XXH3_64bits_digest(hash_state);
  XXH3_freeState(hash_state);
  if (!expected_xxh3_hex.empty()) {
    const std::string actual = absl::StrFormat("%016x", digest);
    if (actual != expected_xxh3_hex) {
      return absl::DataLossError(absl::StrCat(path, " is corrupt: xxh3_64 is ", actual,
                                              ", the manifest says ", expected_xxh3_hex));
    }
  }
  if (absl::Status s = region->SealReadOnly(); !s.ok()) return s;
  return std::unique_ptr<DramResidentTier>(
      new DramResidentTier(std::move(*region), total_rows, row_bytes));
}

void GatherRows(const uint8_t* base, int64_t row_bytes, absl::Span<const uint64_t> rows,
                absl::Span<uint8_t* const> dests) {
  kernels::GatherRowsHost(
      base, static_cast<uint64_t>(row_bytes), rows.size(), [&](size_t i) { return rows[i]; },
      [&](size_t i) { return dests[i]; });
}

absl::Status DramResidentTier::ReadRows(absl::Span<const uint64_t> rows,
                                        absl::Span<uint8_t* const> dests, TierCounts* counts) {
  GatherRows(region_.data(), row_bytes_, rows, dests);
  counts->rows[static_cast<int>(TierKind::kDram)] += rows.size();
  return absl::OkStatus();
}

}  // namespace engram
