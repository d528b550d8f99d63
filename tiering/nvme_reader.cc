#include "tiering/nvme_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tiering/block_checksums.h"
#include "tiering/worker_pool.h"

namespace engram {

struct NvmeReader::Extent {
  uint64_t offset = 0;    // block-aligned file offset
  uint32_t length = 0;    // block multiple
  uint32_t required = 0;  // bytes from offset that hold requested rows
  uint8_t* buf = nullptr;
  std::vector<uint32_t> members;  // indices into the caller's rows/dests
  int attempts = 0;
  const uint64_t* rows = nullptr;
  uint8_t* const* dests = nullptr;
};

namespace {

constexpr uint32_t kMaxRingEntries = 256;
constexpr int kMaxAttempts = 3;

// Block-aligned scratch reused by each thread across calls.
// Memory the kernel may still write into (buffers of reads left in flight by a failed io_uring
// wait): kept, never freed or reused, for the life of the process. Each thread parks at most
// kMaxAbandonedRings, so this stays small.
void ParkForever(void* p) {
  static std::mutex mu;
  static std::vector<void*>* parked = new std::vector<void*>();  // reachable: not a leak
  std::lock_guard<std::mutex> lock(mu);
  parked->push_back(p);
}

constexpr int kMaxAbandonedRings = 3;  // per thread; then it reads with pread

struct AlignedScratch {
  uint8_t* data = nullptr;
  size_t capacity = 0;  // bytes at data
  ~AlignedScratch() { std::free(data); }
  // Gives the buffer up without freeing it (the kernel may still write into it): it is parked for
  // the life of the process, and this thread gets a new one on its next call.
  void Abandon() {
    ParkForever(data);
    data = nullptr;
    capacity = 0;
  }
  uint8_t* Get(size_t bytes) {
    if (bytes > capacity) {
      std::free(data);
      capacity = std::max(bytes, capacity * 2);
      if (posix_memalign(reinterpret_cast<void**>(&data), 4096, capacity) != 0) {
        data = nullptr;
        capacity = 0;
      }
    }
    return data;
  }
};

struct ThreadRing {
  io_uring ring{};
  bool ready = false;
  bool failed = false;
  // The thread's scratch, registered with the ring as a fixed buffer (pinned once, not on every
  // read: O_DIRECT into an unregistered buffer pins its pages per read). Not registered when the
  // kernel refuses (e.g. RLIMIT_MEMLOCK); reads then use plain buffers.
  const uint8_t* fixed_base = nullptr;
  size_t fixed_bytes = 0;
  bool fixed_refused = false;
  ~ThreadRing() {
    if (ready) io_uring_queue_exit(&ring);
  }
  // Leaves the ring to the kernel (never closed, never reused: its late completions go nowhere);
  // the next Get sets up a new one, until this thread has given up kMaxAbandonedRings rings: from
  // then on it reads with pread (a ring that keeps failing is not worth a descriptor each time).
  int abandoned = 0;
  void Abandon() {
    ring = io_uring{};
    ready = false;
    fixed_base = nullptr;
    fixed_bytes = 0;
    fixed_refused = false;
    if (++abandoned >= kMaxAbandonedRings) failed = true;
  }
  io_uring* Get() {
    if (!ready && !failed) {
      // Only this thread submits to its ring, so completions can wait until it asks for them
      // (no interrupting task work per completion); kernels before 6.1 refuse the flags.
      if (io_uring_queue_init(kMaxRingEntries, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN) == 0 ||
          io_uring_queue_init(kMaxRingEntries, &ring, 0) == 0) {
        ready = true;
      } else {
        failed = true;
      }
    }
    return ready ? &ring : nullptr;
  }
  // Whether [base, base + bytes) is (now) this ring's fixed buffer 0.
  bool FixedBuffer(uint8_t* base, size_t bytes) {
    if (!ready || fixed_refused || base == nullptr) return false;
    if (fixed_base == base && fixed_bytes >= bytes) return true;
    if (fixed_base != nullptr) io_uring_unregister_buffers(&ring);  // the scratch grew and moved
    fixed_base = nullptr;
    fixed_bytes = 0;
    const iovec iov{base, bytes};
    if (io_uring_register_buffers(&ring, &iov, 1) != 0) {
      fixed_refused = true;
      return false;
    }
    fixed_base = base;
    fixed_bytes = bytes;
    return true;
  }
};

thread_local AlignedScratch tls_scratch;
thread_local ThreadRing tls_ring;

WorkerPool* SharedPreadPool() {
  static WorkerPool* pool = new WorkerPool(8);  // leaked on purpose: lives as long as the process
  return pool;
}

}  // namespace

absl::StatusOr<IoEngine> ParseIoEngine(absl::string_view text) {
  if (text == "auto") return IoEngine::kAuto;
  if (text == "io_uring") return IoEngine::kIoUring;
  if (text == "pread") return IoEngine::kPread;
  return absl::InvalidArgumentError(absl::StrCat("--nvme-io '", text, "' is not auto, io_uring or pread"));
}

absl::StatusOr<std::unique_ptr<NvmeReader>> NvmeReader::Open(const std::string& path, int64_t row_bytes,
                                                             uint64_t total_rows, const NvmeOptions& options,
                                                             std::string label, std::vector<uint64_t> block_checksums) {
  std::unique_ptr<NvmeReader> reader(new NvmeReader());
  reader->path_ = path;
  reader->label_ = std::move(label);
  reader->row_bytes_ = row_bytes;
  reader->total_rows_ = total_rows;
  reader->options_ = options;
  reader->options_.queue_depth = std::clamp<uint32_t>(options.queue_depth, 1, kMaxRingEntries);
  reader->fd_ = open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (reader->fd_ < 0 && errno == EINVAL) {  // a file system without O_DIRECT (tmpfs): page cache
    reader->direct_ = false;
    reader->fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  }
  if (reader->fd_ < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st {};
  if (fstat(reader->fd_, &st) != 0) {
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  reader->file_bytes_ = static_cast<uint64_t>(st.st_size);
  if (reader->file_bytes_ != total_rows * static_cast<uint64_t>(row_bytes)) {
    return absl::DataLossError(absl::StrCat(path, " has ", reader->file_bytes_, " bytes; the manifest says ",
                                            total_rows, " rows x ", row_bytes, " = ", total_rows * row_bytes));
  }
  if (!block_checksums.empty() && block_checksums.size() != ChecksumBlocks(reader->file_bytes_)) {
    return absl::DataLossError(absl::StrCat(path, " has ", ChecksumBlocks(reader->file_bytes_), " blocks but ",
                                            block_checksums.size(), " block checksums"));
  }
  reader->block_checksums_ = std::move(block_checksums);
  if (st.st_blksize > 4096 && st.st_blksize % 4096 == 0 && st.st_blksize <= 65536) {
    reader->block_bytes_ = static_cast<uint32_t>(st.st_blksize);
  }
  reader->options_.max_extent_bytes = std::max(reader->options_.max_extent_bytes, reader->block_bytes_);
  if (options.engine == IoEngine::kPread) {
    reader->engine_ = IoEngine::kPread;
  } else if (tls_ring.Get() != nullptr) {
    reader->engine_ = IoEngine::kIoUring;
  } else if (options.engine == IoEngine::kIoUring) {
    return absl::UnavailableError("io_uring cannot be set up here (kernel or seccomp refuses it); use --nvme-io pread");
  } else {
    reader->engine_ = IoEngine::kPread;
  }
  return reader;
}

NvmeReader::~NvmeReader() {
  if (fd_ >= 0) close(fd_);
}

absl::Status NvmeReader::ExtentError(const Extent& extent, const std::string& what) const {
  const uint64_t first_row = extent.rows[extent.members.front()];
  return absl::DataLossError(absl::StrCat("reading ", label_, " row ", first_row, " from ", path_, " at byte ",
                                          extent.offset, " (", extent.length, " bytes): ", what));
}

absl::Status NvmeReader::VerifyBlock(Extent& extent, uint64_t b, uint64_t row) {
  const uint64_t begin = b * kChecksumBlockBytes;
  const uint32_t bytes = static_cast<uint32_t>(std::min(kChecksumBlockBytes, file_bytes_ - begin));
  uint8_t* data = extent.buf + (begin - extent.offset);
  stats_.blocks_verified.fetch_add(1, std::memory_order_relaxed);
  if (BlockChecksum(data, bytes) == block_checksums_[b]) return absl::OkStatus();
  // Once more from the device, in case the bad bytes came from the transfer, not the medium: the
  // whole aligned unit the block sits in (O_DIRECT reads must be aligned to the device's blocks).
  const uint64_t unit_begin = begin / block_bytes_ * block_bytes_;
  thread_local AlignedScratch reread;
  uint8_t* again = reread.Get(block_bytes_);
  if (again == nullptr) return absl::ResourceExhaustedError("cannot allocate a block to read again");
  int64_t got;
  do {
    got = pread(fd_, again, block_bytes_, static_cast<off_t>(unit_begin));
  } while (got < 0 && errno == EINTR);
  if (got < 0) return ExtentError(extent, absl::StrCat("reading block ", b, " again: ", std::strerror(errno)));
  const uint64_t in_unit = begin - unit_begin;
  if (static_cast<uint64_t>(got) < in_unit + bytes) {
    return ExtentError(extent, absl::StrCat("reading block ", b, " again: short read of ", got, " bytes"));
  }
  if (options_.bytes_hook) options_.bytes_hook(unit_begin, again, static_cast<uint32_t>(got));
  if (BlockChecksum(again + in_unit, bytes) == block_checksums_[b]) {
    std::memcpy(data, again + in_unit, bytes);
    stats_.checksum_retries.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  }
  stats_.checksum_failures.fetch_add(1, std::memory_order_relaxed);
  const absl::Status error = absl::DataLossError(absl::StrCat(
      label_, " row ", row, ": block ", b, " of ", path_, " (bytes ", begin, "..", begin + bytes - 1,
      ") fails its checksum, read twice; the pack file is corrupt (engramctl pack verify names every bad block)"));
  bool first_report = false;
  {
    std::lock_guard<std::mutex> lock(reported_mu_);
    first_report = reported_blocks_.insert(b).second;
  }
  if (first_report && options_.on_corrupt_block) options_.on_corrupt_block(error);
  return error;
}

absl::Status NvmeReader::VerifyExtent(Extent& extent) {
  // Only the blocks requested rows lie in: an extent may span blocks no row of this call uses
  // (units larger than 4096 bytes), and a bad one of those must not fail rows elsewhere. Members
  // are in file order, so each block comes up once, in order.
  uint64_t next_unverified = 0;
  for (uint32_t i : extent.members) {
    const uint64_t row_begin = extent.rows[i] * static_cast<uint64_t>(row_bytes_);
    const uint64_t first = std::max(row_begin / kChecksumBlockBytes, next_unverified);
    const uint64_t last = (row_begin + static_cast<uint64_t>(row_bytes_) - 1) / kChecksumBlockBytes;
    for (uint64_t b = first; b <= last; ++b) {
      if (absl::Status s = VerifyBlock(extent, b, extent.rows[i]); !s.ok()) return s;
    }
    next_unverified = std::max(next_unverified, last + 1);
  }
  return absl::OkStatus();
}

absl::Status NvmeReader::FinishExtent(Extent& extent, int64_t result) {
  if (options_.fault_hook) result = options_.fault_hook(extent.offset, extent.length, result);
  if (result < 0) return ExtentError(extent, std::strerror(static_cast<int>(-result)));
  // With checksums, the last requested row's whole block must have arrived to be checked.
  const uint64_t needed = block_checksums_.empty()
                              ? extent.required
                              : std::min<uint64_t>((extent.offset + extent.required + kChecksumBlockBytes - 1) /
                                                       kChecksumBlockBytes * kChecksumBlockBytes,
                                                   file_bytes_) -
                                    extent.offset;
  if (result < static_cast<int64_t>(needed)) {
    return absl::OutOfRangeError(absl::StrCat("short read: ", result, " of ", needed, " bytes"));
  }
  if (options_.bytes_hook) options_.bytes_hook(extent.offset, extent.buf, static_cast<uint32_t>(result));
  if (!block_checksums_.empty()) {
    if (absl::Status s = VerifyExtent(extent); !s.ok()) return s;
  }
  for (uint32_t i : extent.members) {
    std::memcpy(extent.dests[i], extent.buf + (extent.rows[i] * row_bytes_ - extent.offset),
                static_cast<size_t>(row_bytes_));
  }
  stats_.reads.fetch_add(1, std::memory_order_relaxed);
  stats_.bytes.fetch_add(static_cast<uint64_t>(result), std::memory_order_relaxed);
  stats_.rows.fetch_add(extent.members.size(), std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::Status NvmeReader::Read(absl::Span<const uint64_t> rows, absl::Span<uint8_t* const> dests,
                              const std::function<void()>& while_in_flight, uint32_t max_in_flight) {
  if (rows.empty()) {
    if (while_in_flight) while_in_flight();
    return absl::OkStatus();
  }
  // Extents: rows in file order; a row joins the current extent when it shares a block with it
  // or starts in the next block and the extent stays within max_extent_bytes.
  std::vector<uint32_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return rows[a] < rows[b]; });
  const uint64_t block = block_bytes_;
  std::vector<Extent> extents;
  for (uint32_t i : order) {
    const uint64_t begin = rows[i] * static_cast<uint64_t>(row_bytes_);
    const uint64_t end = begin + static_cast<uint64_t>(row_bytes_);
    const uint64_t aligned_begin = begin / block * block;
    const uint64_t aligned_end = (end + block - 1) / block * block;
    if (!extents.empty()) {
      Extent& cur = extents.back();
      const uint64_t cur_end = cur.offset + cur.length;
      if (aligned_begin < cur_end ||
          (aligned_begin == cur_end && aligned_end - cur.offset <= options_.max_extent_bytes)) {
        cur.length = static_cast<uint32_t>(std::max(cur_end, aligned_end) - cur.offset);
        cur.required = static_cast<uint32_t>(std::max<uint64_t>(cur.required, end - cur.offset));
        cur.members.push_back(i);
        continue;
      }
    }
    Extent e;
    e.offset = aligned_begin;
    e.length = static_cast<uint32_t>(aligned_end - aligned_begin);
    e.required = static_cast<uint32_t>(end - aligned_begin);
    e.members.push_back(i);
    e.rows = rows.data();
    e.dests = dests.data();
    extents.push_back(std::move(e));
  }
  size_t total = 0;
  for (const auto& e : extents) total += e.length;
  uint8_t* scratch = tls_scratch.Get(total);
  if (scratch == nullptr)
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", total, " bytes of I/O buffers"));
  for (auto& e : extents) {
    e.buf = scratch;
    scratch += e.length;
  }
  const uint32_t depth = max_in_flight > 0 ? std::min(max_in_flight, options_.queue_depth) : options_.queue_depth;
  absl::Status s;
  if (engine_ == IoEngine::kIoUring) {
    s = ReadUring(extents, while_in_flight, depth);
  } else {
    // pread blocks, so the caller's other work (copying its cache hits) runs first. It must run
    // on every path: a caller counts on it to fill the dests the reads do not.
    if (while_in_flight) while_in_flight();
    s = ReadPread(extents);
  }
  if (!s.ok()) stats_.errors.fetch_add(1, std::memory_order_relaxed);
  return s;
}

absl::Status NvmeReader::ReadUring(std::vector<Extent>& extents, const std::function<void()>& while_in_flight,
                                   uint32_t queue_depth) {
  io_uring* ring = tls_ring.Get();
  if (ring == nullptr) {  // this thread could not get a ring: do the work synchronously
    if (while_in_flight) while_in_flight();
    return ReadPread(extents);
  }
  const bool fixed = tls_ring.FixedBuffer(tls_scratch.data, tls_scratch.capacity);  // holds every extent's buf
  size_t next = 0;
  uint32_t in_flight = 0;
  absl::Status first_error;
  // The ring never holds more than queue_depth <= its size entries, so a sqe is always free (the
  // check below is for the impossible case, which then fails the request like a failed wait).
  bool no_sqe = false;
  auto submit = [&](size_t index) {
    Extent& e = extents[index];
    io_uring_sqe* sqe = io_uring_get_sqe(ring);
    if (sqe == nullptr) {
      no_sqe = true;
      return;
    }
    if (fixed) {
      io_uring_prep_read_fixed(sqe, fd_, e.buf, e.length, e.offset, /*buf_index=*/0);
    } else {
      io_uring_prep_read(sqe, fd_, e.buf, e.length, e.offset);
    }
    io_uring_sqe_set_data(sqe, reinterpret_cast<void*>(index));
    ++e.attempts;
    ++in_flight;
  };
  // A failed submit or wait with reads possibly in flight: the kernel may still write into this
  // call's buffers, and late completions would reach the next request on this thread. Neither may
  // happen, so this thread gives up its ring and its scratch (both left to the kernel, never
  // reused) and sets up new ones on its next call.
  auto abandon = [&](const char* what, int rc) {
    tls_ring.Abandon();
    tls_scratch.Abandon();
    stats_.rings_abandoned.fetch_add(1, std::memory_order_relaxed);
    if (!first_error.ok()) return first_error;  // the more telling error, if a read had failed
    return absl::InternalError(absl::StrCat("io_uring ", what, " failed with reads in flight (", std::strerror(-rc),
                                            "); the request fails and its ring is replaced"));
  };
  while (next < extents.size() && in_flight < queue_depth && !no_sqe) submit(next++);
  if (no_sqe) {
    if (while_in_flight) while_in_flight();
    return abandon("get_sqe", -EBUSY);
  }
  if (const int rc = io_uring_submit(ring); rc < 0) {
    if (while_in_flight) while_in_flight();
    return abandon("submit", rc);
  }
  // A partial submit leaves the rest in the submission queue: the next round submits it.
  bool pending_submit = io_uring_sq_ready(ring) > 0;
  if (while_in_flight) while_in_flight();
  // Each round: wait for at least one completion and take every completion that is ready; refill
  // the queue and submit at once, so the device never waits while this thread checks and copies
  // what came back (1.10x reads/s at one request in flight, measured in bench/RESULTS.md); then
  // finish the completed reads. A short read's retry waits for the next round's refill (ahead of
  // new reads), so the queue never holds more than queue_depth.
  constexpr unsigned kReap = 64;
  std::vector<size_t> retries;
  io_uring_cqe* cqes[kReap];
  struct Done {
    size_t index;
    int64_t result;
  };
  Done done[kReap];
  while (in_flight > 0 || !retries.empty()) {
    unsigned ready = 0;  // none while only retries are left to send
    if (in_flight > 0) {
      int rc = pending_submit ? io_uring_submit_and_wait(ring, 1) : io_uring_wait_cqe(ring, &cqes[0]);
      if (options_.uring_wait_hook) rc = options_.uring_wait_hook(rc);
      if (rc == -EINTR) continue;  // a signal: pending_submit stays, the retry submits what is left
      if (rc < 0) return abandon("wait", rc);
      ready = io_uring_peek_batch_cqe(ring, cqes, kReap);
    }
    for (unsigned c = 0; c < ready; ++c) {
      done[c] = {reinterpret_cast<size_t>(io_uring_cqe_get_data(cqes[c])), cqes[c]->res};
    }
    io_uring_cq_advance(ring, ready);
    in_flight -= ready;
    while (first_error.ok() && !retries.empty() && in_flight < queue_depth) {
      submit(retries.back());
      retries.pop_back();
      if (no_sqe) return abandon("get_sqe", -EBUSY);
    }
    while (first_error.ok() && next < extents.size() && in_flight < queue_depth) {
      submit(next++);
      if (no_sqe) return abandon("get_sqe", -EBUSY);
    }
    if (!first_error.ok()) retries.clear();
    if (io_uring_sq_ready(ring) > 0) {
      // A transient refusal leaves the entries queued: the next round's submit_and_wait sends them.
      const int sub = io_uring_submit(ring);
      if (sub < 0 && sub != -EINTR && sub != -EAGAIN && sub != -EBUSY) return abandon("submit", sub);
    }
    pending_submit = io_uring_sq_ready(ring) > 0;  // what a partial submit left for the next round
    for (unsigned c = 0; c < ready; ++c) {
      if (!first_error.ok()) continue;  // drain: buffers stay in use until every read is back
      Extent& e = extents[done[c].index];
      absl::Status s = FinishExtent(e, done[c].result);
      if (s.code() == absl::StatusCode::kOutOfRange) {
        if (e.attempts < kMaxAttempts) {
          stats_.retries.fetch_add(1, std::memory_order_relaxed);
          retries.push_back(done[c].index);
          continue;
        }
        s = ExtentError(e, absl::StrCat(s.message(), " after ", e.attempts, " attempts"));
      }
      if (!s.ok()) first_error = s;
    }
  }
  return first_error;
}

absl::Status NvmeReader::ReadPread(std::vector<Extent>& extents) {
  std::mutex mu;
  absl::Status first_error;
  auto one = [&](int index) {
    Extent& e = extents[index];
    absl::Status s;
    for (e.attempts = 1;; ++e.attempts) {
      int64_t got;
      do {
        got = pread(fd_, e.buf, e.length, static_cast<off_t>(e.offset));
      } while (got < 0 && errno == EINTR);
      s = FinishExtent(e, got < 0 ? -errno : got);
      if (s.code() != absl::StatusCode::kOutOfRange) break;
      if (e.attempts >= kMaxAttempts) {
        s = ExtentError(e, absl::StrCat(s.message(), " after ", e.attempts, " attempts"));
        break;
      }
      stats_.retries.fetch_add(1, std::memory_order_relaxed);
    }
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      if (first_error.ok()) first_error = s;
    }
  };
  if (extents.size() == 1) {
    one(0);
  } else {
    SharedPreadPool()->ParallelFor(static_cast<int>(extents.size()), one);
  }
  return first_error;
}

}  // namespace engram
