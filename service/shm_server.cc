#include "service/shm_server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <algorithm>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"
#include "engram/v1/engram.pb.h"
#include "service/grpc_service.h"
#include "service/log.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;

// A session owns its socket: it is closed only when the Session is destroyed, after its thread has
// been joined, so Stop's shutdown() never reaches a descriptor that was closed and reused.
struct ShmServer::Session {
  int sock = -1;
  pid_t pid = 0;
  uid_t uid = 0;
  std::thread thread;
  std::atomic<bool> done{false};
  ~Session() {
    if (sock >= 0) close(sock);
  }
};

// What one client has mapped, and the HBM pins of its arena the HBM tiers watch (removed from
// them before the arena goes away).
struct ShmServer::ClientState {
  ArenaHeader* header = nullptr;
  std::vector<bool> mapped;      // tables this client mapped (it may report on those)
  std::vector<bool> hbm_mapped;  // tables whose HBM tiers it maps
  uint32_t next_pin = 0;
  std::vector<std::pair<HbmTier*, const std::atomic<uint64_t>*>> readers;
  ~ClientState() {
    for (const auto& [tier, pin] : readers) tier->RemoveReader(pin);
  }
};

namespace {

// A read-only descriptor of the same file (a client can then map it PROT_READ only).
int ReopenReadOnly(int fd) {
  return open(absl::StrCat("/proc/self/fd/", fd).c_str(), O_RDONLY | O_CLOEXEC);
}

bool UsableDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return access(dir.c_str(), W_OK | X_OK) == 0;
}

// A checked view of one client's arena. Everything read from shared memory goes through here.
class Arena {
 public:
  ~Arena() {
    if (base_ != nullptr) munmap(base_, bytes_);
    for (int fd : {memfd_, request_efd_, completion_efd_}) {
      if (fd >= 0) close(fd);
    }
  }
  absl::Status Create(uint32_t entries, uint64_t data_bytes) {
    entries_ = entries;
    request_ring_ = shm::kHeaderBytes;
    completion_ring_ = request_ring_ + shm::RingBytes(entries, sizeof(RequestDescriptor));
    data_offset_ = completion_ring_ + shm::RingBytes(entries, sizeof(Completion));
    data_bytes_ = data_bytes;
    bytes_ = data_offset_ + data_bytes;
    memfd_ = memfd_create("engram-client-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd_ < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
    if (ftruncate(memfd_, static_cast<off_t>(bytes_)) != 0) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot size a ", bytes_, "-byte arena: ", std::strerror(errno)));
    }
    // Sealed: the client can neither shrink nor grow it, so the daemon's mapping never faults.
    if (fcntl(memfd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return absl::InternalError(absl::StrCat("sealing the arena: ", std::strerror(errno)));
    }
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap arena: ", std::strerror(errno)));
    base_ = static_cast<uint8_t*>(p);
    auto* h = new (base_) ArenaHeader();
    h->magic = shm::kMagic;
    h->version = shm::kVersion;
    h->ring_entries = entries;
    request_efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    completion_efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (request_efd_ < 0 || completion_efd_ < 0) return absl::InternalError("eventfd failed");
    return absl::OkStatus();
  }
  ArenaHeader* header() const { return reinterpret_cast<ArenaHeader*>(base_); }
  RequestDescriptor ReadRequest(uint32_t position) const {
    RequestDescriptor d;
    std::memcpy(&d, base_ + request_ring_ + (position & (entries_ - 1)) * sizeof(d), sizeof(d));
    return d;
  }
  void WriteCompletion(uint32_t position, const Completion& c) {
    std::memcpy(base_ + completion_ring_ + (position & (entries_ - 1)) * sizeof(c), &c, sizeof(c));
  }
  // A data range, or nullptr when it does not lie inside the data region.
  uint8_t* DataRange(uint64_t offset, uint64_t length) const {
    if (offset > data_bytes_ || length > data_bytes_ - offset) return nullptr;
    return base_ + data_offset_ + offset;
  }
  shm::HelloReply Reply() const {
    return {0, entries_, bytes_, request_ring_, completion_ring_, data_offset_, data_bytes_};
  }
  uint32_t entries() const { return entries_; }
  int memfd() const { return memfd_; }
  int request_efd() const { return request_efd_; }
  int completion_efd() const { return completion_efd_; }

 private:
  uint8_t* base_ = nullptr;
  uint64_t bytes_ = 0, request_ring_ = 0, completion_ring_ = 0, data_offset_ = 0, data_bytes_ = 0;
  uint32_t entries_ = 0;
  int memfd_ = -1, request_efd_ = -1, completion_efd_ = -1;
};

// Who is on the other end of a Unix socket: SO_PEERCRED, and SO_PEERGROUPS for the supplementary
// groups (empty where the kernel has no SO_PEERGROUPS).
struct Peer {
  pid_t pid = 0;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
};

absl::StatusOr<Peer> ReadPeer(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof(cred)) {
    return absl::PermissionDeniedError(absl::StrCat("cannot read the peer's credentials (SO_PEERCRED): ",
                                                    std::strerror(errno)));
  }
  Peer peer{cred.pid, cred.uid, cred.gid, {}};
  std::vector<gid_t> groups(64);
  for (int attempt = 0; attempt < 4; ++attempt) {
    socklen_t bytes = static_cast<socklen_t>(groups.size() * sizeof(gid_t));
    if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &bytes) == 0) {
      groups.resize(bytes / sizeof(gid_t));
      peer.groups = std::move(groups);
      return peer;
    }
    if (errno != ERANGE) break;  // ENOPROTOOPT on kernels without it: the primary group only
    groups.resize(bytes / sizeof(gid_t) + 16);
  }
  return peer;
}

