// Frames on the shared-memory transport's Unix socket: FrameHeader + payload, with file
// descriptors passed alongside (SCM_RIGHTS). Blocking calls with a timeout; thread-compatible.
#ifndef ENGRAM_CLIENT_SHM_SOCKET_H_
#define ENGRAM_CLIENT_SHM_SOCKET_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engram/shm_protocol.h"

namespace engram::shm {

struct Frame {
  FrameType type;
  std::string payload;
  std::vector<int> fds;  // received descriptors; the caller owns (closes) them
};

absl::Status SendFrame(int sock, FrameType type, const std::string& payload, const std::vector<int>& fds);
// Waits up to timeout_ms for a whole frame. Unavailable when the peer has gone away.
absl::StatusOr<Frame> ReceiveFrame(int sock, int timeout_ms);

}  // namespace engram::shm

#endif  // ENGRAM_CLIENT_SHM_SOCKET_H_
