#include "tiering/block_checksums.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "xxhash.h"

namespace engram {

std::string BlockChecksumFileName(const std::string& rows_file) { return rows_file + ".xxh3"; }

uint64_t BlockChecksum(const uint8_t* data, size_t bytes) { return XXH3_64bits(data, bytes); }

void BlockChecksumBuilder::Update(const uint8_t* data, size_t bytes) {
  if (!partial_.empty()) {
    const size_t take = std::min<size_t>(bytes, kChecksumBlockBytes - partial_.size());
    partial_.insert(partial_.end(), data, data + take);
    data += take;
    bytes -= take;
    if (partial_.size() < kChecksumBlockBytes) return;
    sums_.push_back(BlockChecksum(partial_.data(), partial_.size()));
    partial_.clear();
  }
  for (; bytes >= kChecksumBlockBytes; data += kChecksumBlockBytes, bytes -= kChecksumBlockBytes) {
    sums_.push_back(BlockChecksum(data, kChecksumBlockBytes));
  }
  partial_.assign(data, data + bytes);
}

std::vector<uint64_t> BlockChecksumBuilder::Finish() {
  if (!partial_.empty()) sums_.push_back(BlockChecksum(partial_.data(), partial_.size()));
  partial_.clear();
  return std::move(sums_);
}

absl::StatusOr<std::vector<uint64_t>> ComputeBlockChecksums(const std::string& path, std::string* file_xxh3_hex) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  BlockChecksumBuilder builder;
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  std::vector<uint8_t> buf(8 << 20);
  absl::Status error;
  for (;;) {
    const ssize_t got = read(fd, buf.data(), buf.size());
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      error = absl::DataLossError(absl::StrCat("reading ", path, ": ", std::strerror(errno)));
      break;
    }
    if (got == 0) break;
    builder.Update(buf.data(), static_cast<size_t>(got));
    XXH3_64bits_update(state, buf.data(), static_cast<size_t>(got));
  }
  close(fd);
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  if (!error.ok()) return error;
  if (file_xxh3_hex != nullptr) *file_xxh3_hex = absl::StrFormat("%016x", digest);
  return builder.Finish();
}

absl::StatusOr<std::string> WriteBlockChecksums(const std::string& path, absl::Span<const uint64_t> sums) {
  static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "checksum files are little-endian");
  const std::string tmp = path + ".tmp";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  const auto* p = reinterpret_cast<const uint8_t*>(sums.data());
  size_t left = sums.size() * sizeof(uint64_t);
  while (left > 0) {
    const ssize_t n = write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      close(fd);
      unlink(tmp.c_str());
      return absl::InternalError(absl::StrCat("writing ", tmp, ": ", std::strerror(err)));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  const bool synced = fsync(fd) == 0;
  const int sync_err = errno;
  close(fd);
  if (!synced || rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = synced ? errno : sync_err;
    unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("cannot write ", path, ": ", std::strerror(err)));
  }
  return absl::StrFormat("%016x", XXH3_64bits(sums.data(), sums.size() * sizeof(uint64_t)));
}

absl::StatusOr<std::vector<uint64_t>> LoadBlockChecksums(const std::string& path, uint64_t file_bytes,
                                                         const std::string& expected_hex) {
  const uint64_t blocks = ChecksumBlocks(file_bytes);
  std::error_code ec;
  const uint64_t have = std::filesystem::file_size(path, ec);
  if (ec) return absl::DataLossError(absl::StrCat("block checksums ", path, " cannot be read: ", ec.message()));
  if (have != blocks * sizeof(uint64_t)) {
    return absl::DataLossError(absl::StrCat("block checksums ", path, " hold ", have, " bytes; a ", file_bytes,
                                            "-byte row file has ", blocks, " blocks of ", kChecksumBlockBytes,
                                            " bytes = ", blocks * sizeof(uint64_t), " bytes of checksums"));
  }
  std::vector<uint64_t> sums(blocks);
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::DataLossError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  auto* p = reinterpret_cast<uint8_t*>(sums.data());
  size_t left = blocks * sizeof(uint64_t);
  while (left > 0) {
    const ssize_t n = read(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : EIO;
      close(fd);
      return absl::DataLossError(absl::StrCat("reading ", path, ": ", std::strerror(err)));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  close(fd);
  const std::string actual = absl::StrFormat("%016x", XXH3_64bits(sums.data(), sums.size() * sizeof(uint64_t)));
  if (actual != expected_hex) {
    return absl::DataLossError(absl::StrCat("block checksums ", path, " are corrupt: xxh3_64 is ", actual,
                                            ", the manifest says ", expected_hex));
  }
  return sums;
}

}  // namespace engram