bool Admitted(const Peer& peer, const std::vector<uid_t>& uids, const std::vector<gid_t>& gids) {
  for (uid_t u : uids) {
    if (u == peer.uid) return true;
  }
  for (gid_t g : gids) {
    if (g == peer.gid || std::find(peer.groups.begin(), peer.groups.end(), g) != peer.groups.end()) return true;
  }
  return false;
}

void SetMessage(Completion* c, const absl::Status& s) {
  c->status = static_cast<int32_t>(s.code());
  const std::string m(s.message());
  std::snprintf(c->message, sizeof(c->message), "%s", m.c_str());
}

}  // namespace

std::string DefaultSocketPath() {
  if (UsableDir("/run/engram")) return "/run/engram/engramd.sock";
  if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg != nullptr && UsableDir(absl::StrCat(xdg, "/engram"))) {
    return absl::StrCat(xdg, "/engram/engramd.sock");
  }
  return absl::StrCat("/tmp/engram-", getuid(), "/engramd.sock");
}

ShmServer::ShmServer(Engine* engine, DaemonMetrics* metrics, ShmServerOptions options)
    : engine_(engine), metrics_(metrics), options_(std::move(options)) {
  if (options_.allow_uids.empty()) options_.allow_uids.push_back(getuid());
}

ShmServer::~ShmServer() { Stop(); }

absl::Status ShmServer::Start() {
  path_ = options_.socket_path.empty() ? DefaultSocketPath() : options_.socket_path;
  sockaddr_un addr{};
  if (path_.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(absl::StrCat("socket path too long (", path_.size(), " bytes): ", path_));
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(path_).parent_path(), ec);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path_.data(), path_.size());
  // A socket file left by an earlier daemon is replaced; one a live daemon answers on is not.
  const int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) return absl::InternalError(absl::StrCat("socket(AF_UNIX): ", std::strerror(errno)));
  const bool live = connect(probe, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(probe);
  if (live) {
    return absl::AlreadyExistsError(absl::StrCat("another engramd is serving ", path_,
                                                 " (stop it, or give this one its own --socket)"));
  }
  if (unlink(path_.c_str()) != 0 && errno != ENOENT) {
    return absl::UnavailableError(absl::StrCat("cannot remove the stale socket ", path_, ": ", std::strerror(errno)));
  }
  listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return absl::InternalError(absl::StrCat("socket(AF_UNIX): ", std::strerror(errno)));
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(listen_fd_, 64) != 0) {
    const int err = errno;
    close(listen_fd_);
    listen_fd_ = -1;
    return absl::UnavailableError(absl::StrCat("cannot listen on ", path_, ": ", std::strerror(err)));
  }
  bound_ = true;  // from here on the socket file is this server's to remove
  if (chmod(path_.c_str(), 0660) != 0) {
    const int err = errno;
    close(listen_fd_);
    listen_fd_ = -1;
    unlink(path_.c_str());
    bound_ = false;
    return absl::UnavailableError(absl::StrCat("cannot set mode 0660 on ", path_, ": ", std::strerror(err)));
  }
  acceptor_ = std::thread([this] { AcceptLoop(); });
  return absl::OkStatus();
}

