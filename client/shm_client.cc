#include "engram/shm_client.h"

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
#include "engram/kernels/gather_host.h"
#include "engram/shm_socket.h"
#include "engram/v1/engram.pb.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;

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
    return absl::Status(static_cast<absl::StatusCode>(c->reply_.status),
                        absl::StrCat("engramd refused the connection: ", frame->payload.substr(sizeof(shm::HelloReply))));
  }
  if (frame->fds.size() != 3) {
    for (int fd : frame->fds) close(fd);
    return absl::UnavailableError("engramd's hello reply did not carry the arena and eventfds");
  }
  c->memfd_ = frame->fds[0];
  c->request_efd_ = frame->fds[1];
  c->completion_efd_ = frame->fds[2];
  struct stat st {};
  if (fstat(c->memfd_, &st) != 0 || static_cast<uint64_t>(st.st_size) != c->reply_.arena_bytes) {
    return absl::UnavailableError("the arena engramd sent does not have the size it announced");
  }
  void* p = mmap(nullptr, c->reply_.arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c->memfd_, 0);
  if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap arena: ", std::strerror(errno)));
  c->base_ = static_cast<uint8_t*>(p);
  return c;
}

ShmConnection::~ShmConnection() {
  {
    std::lock_guard<std::mutex> lock(link_->mu);  // mapped tables stop reporting through us
    link_->connection = nullptr;
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
  auto frame = shm::ReceiveFrame(sock_, options_.timeout_ms);
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
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeout_ms);
  while (request_tail_ - h->request_head.load(std::memory_order_acquire) >= entries) {
    if (std::chrono::steady_clock::now() > deadline) return absl::DeadlineExceededError("request ring stayed full");
    std::this_thread::yield();
  }
  std::memcpy(base_ + reply_.request_ring_offset + (request_tail_ & (entries - 1)) * sizeof(d), &d, sizeof(d));
  ++request_tail_;
  h->request_tail.store(request_tail_, std::memory_order_seq_cst);
  if (h->daemon_sleeping.load(std::memory_order_seq_cst)) {
    const uint64_t one = 1;
    (void)!write(request_efd_, &one, sizeof(one));
  }
  return absl::OkStatus();
}

absl::StatusOr<Completion> ShmConnection::WaitCompletion() {
  ArenaHeader* h = header();
  const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(options_.spin_us);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.timeout_ms);
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
    if (rc > 0 && (fds[0].revents & POLLIN)) {
      uint64_t counter;
      (void)!read(completion_efd_, &counter, sizeof(counter));
    }
    if (rc > 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) &&
        h->completion_tail.load(std::memory_order_acquire) == completion_head_) {
      return absl::UnavailableError("engramd went away (connection closed); reconnect");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      return absl::DeadlineExceededError(absl::StrCat("no completion from engramd within ", options_.timeout_ms, " ms"));
    }
  }
  Completion c;
  std::memcpy(&c, base_ + reply_.completion_ring_offset + (completion_head_ & (reply_.ring_entries - 1)) * sizeof(c),
              sizeof(c));
  ++completion_head_;
  h->completion_head.store(completion_head_, std::memory_order_release);
  c.message[sizeof(c.message) - 1] = '\0';
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
  const uint64_t index_bytes = indices.size() * 4;
  const uint64_t out_offset = (index_bytes + 63) / 64 * 64;
  if (out_offset + out_bytes > reply_.data_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("request needs ", out_offset + out_bytes,
                                                     " bytes of the arena's data region, which has ", reply_.data_bytes,
                                                     " (connect with a larger ShmConnectOptions::data_bytes)"));
  }
  std::memcpy(data(), indices.data(), index_bytes);
  RequestDescriptor d{next_id_++, static_cast<uint32_t>(shm::Op::kLookup), table.id, static_cast<uint32_t>(layer),
                      num_tokens, 0, index_bytes, out_offset, out_bytes};
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
  const uint64_t index_bytes = indices.size() * 4;
  if (index_bytes > reply_.data_bytes) return absl::ResourceExhaustedError("indices do not fit the data region");
  std::memcpy(data(), indices.data(), index_bytes);
  RequestDescriptor d{next_id_++, static_cast<uint32_t>(shm::Op::kPrefetch), table.id, static_cast<uint32_t>(layer),
                      num_tokens, 0, index_bytes, 0, 0};
  Completion c;
  return Call(d, &c);
}

