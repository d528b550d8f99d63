// ShmConnection: the handshake, the request and completion rings, control frames.
#include "engram/shm_connection.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/shm_internal.h"
#include "engram/client.h"
#include "engram/kernels/gather_host.h"
#include "engram/mapped_table.h"
#include "engram/shm_arena.h"
#include "engram/shm_socket.h"
#include "engram/v1/engram.pb.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;
using shm_internal::FdsCloser;
using shm_internal::NowNs;

absl::StatusOr<std::unique_ptr<ShmConnection>> ShmConnection::Connect(const std::string& path,
                                                                      const ShmConnectOptions& options) {
  // Speak the newest protocol; a daemon too old for it says so, and then the older ones are tried.
  absl::StatusOr<std::unique_ptr<ShmConnection>> c;
  for (uint32_t version = shm::kVersion; version >= shm::kMinVersion; --version) {
    c = ConnectVersion(path, options, version);
    if (c.ok() || c.status().code() != absl::StatusCode::kFailedPrecondition ||
        c.status().message().find("protocol version") == absl::string_view::npos) {
      break;
    }
  }
  return c;
}

absl::StatusOr<std::unique_ptr<ShmConnection>> ShmConnection::ConnectVersion(const std::string& path,
                                                                             const ShmConnectOptions& options,
                                                                             uint32_t version) {
  std::unique_ptr<ShmConnection> c(new ShmConnection());
  c->options_ = options;
  c->version_ = version;
  sockaddr_un addr{};
  if (path.size() >= sizeof(addr.sun_path)) return absl::InvalidArgumentError("socket path too long: " + path);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  c->sock_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->sock_ < 0) return absl::UnavailableError(absl::StrCat("socket(AF_UNIX): ", std::strerror(errno)));
  if (connect(c->sock_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot connect to engramd at ", path, ": ", std::strerror(errno)));
  }
  shm::Hello hello{shm::kMagic, version, options.ring_entries, 0, options.data_bytes};
  const absl::Status sent = shm::SendFrame(c->sock_, shm::FrameType::kHello,
                                           std::string(reinterpret_cast<const char*>(&hello), sizeof(hello)), {});
  // Read the reply even if the send failed: a daemon that refuses this peer answers at once and
  // hangs up, possibly before the hello went out, and its reply says why.
  auto frame = shm::ReceiveFrame(c->sock_, sent.ok() ? 10000 : 1000);
  if (!frame.ok()) return sent.ok() ? frame.status() : sent;
  if (frame->type != shm::FrameType::kHelloReply || frame->payload.size() < sizeof(shm::HelloReply)) {
    for (int fd : frame->fds) close(fd);
    return absl::UnavailableError("engramd sent no valid hello reply");
  }
  std::memcpy(&c->reply_, frame->payload.data(), sizeof(c->reply_));
  if (c->reply_.status != 0) {
    for (int fd : frame->fds) close(fd);
    return absl::Status(
        static_cast<absl::StatusCode>(c->reply_.status),
        absl::StrCat("engramd refused the connection: ", frame->payload.substr(sizeof(shm::HelloReply))));
  }
  if (frame->fds.size() != 3) {
    for (int fd : frame->fds) close(fd);
    return absl::UnavailableError("engramd's hello reply did not carry the arena and eventfds");
  }
  c->memfd_ = frame->fds[0];
  c->request_efd_ = frame->fds[1];
  c->completion_efd_ = frame->fds[2];
  auto layout = shm::LayoutFromReply(c->reply_);
  if (!layout.ok()) return absl::UnavailableError(layout.status().message());
  struct stat st {};
  if (fstat(c->memfd_, &st) != 0 || static_cast<uint64_t>(st.st_size) != c->reply_.arena_bytes) {
    return absl::UnavailableError("the arena engramd sent does not have the size it announced");
  }
  void* p = mmap(nullptr, c->reply_.arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c->memfd_, 0);
  if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap arena: ", std::strerror(errno)));
  c->base_ = static_cast<uint8_t*>(p);
  c->arena_ = shm::ArenaView(c->base_, *layout);
  return c;
}

