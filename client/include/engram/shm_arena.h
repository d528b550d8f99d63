// The shared-memory arena of one client session (engram/shm_protocol.h): where its header, rings
// and data region lie, computed the same way by the daemon that creates the arena and by the
// client that checks the daemon's HelloReply against it, and a view that reads and writes ring
// slots by their free-running positions and hands out data ranges only when they lie inside the
// data region. Part of engram_shm, which both libengram_client and engramd link. The view does
// no synchronization of its own: the ring protocol (positions in ArenaHeader) orders the accesses.
#ifndef ENGRAM_CLIENT_SHM_ARENA_H_
#define ENGRAM_CLIENT_SHM_ARENA_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "engram/shm_protocol.h"

namespace engram::shm {

struct ArenaLayout {
  uint32_t ring_entries = 0;
  uint64_t request_ring_offset = 0;
  uint64_t completion_ring_offset = 0;
  uint64_t data_offset = 0;
  uint64_t data_bytes = 0;
  uint64_t arena_bytes = 0;
};

// InvalidArgument unless `ring_entries` is a power of two in [2, kMaxRingEntries] and
// `data_bytes` is in (0, 2^48).
absl::StatusOr<ArenaLayout> ComputeArenaLayout(uint32_t ring_entries, uint64_t data_bytes);

// The layout a HelloReply announces, checked against ComputeArenaLayout of its own ring size and
// data size (DataLoss when they differ: the reply is not from a daemon speaking this protocol).
absl::StatusOr<ArenaLayout> LayoutFromReply(const HelloReply& reply);
HelloReply ReplyFor(const ArenaLayout& layout);

class ArenaView {
 public:
  ArenaView() = default;
  ArenaView(uint8_t* base, const ArenaLayout& layout) : base_(base), layout_(layout) {}

  ArenaHeader* header() const { return reinterpret_cast<ArenaHeader*>(base_); }
  const ArenaLayout& layout() const { return layout_; }
  uint8_t* data() const { return base_ + layout_.data_offset; }
  // Descriptors are copied in and out whole, never used in place (the other side may change them).
  RequestDescriptor ReadRequest(uint32_t position) const;
  void WriteRequest(uint32_t position, const RequestDescriptor& d) const;
  Completion ReadCompletion(uint32_t position) const;
  void WriteCompletion(uint32_t position, const Completion& c) const;
  // [offset, offset + length) of the data region, or nullptr when it does not lie inside it.
  uint8_t* DataRange(uint64_t offset, uint64_t length) const;

 private:
  uint8_t* Slot(uint64_t ring_offset, uint32_t position, uint64_t entry_bytes) const {
    return base_ + ring_offset + (position & (layout_.ring_entries - 1)) * entry_bytes;
  }
  uint8_t* base_ = nullptr;
  ArenaLayout layout_;
};

}  // namespace engram::shm

#endif  // ENGRAM_CLIENT_SHM_ARENA_H_