namespace {

// Closes the descriptors a frame brought (unless released by setting fds to null).
struct FdsCloser {
  std::vector<int>* fds;
  ~FdsCloser() {
    if (fds == nullptr) return;
    for (int fd : *fds) close(fd);
  }
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

absl::Status ShmConnection::SendFrame(shm::FrameType type, const std::string& payload) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) return absl::UnavailableError("this connection to engramd is broken; reconnect");
  return shm::SendFrame(sock_, type, payload, {});
}

absl::Status ShmConnection::SendCounters(const std::vector<shm::CounterReport>& reports) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_) return absl::UnavailableError("this connection to engramd is broken; reconnect");
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

absl::StatusOr<std::unique_ptr<MappedTable>> ShmConnection::MapTable(const RemoteTable& table) {
  v1::TableInfo info;
  if (!info.ParseFromString(table.table_info)) return absl::InvalidArgumentError("the table's layout does not parse");
  if (version_ < 2) {
    return absl::FailedPreconditionError("this engramd speaks shared-memory protocol 1, which has no mapped tables");
  }
  shm::MapTableReply reply{};
  std::string body;
  auto got = MapCall(shm::FrameType::kMapTable, shm::FrameType::kMapTableReply, table.id, &reply, &body);
  if (!got.ok()) return got.status();
  shm::Frame frame = std::move(*got);
  FdsCloser closer{&frame.fds};  // the mappings keep the memory
  std::unique_ptr<MappedTable> mapped(new MappedTable());
  if (info.max_batch_rows() > 0) mapped->max_batch_rows_ = info.max_batch_rows();
  if (reply.layers != static_cast<uint32_t>(info.layers_size()) || frame.fds.size() != reply.layers ||
      body.size() != reply.layers * sizeof(shm::MappedLayer)) {
    return absl::DataLossError(absl::StrCat("engramd's map reply for '", table.name, "' does not match its layout"));
  }
  {
    std::lock_guard<std::mutex> lock(link_->mu);
    link_->connection = this;
  }
  mapped->link_ = link_;
  mapped->table_ = table;
  mapped->row_bytes_ = table.row_bytes;
  for (uint32_t i = 0; i < reply.layers; ++i) {
    shm::MappedLayer m{};
    std::memcpy(&m, body.data() + i * sizeof(m), sizeof(m));
    const auto& layer_info = info.layers(static_cast<int>(i));
    const int fd = frame.fds[i];
    struct stat st {};
    const int seals = fcntl(fd, F_GET_SEALS);
    if (m.layer_id != static_cast<int32_t>(layer_info.id()) || m.total_rows != layer_info.total_rows() ||
        m.row_bytes != table.row_bytes || fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != m.file_bytes ||
        m.file_bytes < m.total_rows * m.row_bytes) {
      return absl::DataLossError(
          absl::StrCat("engramd's mapping of '", table.name, "' layer ", layer_info.id(), " does not match its layout"));
    }
    // The daemon sealed the file against shrinking: a mapped row can never turn into SIGBUS.
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("engramd's rows of '", table.name, "' are not sealed against shrinking; refusing to map them"));
    }
    auto layer = std::make_unique<MappedTable::Layer>();
    layer->id = m.layer_id;
    layer->total_rows = m.total_rows;
    layer->layout.layer_id = m.layer_id;
    for (uint64_t rows : layer_info.head_rows()) layer->layout.head_rows.push_back(static_cast<int64_t>(rows));
    layer->layout.ComputeOffsets();
    if (layer->layout.total_rows != m.total_rows || layer->layout.head_rows.size() != table.heads) {
      return absl::DataLossError(absl::StrCat("'", table.name, "' layer ", m.layer_id, ": head sizes do not add up"));
    }
    void* p = mmap(nullptr, m.file_bytes, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrCat("mapping '", table.name, "' layer ", m.layer_id, " (",
                                                       m.file_bytes, " bytes): ", std::strerror(errno)));
    }
    layer->base = static_cast<const uint8_t*>(p);
    layer->map_bytes = m.file_bytes;
    mapped->layers_.push_back(std::move(layer));
  }
  mapped->report_interval_ns_ = static_cast<int64_t>(options_.mapped_report_interval_ms) * 1'000'000;
  mapped->last_report_ns_.store(NowNs());
  mapped->version_ = version_;
  if (version_ >= 3 && options_.use_hbm) {
    // Without an HBM tier (the usual case: no GPU) the table is served from the mapping alone.
    (void)MapHbm(mapped.get(), info);
  }
  return mapped;
}

