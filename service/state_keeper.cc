#include "service/state_keeper.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "service/log.h"

namespace engram {
namespace {

constexpr char kRunningMarker[] = "engramd.running";

std::string Errno() { return std::strerror(errno); }

}  // namespace

StateKeeper::StateKeeper(std::string dir, uint64_t min_free_bytes)
    : dir_(std::move(dir)), min_free_bytes_(min_free_bytes) {}

StateKeeper::~StateKeeper() = default;

absl::Status StateKeeper::CheckWritable(const std::string& dir, uint64_t min_free_bytes) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::FailedPreconditionError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  struct statvfs vfs {};
  if (statvfs(dir.c_str(), &vfs) != 0)
    return absl::FailedPreconditionError(absl::StrCat("statvfs ", dir, ": ", Errno()));
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  if (free_bytes < min_free_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(dir, " has ", free_bytes, " bytes free, below the ",
                                                     min_free_bytes, " the state store needs (--state-min-free)"));
  }
  // Root ignores permission bits: only writing shows a read-only mount or an immutable directory.
  const std::string probe = dir + "/.engramd-write-probe";
  const int fd = open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::FailedPreconditionError(absl::StrCat(dir, " is not writable: ", Errno()));
  const char byte = 0;
  const bool ok = write(fd, &byte, 1) == 1 && fsync(fd) == 0;
  const std::string why = ok ? "" : Errno();
  close(fd);
  unlink(probe.c_str());
  if (!ok) return absl::FailedPreconditionError(absl::StrCat(dir, " does not take writes: ", why));
  return absl::OkStatus();
}

bool StateKeeper::Open(bool at_start) {
  if (absl::Status s = CheckWritable(dir_, min_free_bytes_); !s.ok()) {
    if (at_start) {
      LogWarn("state_dir_unusable", {{"dir", dir_},
                                     {"error", std::string(s.message())},
                                     {"action", "starting cold; snapshots start once the directory takes writes"}});
    }
    return false;
  }
  auto opened = StateStore::Open(dir_);
  if (!opened.ok() && opened.status().code() == absl::StatusCode::kDataLoss) {
    // Move it aside (never delete: it may be worth a look), then start a fresh one.
    const std::string aside = absl::StrCat(
        dir_, ".corrupt-",
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count());
    std::error_code ec;
    std::filesystem::rename(dir_, aside, ec);
    if (ec) {  // a mount point cannot be renamed: move what is in it into a folder inside
      const std::string inside = absl::StrCat(dir_, "/", std::filesystem::path(aside).filename().string());
      std::filesystem::create_directories(inside, ec);
      for (const auto& entry : std::filesystem::directory_iterator(dir_, ec)) {
        if (entry.path().filename().string().find(".corrupt-") != std::string::npos) continue;  // this and earlier ones
        std::filesystem::rename(entry.path(), std::filesystem::path(inside) / entry.path().filename(), ec);
      }
      LogWarn("state_store_moved_aside",
              {{"dir", dir_}, {"to", inside}, {"error", std::string(opened.status().message())}});
    } else {
      LogWarn("state_store_moved_aside",
              {{"dir", dir_}, {"to", aside}, {"error", std::string(opened.status().message())}});
    }
    opened = StateStore::Open(dir_);
  }
  if (!opened.ok()) {
    LogWarn("state_store_unavailable",
            {{"dir", dir_}, {"error", std::string(opened.status().message())}, {"action", "running without state"}});
    return false;
  }
  store_ = std::move(*opened);
  return true;
}

void StateKeeper::Start() {
  const std::string marker = dir_ + "/" + kRunningMarker;
  if (std::ifstream in(marker); in) {
    std::string pid;
    std::getline(in, pid);
    LogWarn(
        "unclean_shutdown",
        {{"dir", dir_}, {"previous_pid", pid}, {"note", "the last engramd with this state dir did not stop cleanly"}});
  }
  if (!Open(/*at_start=*/true)) return;
  std::ofstream out(marker, std::ios::trunc);
  out << getpid() << "\n";
  marker_written_ = static_cast<bool>(out);
}

StateStore* StateKeeper::ForWrite() {
  absl::Status writable = CheckWritable(dir_, min_free_bytes_);
  if (!writable.ok()) {
    if (!paused_logged_) {
      LogWarn("state_snapshots_paused", {{"dir", dir_}, {"error", std::string(writable.message())}});
      paused_logged_ = true;
    }
    return nullptr;
  }
  if (given_up_) return nullptr;
  if (store_ == nullptr && !Open(/*at_start=*/false)) return nullptr;
  if (paused_logged_) {
    LogInfo("state_snapshots_resumed", {{"dir", dir_}});
    paused_logged_ = false;
  }
  return store_.get();
}

void StateKeeper::Failed(const absl::Status& status) {
  LogWarn("state_store_failed",
          {{"dir", dir_},
           {"error", std::string(status.message())},
           {"action", "no more snapshots until engramd restarts (the store is left as it is, not closed)"}});
  if (store_ != nullptr) store_->Abandon();
  abandoned_.push_back(std::move(store_));
  given_up_ = true;
}

void StateKeeper::Stop() {
  // Closing writes; on a disk without room that could fail inside RocksDB, so then leave it be.
  if (store_ != nullptr && !CheckWritable(dir_, min_free_bytes_).ok()) store_->Abandon();
  store_.reset();
  if (marker_written_) unlink((dir_ + "/" + kRunningMarker).c_str());
}

}  // namespace engram