ShmConnection::~ShmConnection() {
  {
    std::lock_guard<std::mutex> lock(link_->mu);  // mapped tables stop reporting through us
    link_->connection = nullptr;
  }
  // A device copy may still be reading HBM slots under a pin (released by its stream callback):
  // the daemon protects them only while this connection is up, so let the copies finish first.
  const auto until =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(CallTimeout::Effective(options_.timeout_ms));
  while (link_->device_pins.load(std::memory_order_acquire) > 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  {
    std::unique_lock<std::shared_mutex> lock(link_->arena_mu);  // ... and stop using HBM pins here
    link_->arena = nullptr;
  }
  if (base_ != nullptr) munmap(base_, reply_.arena_bytes);
  for (int fd : {sock_, memfd_, request_efd_, completion_efd_}) {
    if (fd >= 0) close(fd);
  }
}

absl::StatusOr<shm::Frame> ShmConnection::ControlCallLocked(shm::FrameType type, const std::string& payload) {
  if (broken_) return absl::UnavailableError("this connection to engramd lost track of its replies; reconnect");
  if (absl::Status s = shm::SendFrame(sock_, type, payload, {}); !s.ok()) return s;
  auto frame = shm::ReceiveFrame(sock_, CallTimeout::Effective(options_.timeout_ms));
  if (!frame.ok()) {
    // A late reply would be taken for the next call's: this connection is done.
    broken_ = true;
    return absl::UnavailableError(absl::StrCat("no reply from engramd: ", frame.status().message()));
  }
  return frame;
}

absl::StatusOr<RemoteTable> ShmConnection::OpenTable(const std::string& name) {
  std::lock_guard<std::mutex> lock(mu_);
  auto frame = ControlCallLocked(shm::FrameType::kOpenTable, name);
  if (!frame.ok()) return frame.status();
  for (int fd : frame->fds) close(fd);
  shm::OpenTableReply reply{};
  if (frame->type != shm::FrameType::kOpenTableReply || frame->payload.size() < sizeof(reply)) {
    return absl::UnavailableError("engramd sent no valid table reply");
  }
  std::memcpy(&reply, frame->payload.data(), sizeof(reply));
  const std::string body = frame->payload.substr(sizeof(reply));
  if (reply.status != 0) return absl::Status(static_cast<absl::StatusCode>(reply.status), body);
  v1::TableInfo info;
  if (!info.ParseFromString(body)) return absl::DataLossError("engramd's table layout did not parse");
  return RemoteTable{reply.table_id, info.name(), info.heads(), info.row_bytes(), body};
}

absl::Status ShmConnection::Post(const RequestDescriptor& d) {
  ArenaHeader* h = header();
  const uint32_t entries = reply_.ring_entries;
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(CallTimeout::Effective(options_.timeout_ms));
  // A full ring: engramd is behind. Wait for it in 1 ms sleeps on the socket (not a spin), which
  // also shows at once when the daemon has gone away.
  while (request_tail_ - h->request_head.load(std::memory_order_acquire) >= entries) {
    if (std::chrono::steady_clock::now() > deadline) return absl::DeadlineExceededError("request ring stayed full");
    pollfd p{sock_, POLLRDHUP, 0};
    if (poll(&p, 1, 1) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) {
      broken_ = true;
      return absl::UnavailableError("engramd went away while the request ring was full; reconnect");
    }
  }
  arena_.WriteRequest(request_tail_, d);
  ++request_tail_;
  h->request_tail.store(request_tail_, std::memory_order_seq_cst);
  if (h->daemon_sleeping.load(std::memory_order_seq_cst)) {
    const uint64_t one = 1;
    // EAGAIN: the counter is saturated, so a wake-up is pending anyway.
    if (write(request_efd_, &one, sizeof(one)) < 0 && errno != EAGAIN && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat("waking engramd: ", std::strerror(errno)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Completion> ShmConnection::WaitCompletion() {
  ArenaHeader* h = header();
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(options_.spin_us);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(CallTimeout::Effective(options_.timeout_ms));
  while (h->completion_tail.load(std::memory_order_acquire) == completion_head_) {
    if (std::chrono::steady_clock::now() < spin_until) continue;
    h->client_sleeping.store(1, std::memory_order_seq_cst);
    if (h->completion_tail.load(std::memory_order_seq_cst) != completion_head_) {
      h->client_sleeping.store(0, std::memory_order_relaxed);
      break;
    }
    pollfd fds[2] = {{completion_efd_, POLLIN, 0}, {sock_, POLLIN, 0}};
    const int rc = poll(fds, 2, 100);
    h->client_sleeping.store(0, std::memory_order_relaxed);
    if (rc < 0 && errno != EINTR) return absl::UnavailableError(absl::StrCat("poll: ", std::strerror(errno)));
    if (rc > 0 && (fds[0].revents & POLLIN)) {
      uint64_t counter;
      if (read(completion_efd_, &counter, sizeof(counter)) < 0 && errno != EAGAIN && errno != EINTR) {
        return absl::UnavailableError(absl::StrCat("reading the completion eventfd: ", std::strerror(errno)));
      }
    }
    if (rc > 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) &&
        h->completion_tail.load(std::memory_order_acquire) == completion_head_) {
      return absl::UnavailableError("engramd went away (connection closed); reconnect");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      // The request is still outstanding: its late completion (and the rows the daemon may still
      // be writing into the data region) would be taken for the next call's. This connection is
      // done; the next call reconnects.
      broken_ = true;
      return absl::DeadlineExceededError(absl::StrCat("no completion from engramd within ",
                                                      CallTimeout::Effective(options_.timeout_ms),
                                                      " ms (the connection is dropped; the next call reconnects)"));
    }
  }
  const Completion c = arena_.ReadCompletion(completion_head_);
  ++completion_head_;
  h->completion_head.store(completion_head_, std::memory_order_release);
  return c;
}

absl::Status ShmConnection::Call(const RequestDescriptor& d, Completion* c) {
  if (absl::Status s = Post(d); !s.ok()) return s;
  auto done = WaitCompletion();
  if (!done.ok()) return done.status();
  *c = *done;
  if (c->request_id != d.request_id) return absl::InternalError("completion for another request");
  if (c->status != 0) return absl::Status(static_cast<absl::StatusCode>(c->status), c->message);
  return absl::OkStatus();
}

absl::StatusOr<absl::Span<const uint8_t>> ShmConnection::LookupInPlace(const RemoteTable& table, int layer,
                                                                       uint32_t num_tokens,
                                                                       absl::Span<const uint32_t> indices,
                                                                       RemoteLookupStats* stats) {
  std::lock_guard<std::mutex> lock(mu_);
  return LookupLocked(table, layer, num_tokens, indices, indices.size() * table.row_bytes, stats);
}

absl::StatusOr<absl::Span<const uint8_t>> ShmConnection::LookupLocked(const RemoteTable& table, int layer,
                                                                      uint32_t num_tokens,
                                                                      absl::Span<const uint32_t> indices,
                                                                      uint64_t out_bytes, RemoteLookupStats* stats) {
  if (broken_) return absl::UnavailableError("this connection to engramd is broken; reconnect");
  const uint64_t index_bytes = indices.size() * 4;
  const uint64_t out_offset = (index_bytes + 63) / 64 * 64;
  if (out_offset + out_bytes > reply_.data_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("request needs ", out_offset + out_bytes,
                                                     " bytes of the arena's data region, which has ", reply_.data_bytes,
                                                     " (connect with a larger ShmConnectOptions::data_bytes)"));
  }
  std::memcpy(data(), indices.data(), index_bytes);
  RequestDescriptor d{next_id_++,  static_cast<uint32_t>(shm::Op::kLookup),
                      table.id,    static_cast<uint32_t>(layer),
                      num_tokens,  0,
                      index_bytes, out_offset,
                      out_bytes};
  Completion c;
  if (absl::Status s = Call(d, &c); !s.ok()) return s;
  if (stats != nullptr) *stats = {c.rows_read, c.dram_rows, c.nvme_rows};
  return absl::Span<const uint8_t>(data() + out_offset, out_bytes);
}

absl::Status ShmConnection::Lookup(const RemoteTable& table, int layer, uint32_t num_tokens,
                                   absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                                   RemoteLookupStats* stats) {
  std::lock_guard<std::mutex> lock(mu_);
  auto rows = LookupLocked(table, layer, num_tokens, indices, out.size(), stats);
  if (!rows.ok()) return rows.status();
  std::memcpy(out.data(), rows->data(), rows->size());
  return absl::OkStatus();
}

absl::Status ShmConnection::Prefetch(const RemoteTable& table, int layer, uint32_t num_tokens,
                                     absl::Span<const uint32_t> indices) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) return absl::UnavailableError("this connection to engramd is broken; reconnect");
  const uint64_t index_bytes = indices.size() * 4;
  if (index_bytes > reply_.data_bytes) return absl::ResourceExhaustedError("indices do not fit the data region");
  std::memcpy(data(), indices.data(), index_bytes);
  RequestDescriptor d{next_id_++,
                      static_cast<uint32_t>(shm::Op::kPrefetch),
                      table.id,
                      static_cast<uint32_t>(layer),
                      num_tokens,
                      0,
                      index_bytes,
                      0,
                      0};
  Completion c;
  return Call(d, &c);
}

absl::Status ShmConnection::CheckSessionLocked() {
  if (broken_) return absl::UnavailableError("this connection to engramd is broken; reconnect");
  // A daemon that ended this session half-closes the socket and keeps watching its pins until we
  // hang up: sends would still go through, so look for its end-of-stream first.
  pollfd p{sock_, POLLRDHUP, 0};
  if (poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0) {
    broken_ = true;
    return absl::UnavailableError("engramd ended this session (it went away, or refused something we sent); reconnect");
  }
  return absl::OkStatus();
}

absl::Status ShmConnection::SendFrame(shm::FrameType type, const std::string& payload) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckSessionLocked(); !s.ok()) return s;
  return shm::SendFrame(sock_, type, payload, {});
}

