#include "service/shm_server.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"
#include "service/log.h"
#include "service/shm_admission.h"

namespace engram {
namespace {

bool UsableDir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  return access(dir.c_str(), W_OK | X_OK) == 0;
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
    : options_(std::move(options)), context_{engine, metrics, &options_, &stopping_, &draining_} {
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
    return absl::AlreadyExistsError(
        absl::StrCat("another engramd is serving ", path_, " (stop it, or give this one its own --socket)"));
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
  std::list<std::unique_ptr<ShmSession>> sessions;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : sessions_) s->ShutDownSocket();  // every socket is still open: sessions own them
    sessions.swap(sessions_);
  }
  sessions.clear();                   // each joins its thread, then closes its socket
  if (bound_) unlink(path_.c_str());  // only a socket this server created; never another daemon's
}

size_t ShmServer::sessions() const {
  std::lock_guard<std::mutex> lock(mu_);
  size_t n = 0;
  for (const auto& s : sessions_) n += s->done() ? 0 : 1;
  return n;
}

void ShmServer::AcceptLoop() {
  while (!stopping_.load()) {
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopping_.load()) return;  // the listener was shut down
      if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS) {
        // Out of descriptors or memory for now: keep the listener, try again shortly.
        LogWarn("shm_accept_failed", {{"error", std::strerror(errno)}, {"retry_ms", "100"}});
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      LogError("shm_accept_failed", {{"error", std::strerror(errno)}, {"note", "no new shared-memory clients"}});
      return;
    }
    auto peer = ReadShmPeer(fd);
    if (!peer.ok()) {  // credentials we cannot read are credentials we cannot check: refuse
      LogWarn("shm_refused", {{"reason", std::string(peer.status().message())}});
      close(fd);
      continue;
    }
    if (!ShmPeerAdmitted(*peer, options_.allow_uids, options_.allow_gids)) {
      const std::string msg = absl::StrCat("uid ", peer->uid, " gid ", peer->gid,
                                           " may not use this engramd (see --allow-uid / --allow-gid)");
      shm::HelloReply reply{};
      reply.status = static_cast<int32_t>(absl::StatusCode::kPermissionDenied);
      std::string payload(reinterpret_cast<const char*>(&reply), sizeof(reply));
      payload += msg;
      (void)shm::SendFrame(fd, shm::FrameType::kHelloReply, payload, {});
      LogWarn("shm_refused", {{"pid", absl::StrCat(peer->pid)},
                              {"uid", absl::StrCat(peer->uid)},
                              {"gid", absl::StrCat(peer->gid)},
                              {"groups", absl::StrCat(peer->groups.size())}});
      close(fd);
      continue;
    }
    std::lock_guard<std::mutex> lock(mu_);
    // Reap finished sessions so a long-lived daemon does not keep their threads and sockets.
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      it = (*it)->done() ? sessions_.erase(it) : std::next(it);
    }
    if (options_.max_clients > 0 && sessions_.size() >= static_cast<size_t>(options_.max_clients)) {
      // Each session is a thread (the 2 us path): refuse beyond the cap, saying so.
      const std::string msg =
          absl::StrCat("engramd already serves ", sessions_.size(), " shared-memory clients, its limit (--max-clients ",
                       options_.max_clients, ")");
      shm::HelloReply reply{};
      reply.status = static_cast<int32_t>(absl::StatusCode::kResourceExhausted);
      std::string payload(reinterpret_cast<const char*>(&reply), sizeof(reply));
      payload += msg;
      (void)shm::SendFrame(fd, shm::FrameType::kHelloReply, payload, {});
      LogWarn("shm_refused", {{"pid", absl::StrCat(peer->pid)}, {"reason", msg}});
      close(fd);
      continue;
    }
    auto session = std::make_unique<ShmSession>(fd, peer->pid, peer->uid, context_);
    ShmSession* raw = session.get();
    sessions_.push_back(std::move(session));
    raw->Start();
  }
}

}  // namespace engram