absl::Status ShmConnection::MapHbm(MappedTable* mapped, const v1::TableInfo& info) {
  shm::MapTableReply reply{};
  std::string body;
  auto got = MapCall(shm::FrameType::kMapHbm, shm::FrameType::kMapHbmReply, mapped->table_.id, &reply, &body);
  if (!got.ok()) return got.status();
  shm::Frame frame = std::move(*got);
  FdsCloser closer{&frame.fds};
  if (reply.layers != static_cast<uint32_t>(info.layers_size()) || body.size() != reply.layers * sizeof(shm::HbmLayer)) {
    return absl::DataLossError("engramd's HBM map reply does not match the table's layout");
  }
  std::vector<shm::HbmLayer> layers(reply.layers);
  std::memcpy(layers.data(), body.data(), body.size());
  const bool host = reply.layers > 0 && layers[0].kind == static_cast<uint32_t>(shm::HbmKind::kHost);
  if (frame.fds.size() != reply.layers * (host ? 2u : 1u)) {
    return absl::DataLossError("engramd's HBM map reply carries the wrong number of files");
  }
  // Check everything before anything is attached: the mappings are made into a staging list.
  struct Staged {
    const kernels::HbmIndexHeader* index = nullptr;
    uint64_t index_bytes = 0;
    const uint8_t* slots = nullptr;
    uint64_t slot_bytes = 0;
  };
  std::vector<Staged> staged(reply.layers);
  auto unmap_all = [&] {
    for (const Staged& st : staged) {
      if (st.index != nullptr) munmap(const_cast<kernels::HbmIndexHeader*>(st.index), st.index_bytes);
      if (st.slots != nullptr) munmap(const_cast<uint8_t*>(st.slots), st.slot_bytes);
    }
  };
  auto map_ro = [](int fd, uint64_t bytes) -> const uint8_t* {
    struct stat st {};
    const int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != bytes || seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      return nullptr;
    }
    void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<const uint8_t*>(p);
  };
  for (uint32_t i = 0; i < reply.layers; ++i) {
    const shm::HbmLayer& m = layers[i];
    const MappedTable::Layer* layer = i < mapped->layers_.size() ? mapped->layers_[i].get() : nullptr;
    const bool kind_ok = m.kind == (host ? static_cast<uint32_t>(shm::HbmKind::kHost)
                                         : static_cast<uint32_t>(shm::HbmKind::kCuda));
    const bool pins_ok = m.first_pin <= shm::kMaxHbmPins - shm::kPinsPerHbmLayer;
    const uint8_t* index = (layer != nullptr && kind_ok && pins_ok && m.row_bytes == mapped->row_bytes_ &&
                            m.layer_id == layer->id && m.index_bytes >= sizeof(kernels::HbmIndexHeader))
                               ? map_ro(frame.fds[host ? 2 * i : i], m.index_bytes)
                               : nullptr;
    if (index == nullptr) {
      unmap_all();
      return absl::DataLossError(absl::StrCat("engramd's HBM tier of '", mapped->table_.name, "' layer ", m.layer_id,
                                              " does not match the table, or its index cannot be mapped"));
    }
    staged[i].index = reinterpret_cast<const kernels::HbmIndexHeader*>(index);
    staged[i].index_bytes = m.index_bytes;
    const kernels::HbmIndexHeader* h = staged[i].index;
    const uint64_t buckets = h->bucket_mask + 1;
    bool ok = h->magic == kernels::kHbmIndexMagic && h->version == kernels::kHbmIndexVersion &&
              h->slots == m.slots && h->row_bytes == m.row_bytes && (buckets & h->bucket_mask) == 0 &&
              buckets <= (m.index_bytes >> 3) && h->total_bytes == m.index_bytes;
    for (int b = 0; ok && b < 2; ++b) {
      ok = h->keys_offset[b] % 8 == 0 && h->values_offset[b] % 4 == 0 && h->keys_offset[b] <= m.index_bytes &&
           buckets * 8 <= m.index_bytes - h->keys_offset[b] && h->values_offset[b] <= m.index_bytes &&
           buckets * 4 <= m.index_bytes - h->values_offset[b];
    }
    if (ok && host) {
      ok = m.slot_bytes >= uint64_t{m.slots} * m.row_bytes;
      staged[i].slots = ok ? map_ro(frame.fds[2 * i + 1], m.slot_bytes) : nullptr;
      staged[i].slot_bytes = m.slot_bytes;
      ok = staged[i].slots != nullptr;
    }
    if (!ok) {
      unmap_all();
      return absl::DataLossError(absl::StrCat("engramd's HBM index of '", mapped->table_.name, "' layer ", m.layer_id,
                                              " is not laid out as its header says"));
    }
  }
  {
    std::unique_lock<std::shared_mutex> lock(link_->arena_mu);
    link_->arena = header();
  }
  for (uint32_t i = 0; i < reply.layers; ++i) {
    MappedTable::Layer* layer = mapped->layers_[i].get();
    layer->hbm_index = staged[i].index;
    layer->hbm_index_bytes = staged[i].index_bytes;
    layer->hbm_slots = staged[i].slots;
    layer->hbm_slot_bytes = staged[i].slot_bytes;
    layer->hbm_slot_count = layers[i].slots;
    layer->first_pin = layers[i].first_pin;
    layer->hbm_info = layers[i];
    // Each process and layer draws its own sample positions.
    layer->sampler = HbmSampler(shm::kAccessSampleEvery,
                                0x9e3779b97f4a7c15ULL ^ (static_cast<uint64_t>(getpid()) << 20) ^
                                    static_cast<uint64_t>(static_cast<uint32_t>(layer->id)));
  }
  // A GPU store's slots are reached through its IPC handles on the device path; the host path
  // (Lookup) gathers from host stores only.
  mapped->hbm_access_ = host ? MappedTable::HbmAccess::kHost : MappedTable::HbmAccess::kCuda;
  return absl::OkStatus();
}

