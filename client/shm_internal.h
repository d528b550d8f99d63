// Small pieces the client's shared-memory files share (not installed).
#ifndef ENGRAM_CLIENT_SHM_INTERNAL_H_
#define ENGRAM_CLIENT_SHM_INTERNAL_H_

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <vector>

namespace engram::shm_internal {

// Closes the descriptors a frame brought (unless released by setting fds to null).
struct FdsCloser {
  std::vector<int>* fds;
  ~FdsCloser() {
    if (fds == nullptr) return;
    for (int fd : *fds) close(fd);
  }
};

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace engram::shm_internal

#endif  // ENGRAM_CLIENT_SHM_INTERNAL_H_
