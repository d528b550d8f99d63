// Admission to the shared-memory transport: who is on the other end of an accepted Unix socket
// (SO_PEERCRED, and SO_PEERGROUPS for the supplementary groups) and whether --allow-uid /
// --allow-gid let them in. Pure functions of the socket and the lists; thread-safe.
#ifndef ENGRAM_SERVICE_SHM_ADMISSION_H_
#define ENGRAM_SERVICE_SHM_ADMISSION_H_

#include <sys/types.h>

#include <vector>

#include "absl/status/statusor.h"

namespace engram {

struct ShmPeer {
  pid_t pid = 0;  // 0 when the peer is in another PID namespace: never use it to decide anything
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary; empty where the kernel has no SO_PEERGROUPS
};

// PermissionDenied when the credentials cannot be read (then the peer must be refused).
absl::StatusOr<ShmPeer> ReadShmPeer(int fd);

// True when the peer's uid is in `uids`, or its primary or a supplementary group is in `gids`.
bool ShmPeerAdmitted(const ShmPeer& peer, const std::vector<uid_t>& uids, const std::vector<gid_t>& gids);

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_ADMISSION_H_