MappedTable::~MappedTable() {
  if (link_ != nullptr) (void)ReportCounters();
  for (const auto& layer : layers_) {
    munmap(const_cast<uint8_t*>(layer->base), layer->map_bytes);
    if (layer->hbm_index != nullptr) {
      munmap(const_cast<kernels::HbmIndexHeader*>(layer->hbm_index), layer->hbm_index_bytes);
    }
    if (layer->hbm_slots != nullptr) munmap(const_cast<uint8_t*>(layer->hbm_slots), layer->hbm_slot_bytes);
  }
}

absl::StatusOr<MappedTable::DevicePin> MappedTable::SplitForDevice(int layer_id, uint32_t num_tokens,
                                                                  absl::Span<const uint32_t> indices,
                                                                  uint32_t* sources, uint8_t* staged) {
  // Counts and samples go out as from Lookup (before the pin: a daemon that is gone is an error).
  if (NowNs() - last_report_ns_.load(std::memory_order_relaxed) >= report_interval_ns_) {
    if (absl::Status s = ReportCounters(); !s.ok()) return s;
  }
  thread_local std::vector<uint64_t> rows;
  const uint64_t heads = table_.heads;
  auto resolved = ResolveRows(layer_id, num_tokens, indices, uint64_t{num_tokens} * heads * row_bytes_, &rows);
  if (!resolved.ok()) return resolved.status();
  Layer* layer = *resolved;
  if (layer->hbm_index == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("table '", table_.name, "' layer ", layer_id, " has no HBM tier"));
  }
  thread_local std::vector<uint64_t> missed;  // positions the staging takes, in order
  missed.reserve(rows.size());  // before the pin: nothing may throw while it is held
  std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
  if (link_->arena == nullptr) return absl::FailedPreconditionError("the connection to engramd is closed");
  uint64_t g = 0;
  const int k = AcquirePin(layer, &g);
  if (k == kDetached) return absl::FailedPreconditionError("engramd has detached its HBM tier (it is shutting down)");
  if (k < 0) return absl::FailedPreconditionError("every HBM pin of this layer is in use");
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const int b = static_cast<int>(g & 1);
  const auto* keys = reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]);
  const auto* values = reinterpret_cast<const uint32_t*>(base + h->values_offset[b]);
  DevicePin pin{layer_id, static_cast<uint32_t>(k), 0};
  kernels::HbmProbeMany(keys, values, h->bucket_mask, rows.data(), rows.size(), sources);
  missed.clear();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (sources[i] < layer->hbm_slot_count) continue;
    sources[i] = kernels::kHbmFromStaging | static_cast<uint32_t>(missed.size());
    missed.push_back(i);
  }
  pin.staged_rows = missed.size();
  kernels::GatherRowsHost(
      layer->base, row_bytes_, missed.size(), [&](size_t j) { return rows[missed[j]]; },
      [&](size_t j) { return staged + j * row_bytes_; });
  const uint64_t hits = rows.size() - pin.staged_rows;
  layer->hbm_rows.fetch_add(hits, std::memory_order_relaxed);
  layer->hbm_rows_total.fetch_add(hits, std::memory_order_relaxed);
  layer->rows.fetch_add(pin.staged_rows, std::memory_order_relaxed);
  layer->lookups.fetch_add(1, std::memory_order_relaxed);
  Sample(layer, rows);
  return pin;
}