absl::Status ShmConnection::SendCounters(const std::vector<shm::CounterReport>& reports) {
  std::lock_guard<std::mutex> lock(mu_);
  if (absl::Status s = CheckSessionLocked(); !s.ok()) return s;
  return shm::SendFrame(
      sock_, shm::FrameType::kCounterReport,
      std::string(reinterpret_cast<const char*>(reports.data()), reports.size() * sizeof(shm::CounterReport)), {});
}

absl::StatusOr<shm::Frame> ShmConnection::MapCall(shm::FrameType request_type, shm::FrameType reply_type,
                                                  uint32_t table_id, shm::MapTableReply* reply, std::string* body) {
  shm::Frame frame;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const shm::MapTableRequest request{table_id};
    auto got = ControlCallLocked(request_type, std::string(reinterpret_cast<const char*>(&request), sizeof(request)));
    if (!got.ok()) return got.status();
    frame = std::move(*got);
  }
  FdsCloser closer{&frame.fds};  // on every error below; released on success
  if (frame.type != reply_type || frame.payload.size() < sizeof(*reply)) {
    return absl::UnavailableError(absl::StrCat("engramd sent no valid reply to a ",
                                               request_type == shm::FrameType::kMapHbm ? "MapHbm" : "MapTable",
                                               " request"));
  }
  std::memcpy(reply, frame.payload.data(), sizeof(*reply));
  *body = frame.payload.substr(sizeof(*reply));
  if (reply->status != 0) return absl::Status(static_cast<absl::StatusCode>(reply->status), *body);
  closer.fds = nullptr;
  return frame;
}

}  // namespace engram