void ShmServer::Stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_ >= 0) shutdown(listen_fd_, SHUT_RDWR);
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
  std::list<std::unique_ptr<Session>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : sessions_) shutdown(s->sock, SHUT_RDWR);
    sessions.swap(sessions_);
  }
  for (auto& s : sessions) {
    if (s->thread.joinable()) s->thread.join();
  }
  if (bound_) unlink(path_.c_str());  // only a socket this server created; never another daemon's
}

size_t ShmServer::sessions() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& s : sessions_) n += s->done.load() ? 0 : 1;
  return n;
}

void ShmServer::AcceptLoop() {
  while (!stopping_.load()) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // the listener was shut down
    }
    auto session = std::make_unique<Session>();
    session->sock = fd;
    auto peer = ReadPeer(fd);
    if (!peer.ok()) {  // credentials we cannot read are credentials we cannot check: refuse
      LogWarn("shm_refused", {{"reason", std::string(peer.status().message())}});
      continue;  // the Session closes fd
    }
    session->pid = peer->pid;
    session->uid = peer->uid;
    if (!Admitted(*peer, options_.allow_uids, options_.allow_gids)) {
      const ucred cred{peer->pid, peer->uid, peer->gid};
      const std::string msg = absl::StrCat("uid ", cred.uid, " gid ", cred.gid,
                                           " may not use this engramd (see --allow-uid / --allow-gid)");
      shm::HelloReply reply{};
      reply.status = static_cast<int32_t>(absl::StatusCode::kPermissionDenied);
      std::string payload(reinterpret_cast<const char*>(&reply), sizeof(reply));
      payload += msg;
      (void)shm::SendFrame(fd, shm::FrameType::kHelloReply, payload, {});
      LogWarn("shm_refused", {{"pid", absl::StrCat(cred.pid)}, {"uid", absl::StrCat(cred.uid)},
                              {"gid", absl::StrCat(cred.gid)}, {"groups", absl::StrCat(peer->groups.size())}});
      continue;  // the Session closes fd
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Reap finished sessions so a long-lived daemon does not keep their threads.
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if ((*it)->done.load()) {
        (*it)->thread.join();
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
    Session* raw = session.get();
    sessions_.push_back(std::move(session));
    raw->thread = std::thread([this, raw] { Serve(raw); });
  }
}