void MappedTable::ReleaseDevicePin(const DevicePin& pin) {
  for (const auto& layer : layers_) {
    if (layer->id != pin.layer_id || pin.pin >= shm::kPinsPerHbmLayer) continue;
    std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
    UnpinLocked(layer.get(), static_cast<int>(pin.pin));
  }
}

const shm::HbmLayer* MappedTable::hbm_layer(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id && layer->hbm_index != nullptr) return &layer->hbm_info;
  }
  return nullptr;
}

const uint8_t* MappedTable::hbm_host_slots(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id) return layer->hbm_slots;
  }
  return nullptr;
}

uint64_t MappedTable::hbm_rows_served(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id) return layer->hbm_rows_total.load(std::memory_order_relaxed);
  }
  return 0;
}

void MappedTable::Sample(Layer* layer, absl::Span<const uint64_t> rows) {
  std::lock_guard<std::mutex> lock(layer->sample_mu);
  layer->sampler.ForEach(rows.size(), [&](size_t i) {
    if (layer->samples.size() < shm::kMaxAccessSamples) layer->samples.push_back(rows[i]);
  });
}

int MappedTable::AcquirePin(Layer* layer, uint64_t* generation) {
  uint32_t busy = layer->pins_busy.load(std::memory_order_relaxed);
  uint32_t k = 0;
  for (;;) {
    while (k < shm::kPinsPerHbmLayer && (busy & (1u << k)) != 0) ++k;
    if (k == shm::kPinsPerHbmLayer) return -1;
    if (layer->pins_busy.compare_exchange_weak(busy, busy | (1u << k), std::memory_order_acquire)) break;
    k = 0;
  }
  std::atomic<uint64_t>& pin = link_->arena->hbm_pins[layer->first_pin + k];
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  for (;;) {
    const uint64_t g = h->generation.load(std::memory_order_acquire);
    pin.store(g + 1, std::memory_order_seq_cst);
    if (h->generation.load(std::memory_order_seq_cst) != g) continue;
    if (h->detached.load(std::memory_order_seq_cst) != 0) {  // the daemon no longer protects the slots
      pin.store(0, std::memory_order_seq_cst);
      layer->pins_busy.fetch_and(~(1u << k), std::memory_order_release);
      return kDetached;
    }
    *generation = g;
    return static_cast<int>(k);
  }
}

