// Raw access to a ShmConnection's arena and ring, for tests that play a misbehaving client
// (hostile descriptors, ring positions, a client scribbling on its own data region). Not
// installed: no engine has any business here.
#ifndef ENGRAM_CLIENT_SHM_TESTING_H_
#define ENGRAM_CLIENT_SHM_TESTING_H_

#include "engram/shm_connection.h"

namespace engram {

class ShmConnectionTestPeer {
 public:
  static shm::ArenaHeader* header(ShmConnection& c) { return c.header(); }
  static uint8_t* data(ShmConnection& c) { return c.data(); }
  static uint64_t data_bytes(ShmConnection& c) { return c.reply_.data_bytes; }
  static absl::Status Post(ShmConnection& c, const shm::RequestDescriptor& d) { return c.Post(d); }
  static absl::StatusOr<shm::Completion> WaitCompletion(ShmConnection& c) { return c.WaitCompletion(); }
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_SHM_TESTING_H_