absl::Status ShmServer::HandleControlFrame(const shm::Frame& frame, int sock, const std::vector<const Table*>& tables,
                                           ClientState* client, const std::string& who) {
  std::vector<bool>* mapped = &client->mapped;
  auto id_of = [&](const Table* table) {
    for (size_t i = 0; i < tables.size(); ++i) {
      if (tables[i] == table) return static_cast<uint32_t>(i);
    }
    return UINT32_MAX;
  };
  switch (frame.type) {
    case shm::FrameType::kOpenTable: {
      shm::OpenTableReply open{};
      std::string body;
      const Table* table = engine_->FindTable(frame.payload);
      if (table == nullptr) {
        open.status = static_cast<int32_t>(absl::StatusCode::kNotFound);
        body = absl::StrCat("no table named '", frame.payload, "'");
      } else {
        open.table_id = id_of(table);
        v1::TableInfo info;
        FillTableInfo(*table, engine_->options().max_batch_rows, &info);
        body = info.SerializeAsString();
      }
      return shm::SendFrame(sock, shm::FrameType::kOpenTableReply,
                            std::string(reinterpret_cast<const char*>(&open), sizeof(open)) + body, {});
    }
    case shm::FrameType::kMapTable: {
      shm::MapTableRequest request{};
      shm::MapTableReply reply{};
      std::string body, message;
      std::vector<int> fds;
      const Table* table = nullptr;
      if (frame.payload.size() != sizeof(request)) {
        return absl::InvalidArgumentError("protocol violation: MapTable frame of the wrong size");
      }
      std::memcpy(&request, frame.payload.data(), sizeof(request));
      table = request.table_id < tables.size() ? tables[request.table_id] : nullptr;
      if (table == nullptr) {
        reply.status = static_cast<int32_t>(absl::StatusCode::kNotFound);
        message = absl::StrCat("table id ", request.table_id, " is not one this daemon gave out");
      } else {
        for (const auto& layer : table->layers()) {
          if (layer.tier->shared_fd() < 0) {
            reply.status = static_cast<int32_t>(absl::StatusCode::kFailedPrecondition);
            message = absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id, " is ",
                                   layer.tier->description(),
                                   ": only tables resident in DRAM with --share-tables can be mapped");
            break;
          }
          shm::MappedLayer m{};
          m.layer_id = layer.pack_layer->id;
          m.total_rows = layer.tier->total_rows();
          m.row_bytes = static_cast<uint64_t>(layer.tier->row_bytes());
          struct stat st {};
          if (fstat(layer.tier->shared_fd(), &st) != 0) {
            reply.status = static_cast<int32_t>(absl::StatusCode::kInternal);
            message = absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id,
                                   ": cannot stat its shared memory: ", std::strerror(errno));
            break;
          }
          m.file_bytes = static_cast<uint64_t>(st.st_size);
          body.append(reinterpret_cast<const char*>(&m), sizeof(m));
          fds.push_back(layer.tier->shared_fd());
        }
      }
      if (reply.status != 0) {
        body = message;
        fds.clear();
      } else {
        reply.layers = static_cast<uint32_t>(fds.size());
        (*mapped)[request.table_id] = true;
        LogInfo("shm_table_mapped", {{"pid", who}, {"table", table->name()}, {"layers", absl::StrCat(fds.size())}});
      }
      return shm::SendFrame(sock, shm::FrameType::kMapTableReply,
                            std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, fds);
    }
    case shm::FrameType::kCounterReport: {
      const size_t n = frame.payload.size() / sizeof(shm::CounterReport);
      if (frame.payload.size() % sizeof(shm::CounterReport) != 0 || n == 0 || n > shm::kMaxCounterReports) {
        return absl::InvalidArgumentError("protocol violation: CounterReport frame of the wrong size");
      }
      size_t refused_count = 0;
      std::string first_refusal;
      for (size_t i = 0; i < n; ++i) {
        shm::CounterReport r{};
        std::memcpy(&r, frame.payload.data() + i * sizeof(r), sizeof(r));
        const Table* table = r.table_id < tables.size() && (*mapped)[r.table_id] ? tables[r.table_id] : nullptr;
        std::string refused;
        if (table == nullptr) {
          refused = absl::StrCat("table id ", r.table_id, " was not mapped by this client");
        } else if (table->FindLayer(r.layer_id) == nullptr) {
          refused = absl::StrCat("table '", table->name(), "' has no layer ", r.layer_id);
        } else if (r.lookups > r.rows || r.rows > (1ull << 40)) {
          refused = absl::StrCat(r.lookups, " lookups of ", r.rows, " rows is not a possible count");
        }
        if (!refused.empty()) {
          if (refused_count++ == 0) first_refusal = refused;
          continue;
        }
        metrics_->RecordMappedLookups(*table, r.lookups, r.rows);
        const Table::Layer* layer = table->FindLayer(r.layer_id);
        if (layer->hbm != nullptr && client->hbm_mapped[r.table_id]) layer->hbm->CountServed(0, r.rows);
      }
      if (refused_count > 0) {  // one line per frame, however many entries were wrong
        LogWarn("shm_counter_report_refused",
                {{"pid", who}, {"entries", absl::StrCat(refused_count)}, {"reason", first_refusal}});
      }
      return absl::OkStatus();
    }
    case shm::FrameType::kMapHbm:
      return HandleMapHbm(frame, sock, tables, client, who);
    case shm::FrameType::kAccessReport:
      return HandleAccessReport(frame, tables, client, who);
    default:
      return absl::InvalidArgumentError(absl::StrCat("protocol violation: unexpected frame type ",
                                                     static_cast<uint32_t>(frame.type)));
  }
}