void MappedTable::UnpinLocked(Layer* layer, int k) {
  if (link_->arena != nullptr) link_->arena->hbm_pins[layer->first_pin + k].store(0, std::memory_order_seq_cst);
  layer->pins_busy.fetch_and(~(1u << k), std::memory_order_release);
}

bool MappedTable::GatherWithHbm(Layer* layer, absl::Span<const uint64_t> rows, absl::Span<uint8_t> out) {
  thread_local std::vector<uint32_t> slots;
  slots.resize(rows.size());  // before the pin: nothing may throw while it is held
  std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
  if (link_->arena == nullptr) return false;  // the connection is gone: nobody protects the slots
  uint64_t g = 0;
  const int k = AcquirePin(layer, &g);
  if (k < 0) return false;
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const int b = static_cast<int>(g & 1);
  const auto* keys = reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]);
  const auto* values = reinterpret_cast<const uint32_t*>(base + h->values_offset[b]);
  kernels::HbmProbeMany(keys, values, h->bucket_mask, rows.data(), rows.size(), slots.data());
  uint64_t hits = 0;
  const uint8_t* hbm = layer->hbm_slots;
  const uint32_t slot_count = layer->hbm_slot_count;
  auto source = [&](size_t i) {
    return slots[i] < slot_count ? hbm + uint64_t{slots[i]} * row_bytes_ : layer->base + rows[i] * row_bytes_;
  };
  for (size_t i = 0; i < rows.size(); ++i) hits += slots[i] < slot_count ? 1 : 0;
  kernels::GatherFromHost(row_bytes_, rows.size(), source, [&](size_t i) { return out.data() + i * row_bytes_; });
  UnpinLocked(layer, k);
  layer->hbm_rows.fetch_add(hits, std::memory_order_relaxed);
  layer->hbm_rows_total.fetch_add(hits, std::memory_order_relaxed);
  layer->rows.fetch_add(rows.size() - hits, std::memory_order_relaxed);
  return true;
}

uint64_t MappedTable::mapped_bytes() const {
  uint64_t total = 0;
  for (const auto& layer : layers_) total += layer->map_bytes;
  return total;
}

absl::StatusOr<MappedTable::Layer*> MappedTable::ResolveRows(int layer_id, uint32_t num_tokens,
                                                           absl::Span<const uint32_t> indices, uint64_t out_bytes,
                                                           std::vector<uint64_t>* rows) {
  Layer* layer = nullptr;
  for (const auto& l : layers_) {
    if (l->id == layer_id) layer = l.get();
  }
  if (layer == nullptr) return absl::NotFoundError(absl::StrCat("table '", table_.name, "' has no layer ", layer_id));
  // The daemon's own checks, limit included; every index is checked before any row is copied.
  if (absl::Status s = ResolveHeadIndices(layer->layout, num_tokens, indices, max_batch_rows_, rows); !s.ok()) return s;
  const uint64_t total = rows->size();
  if (out_bytes != total * row_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("output buffer holds ", out_bytes, " bytes; ", total, " rows x ",
                                                   row_bytes_, " bytes = ", total * row_bytes_, " expected"));
  }
  return layer;
}

