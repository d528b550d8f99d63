#include "service/shm_admission.h"

#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace engram {

absl::StatusOr<ShmPeer> ReadShmPeer(int fd) {
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 || len != sizeof(cred)) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot read the peer's credentials (SO_PEERCRED): ", std::strerror(errno)));
  }
  ShmPeer peer{cred.pid, cred.uid, cred.gid, {}};
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

bool ShmPeerAdmitted(const ShmPeer& peer, const std::vector<uid_t>& uids, const std::vector<gid_t>& gids) {
  for (uid_t u : uids) {
    if (u == peer.uid) return true;
  }
  for (gid_t g : gids) {
    if (g == peer.gid || std::find(peer.groups.begin(), peer.groups.end(), g) != peer.groups.end()) return true;
  }
  return false;
}

}  // namespace engram