absl::Status ShmServer::HandleMapHbm(const shm::Frame& frame, int sock, const std::vector<const Table*>& tables,
                                     ClientState* client, const std::string& who) {
  shm::MapTableRequest request{};
  if (frame.payload.size() != sizeof(request)) {
    return absl::InvalidArgumentError("protocol violation: MapHbm frame of the wrong size");
  }
  std::memcpy(&request, frame.payload.data(), sizeof(request));
  const Table* table = request.table_id < tables.size() ? tables[request.table_id] : nullptr;
  absl::Status refusal;
  if (table == nullptr || !client->mapped[request.table_id]) {
    refusal = absl::FailedPreconditionError(absl::StrCat("table id ", request.table_id,
                                                         " is not mapped by this client (MapTable first)"));
  } else if (client->hbm_mapped[request.table_id]) {
    refusal = absl::AlreadyExistsError(absl::StrCat("table '", table->name(), "' HBM tier is mapped already"));
  } else {
    for (const auto& layer : table->layers()) {
      if (layer.hbm == nullptr) {
        refusal = absl::FailedPreconditionError(
            absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id, " has no HBM tier"));
        break;
      }
    }
    const uint64_t pins = static_cast<uint64_t>(table->layers().size()) * shm::kPinsPerHbmLayer;
    if (refusal.ok() && client->next_pin + pins > shm::kMaxHbmPins) {
      refusal = absl::ResourceExhaustedError(absl::StrCat("a client may map the HBM tiers of at most ",
                                                          shm::kMaxHbmPins / shm::kPinsPerHbmLayer, " layers"));
    }
  }
  shm::MapTableReply reply{};
  std::string body;
  std::vector<int> fds;
  struct Closer {
    std::vector<int>* fds;
    ~Closer() {
      for (int fd : *fds) close(fd);
    }
  } closer{&fds};
  if (refusal.ok()) {
    for (const auto& layer : table->layers()) {
      HbmTier* tier = layer.hbm.get();
      shm::HbmLayer m{};
      m.layer_id = layer.pack_layer->id;
      m.kind = static_cast<uint32_t>(tier->store()->kind());
      m.first_pin = client->next_pin + static_cast<uint32_t>(body.size() / sizeof(m)) * shm::kPinsPerHbmLayer;
      m.slots = tier->store()->slots();
      m.row_bytes = static_cast<uint64_t>(tier->store()->row_bytes());
      m.index_bytes = tier->index_bytes();
      fds.push_back(ReopenReadOnly(tier->index_fd()));
      if (tier->store()->kind() == HbmStoreKind::kHost) {
        m.slot_bytes = tier->store()->bytes();
        fds.push_back(ReopenReadOnly(tier->store()->host_fd()));
      } else {
        auto ipc = tier->store()->ExportIpc();
        if (!ipc.ok()) {
          refusal = ipc.status();
          break;
        }
        m.device = ipc->device;
        std::memcpy(m.ipc_slots, ipc->slots.data(), std::min(ipc->slots.size(), sizeof(m.ipc_slots)));
        for (int b = 0; b < 2; ++b) {
          std::memcpy(m.ipc_keys[b], ipc->keys[b].data(), std::min(ipc->keys[b].size(), sizeof(m.ipc_keys[b])));
          std::memcpy(m.ipc_values[b], ipc->values[b].data(),
                      std::min(ipc->values[b].size(), sizeof(m.ipc_values[b])));
        }
      }
      if (std::find(fds.begin(), fds.end(), -1) != fds.end()) {
        refusal = absl::InternalError(absl::StrCat("reopening the HBM tier's files read-only: ", std::strerror(errno)));
        break;
      }
      body.append(reinterpret_cast<const char*>(&m), sizeof(m));
    }
  }
  if (!refusal.ok()) {
    reply.status = static_cast<int32_t>(refusal.code());
    body = std::string(refusal.message());
    return shm::SendFrame(sock, shm::FrameType::kMapHbmReply,
                          std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, {});
  }
  // The pins are watched from now on: a step never rewrites what a pinned reader may be reading.
  uint32_t pin = client->next_pin;
  for (const auto& layer : table->layers()) {
    for (uint32_t k = 0; k < shm::kPinsPerHbmLayer; ++k, ++pin) {
      const std::atomic<uint64_t>* p = &client->header->hbm_pins[pin];
      layer.hbm->AddReader(p);
      client->readers.push_back({layer.hbm.get(), p});
    }
  }
  client->next_pin = pin;
  client->hbm_mapped[request.table_id] = true;
  reply.layers = static_cast<uint32_t>(table->layers().size());
  LogInfo("shm_hbm_mapped", {{"pid", who}, {"table", table->name()}, {"layers", absl::StrCat(reply.layers)},
                             {"store", table->layers()[0].hbm->store()->description()}});
  return shm::SendFrame(sock, shm::FrameType::kMapHbmReply,
                        std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, fds);
}