absl::Status MappedTable::Lookup(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                 absl::Span<uint8_t> out) {
  thread_local std::vector<uint64_t> rows;
  auto resolved = ResolveRows(layer_id, num_tokens, indices, out.size(), &rows);
  if (!resolved.ok()) return resolved.status();
  Layer* layer = *resolved;
  const uint64_t total = rows.size();
  const bool hbm = hbm_access_ == HbmAccess::kHost && layer->hbm_index != nullptr &&
                   GatherWithHbm(layer, absl::MakeConstSpan(rows), out);
  if (!hbm) {
    kernels::GatherRowsHost(
        layer->base, row_bytes_, total, [&](size_t i) { return rows[i]; },
        [&](size_t i) { return out.data() + i * row_bytes_; });
    layer->rows.fetch_add(total, std::memory_order_relaxed);
  }
  if (layer->hbm_index != nullptr) Sample(layer, rows);
  layer->lookups.fetch_add(1, std::memory_order_relaxed);
  if (NowNs() - last_report_ns_.load(std::memory_order_relaxed) >= report_interval_ns_) return ReportCounters();
  return absl::OkStatus();
}

absl::Status MappedTable::ReportCounters() {
  std::lock_guard<std::mutex> lock(report_mu_);
  last_report_ns_.store(NowNs(), std::memory_order_relaxed);
  std::vector<shm::CounterReport> reports;
  for (const auto& layer : layers_) {
    const uint64_t lookups = layer->lookups.exchange(0, std::memory_order_relaxed);
    const uint64_t rows = layer->rows.exchange(0, std::memory_order_relaxed);  // from the DRAM mapping
    if (lookups > 0) reports.push_back({table_.id, layer->id, lookups, rows});
  }
  // HBM layers: rows from the slots and the sampled rows, one AccessReport frame each (best
  // effort: a lost sample only slows promotion).
  std::vector<std::string> access;
  for (const auto& layer : layers_) {
    if (layer->hbm_index == nullptr || version_ < 3) continue;
    std::vector<uint64_t> samples;
    {
      std::lock_guard<std::mutex> lock(layer->sample_mu);
      samples.swap(layer->samples);
    }
    const uint64_t hbm_rows = layer->hbm_rows.exchange(0, std::memory_order_relaxed);
    if (samples.empty() && hbm_rows == 0) continue;
    shm::AccessReport r{table_.id, layer->id, hbm_rows, static_cast<uint32_t>(samples.size()), 0};
    std::string payload(reinterpret_cast<const char*>(&r), sizeof(r));
    payload.append(reinterpret_cast<const char*>(samples.data()), samples.size() * 8);
    access.push_back(std::move(payload));
  }
  if (reports.empty() && access.empty()) return absl::OkStatus();
  absl::Status s;
  {
    std::lock_guard<std::mutex> link_lock(link_->mu);
    s = link_->connection != nullptr ? absl::OkStatus() : absl::UnavailableError("the ShmConnection was closed");
    if (s.ok() && !reports.empty()) s = link_->connection->SendCounters(reports);
    for (size_t i = 0; s.ok() && i < access.size(); ++i) {
      s = link_->connection->SendFrame(shm::FrameType::kAccessReport, access[i]);
    }
  }
  if (!s.ok()) {
    // Keep the counts for a later report (to a reconnected daemon, if it comes to that).
    for (const auto& r : reports) {
      for (const auto& layer : layers_) {
        if (layer->id == r.layer_id) {
          layer->lookups.fetch_add(r.lookups, std::memory_order_relaxed);
          layer->rows.fetch_add(r.rows, std::memory_order_relaxed);
        }
      }
    }
    return absl::UnavailableError(absl::StrCat("engramd went away (reporting mapped lookups failed: ", s.message(),
                                               "); reconnect"));
  }
  return absl::OkStatus();
}

}  // namespace engram