absl::Status ShmServer::HandleAccessReport(const shm::Frame& frame, const std::vector<const Table*>& tables,
                                           ClientState* client, const std::string& who) {
  shm::AccessReport r{};
  if (frame.payload.size() < sizeof(r)) {
    return absl::InvalidArgumentError("protocol violation: AccessReport frame of the wrong size");
  }
  std::memcpy(&r, frame.payload.data(), sizeof(r));
  if (r.samples > shm::kMaxAccessSamples || frame.payload.size() != sizeof(r) + uint64_t{r.samples} * 8) {
    return absl::InvalidArgumentError("protocol violation: AccessReport frame of the wrong size");
  }
  const Table* table = r.table_id < tables.size() && client->hbm_mapped[r.table_id] ? tables[r.table_id] : nullptr;
  const Table::Layer* layer = table != nullptr ? table->FindLayer(r.layer_id) : nullptr;
  std::string refused;
  std::vector<uint64_t> rows(r.samples);
  if (r.samples > 0) std::memcpy(rows.data(), frame.payload.data() + sizeof(r), rows.size() * 8);
  if (table == nullptr) {
    refused = absl::StrCat("table id ", r.table_id, " has no HBM tier mapped by this client");
  } else if (layer == nullptr || layer->hbm == nullptr) {
    refused = absl::StrCat("table '", table->name(), "' has no HBM layer ", r.layer_id);
  } else if (r.hbm_rows > (1ull << 40)) {
    refused = absl::StrCat(r.hbm_rows, " rows from HBM is not a possible count");
  } else {
    for (uint64_t row : rows) {
      if (row >= layer->hbm->total_rows()) {
        refused = absl::StrCat("sampled row ", row, " is beyond the ", layer->hbm->total_rows(), " rows of layer ",
                               r.layer_id);
        break;
      }
    }
  }
  if (!refused.empty()) {
    LogWarn("shm_access_report_refused", {{"pid", who}, {"reason", refused}});
    return absl::OkStatus();
  }
  layer->hbm->RecordRows(rows, shm::kAccessSampleEvery);
  layer->hbm->CountServed(r.hbm_rows, 0);
  if (r.hbm_rows > 0) metrics_->RecordMappedLookups(*table, 0, r.hbm_rows, TierKind::kHbm);
  return absl::OkStatus();
}

void ShmServer::WaitForHangUp(int sock) {
  char discard[4096];
  while (!stopping_.load()) {
    pollfd p{sock, POLLIN | POLLRDHUP, 0};
    const int rc = poll(&p, 1, 200);
    if (rc < 0 && errno != EINTR) return;
    if (rc <= 0) continue;
    if (p.revents & (POLLHUP | POLLERR | POLLRDHUP | POLLNVAL)) return;
    // Whatever the client still sends is dropped (descriptors with it are closed by the kernel).
    const ssize_t n = recv(sock, discard, sizeof(discard), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;
  }
}

void ShmServer::Serve(Session* session) {
  const int sock = session->sock;
  const std::string who = absl::StrCat(session->pid);
  ClientState* watched = nullptr;  // set once the client exists: its HBM pins
  auto finish = [&](const std::string& reason) {
    LogInfo("shm_client_gone", {{"pid", who}, {"reason", reason}});
    if (watched != nullptr && !watched->readers.empty() && !stopping_.load()) {
      // The daemon ends this session, but the client may still be reading HBM slots under a pin.
      // Its pins stay watched until its socket hangs up (peer pids are no help across PID
      // namespaces); at shutdown the promoter has stopped first, so nothing moves any more.
      shutdown(sock, SHUT_WR);  // the client sees end-of-stream and gives up its session
      WaitForHangUp(sock);
    }
    shutdown(sock, SHUT_RDWR);  // the client sees the hang-up now; the Session closes the fd when reaped
    session->done.store(true);
  };
  // Handshake.
  auto hello_frame = shm::ReceiveFrame(sock, 5000);
  if (hello_frame.ok()) {
    for (int fd : hello_frame->fds) close(fd);  // a client has no business sending descriptors
  }
  if (!hello_frame.ok() || hello_frame->type != shm::FrameType::kHello ||
      hello_frame->payload.size() != sizeof(shm::Hello)) {
    return finish("no valid hello");
  }
  shm::Hello hello;
  std::memcpy(&hello, hello_frame->payload.data(), sizeof(hello));
  auto refuse = [&](absl::StatusCode code, const std::string& msg) {
    shm::HelloReply reply{};
    reply.status = static_cast<int32_t>(code);
    std::string payload(reinterpret_cast<const char*>(&reply), sizeof(reply));
    payload += msg;
    (void)shm::SendFrame(sock, shm::FrameType::kHelloReply, payload, {});
    finish(msg);
  };
  if (hello.magic != shm::kMagic || hello.version < shm::kMinVersion || hello.version > shm::kVersion) {
    return refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("protocol version ", hello.version, " is not supported (this engramd speaks ",
                               shm::kMinVersion, " to ", shm::kVersion, ")"));
  }
  const uint32_t entries = hello.ring_entries;
  if (entries < 2 || entries > shm::kMaxRingEntries || (entries & (entries - 1)) != 0) {
    return refuse(absl::StatusCode::kInvalidArgument, absl::StrCat("ring_entries ", entries, " is not a power of two in [2, 4096]"));
  }
  if (hello.data_bytes == 0 || hello.data_bytes > options_.max_client_arena_bytes) {
    return refuse(absl::StatusCode::kResourceExhausted,
                  absl::StrCat("data region of ", hello.data_bytes, " bytes is outside (0, --max-client-arena ",
                               options_.max_client_arena_bytes, "]"));
  }
  Arena arena;
  if (absl::Status s = arena.Create(entries, hello.data_bytes); !s.ok()) {
    return refuse(s.code(), std::string(s.message()));
  }
  const shm::HelloReply reply = arena.Reply();
  if (!shm::SendFrame(sock, shm::FrameType::kHelloReply,
                      std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)),
                      {arena.memfd(), arena.request_efd(), arena.completion_efd()})
           .ok()) {
    return finish("hello reply not delivered");
  }
  LogInfo("shm_client", {{"pid", who}, {"uid", absl::StrCat(session->uid)},
                         {"arena_bytes", absl::StrCat(reply.arena_bytes)}, {"ring_entries", absl::StrCat(entries)}});

  ArenaHeader* h = arena.header();
  const auto tables = engine_->tables();
  ClientState client;  // declared after the arena: its pins leave the HBM tiers before the arena goes
  watched = &client;
  client.header = h;
  client.mapped.assign(tables.size(), false);
  client.hbm_mapped.assign(tables.size(), false);
  uint32_t head = 0, completion_tail = 0;  // the daemon's own copies; shared ones are only published
  RequestMetrics* const lookup_metrics = metrics_->Requests("shm", "Lookup");  // resolved once per session
  RequestMetrics* const prefetch_metrics = metrics_->Requests("shm", "Prefetch");
  std::vector<uint32_t> indices;
  for (;;) {
    const uint32_t tail = h->request_tail.load(std::memory_order_acquire);
    const uint32_t queued = tail - head;
    if (queued > entries) return finish("protocol violation: request ring position out of range");
    if (queued == 0) {
      // Spin briefly (the next request is usually microseconds away), then sleep on the eventfd,
      // still watching the socket: its hang-up is how a client's exit shows.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(options_.spin_us);
      bool arrived = false;
      while (std::chrono::steady_clock::now() < spin_until) {
        if (h->request_tail.load(std::memory_order_acquire) != head) {
          arrived = true;
          break;
        }
      }
      if (arrived) continue;
      h->daemon_sleeping.store(1, std::memory_order_seq_cst);
      if (h->request_tail.load(std::memory_order_seq_cst) != head) {
        h->daemon_sleeping.store(0, std::memory_order_relaxed);
        continue;
      }
      pollfd fds[2] = {{sock, POLLIN, 0}, {arena.request_efd(), POLLIN, 0}};
      const int rc = poll(fds, 2, 1000);
      h->daemon_sleeping.store(0, std::memory_order_relaxed);
      if (stopping_.load()) return finish("daemon stopping");
      if (rc < 0 && errno != EINTR) return finish(absl::StrCat("poll: ", std::strerror(errno)));
      if (rc > 0 && (fds[1].revents & POLLIN)) {
        uint64_t counter;
        // Non-blocking: EAGAIN means another wake-up drained it first; anything else is a bug.
        if (read(arena.request_efd(), &counter, sizeof(counter)) < 0 && errno != EAGAIN && errno != EINTR) {
          return finish(absl::StrCat("reading the request eventfd: ", std::strerror(errno)));
        }
      }
      if (rc > 0 && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
        auto frame = shm::ReceiveFrame(sock, 1000);
        if (!frame.ok()) return finish("socket closed");
        for (int fd : frame->fds) close(fd);
        if (frame->type != shm::FrameType::kOpenTable && hello.version < 2) {
          return finish("protocol violation: version 1 clients have no mapped tables");
        }
        if ((frame->type == shm::FrameType::kMapHbm || frame->type == shm::FrameType::kAccessReport) &&
            hello.version < 3) {
          return finish("protocol violation: HBM frames need protocol 3");
        }
        if (absl::Status s = HandleControlFrame(*frame, sock, tables, &client, who); !s.ok()) {
          return finish(std::string(s.message()));
        }
      }
      continue;
    }

    // One request: copy the descriptor out of shared memory, then check everything in it.
    const auto start = std::chrono::steady_clock::now();
    const RequestDescriptor d = arena.ReadRequest(head);
    ++head;
    h->request_head.store(head, std::memory_order_release);
    Completion c{};
    c.request_id = d.request_id;
    absl::Status s;
    const Table* table = d.table_id < tables.size() ? tables[d.table_id] : nullptr;
    const uint8_t* index_bytes = arena.DataRange(d.indices_offset, d.indices_bytes);
    if (draining_.load()) {
      s = absl::UnavailableError("engramd is shutting down; reconnect to the restarted daemon");
    } else if (table == nullptr) {
      s = absl::NotFoundError(absl::StrCat("table id ", d.table_id, " is not one this daemon gave out"));
    } else if (d.op != static_cast<uint32_t>(shm::Op::kLookup) && d.op != static_cast<uint32_t>(shm::Op::kPrefetch)) {
      s = absl::InvalidArgumentError(absl::StrCat("unknown op ", d.op));
    } else if (index_bytes == nullptr || d.indices_bytes % 4 != 0) {
      s = absl::InvalidArgumentError(absl::StrCat("indices [", d.indices_offset, ", +", d.indices_bytes,
                                                  ") are not whole uint32 values inside the data region"));
    } else if (absl::Status shape = CheckRequestShape(d.num_tokens, static_cast<uint64_t>(table->heads()), d.indices_bytes / 4,
                                                       engine_->options().max_batch_rows);
               !shape.ok()) {
      s = shape;  // nothing is copied out of a request before its size is known to be sane
    } else {
      indices.resize(d.indices_bytes / 4);
      std::memcpy(indices.data(), index_bytes, d.indices_bytes);  // copied: the client cannot change them now
      if (d.op == static_cast<uint32_t>(shm::Op::kPrefetch)) {
        s = engine_->Prefetch(*table, static_cast<int>(d.layer), d.num_tokens, indices).status();
      } else {
        uint8_t* out = arena.DataRange(d.out_offset, d.out_bytes);
        if (out == nullptr) {
          s = absl::InvalidArgumentError(absl::StrCat("output [", d.out_offset, ", +", d.out_bytes,
                                                      ") does not lie inside the data region"));
        } else {
          LookupStats stats;
          s = engine_->Lookup(*table, static_cast<int>(d.layer), d.num_tokens, indices,
                              absl::MakeSpan(out, d.out_bytes), &stats);
          if (s.ok()) {
            metrics_->RecordLookup(*table, stats);
            c.rows_read = stats.rows_read;
            c.dram_rows = stats.tiers.rows[static_cast<int>(TierKind::kDram)];
            c.nvme_rows = stats.tiers.rows[static_cast<int>(TierKind::kNvme)];
          }
        }
      }
    }
    SetMessage(&c, s);
    (d.op == static_cast<uint32_t>(shm::Op::kPrefetch) ? prefetch_metrics : lookup_metrics)
        ->Record(s.code(), std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    // Post the completion; a client that stops consuming only stalls its own session.
    for (;;) {
      const uint32_t consumed = h->completion_head.load(std::memory_order_acquire);
      const uint32_t used = completion_tail - consumed;
      if (used > entries) return finish("protocol violation: completion ring position out of range");
      if (used < entries) break;
      pollfd p{sock, POLLIN, 0};
      const int ready = poll(&p, 1, 10);
      if (ready > 0 && (p.revents & (POLLHUP | POLLERR))) return finish("socket closed");
      if (ready > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // data, not a hang-up: no spin
      if (stopping_.load()) return finish("daemon stopping");
    }
    arena.WriteCompletion(completion_tail, c);
    ++completion_tail;
    h->completion_tail.store(completion_tail, std::memory_order_seq_cst);
    if (h->client_sleeping.load(std::memory_order_seq_cst)) {
      const uint64_t one = 1;
      // EAGAIN: the counter is saturated, so the client has a wake-up pending anyway.
      if (write(arena.completion_efd(), &one, sizeof(one)) < 0 && errno != EAGAIN && errno != EINTR) {
        return finish(absl::StrCat("waking the client: ", std::strerror(errno)));
      }
    }
  }
}

}  // namespace engram
