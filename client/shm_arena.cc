#include "engram/shm_arena.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace engram::shm {

absl::StatusOr<ArenaLayout> ComputeArenaLayout(uint32_t ring_entries, uint64_t data_bytes) {
  if (ring_entries < 2 || ring_entries > kMaxRingEntries || (ring_entries & (ring_entries - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ring_entries ", ring_entries, " is not a power of two in [2, ", kMaxRingEntries, "]"));
  }
  if (data_bytes == 0 || data_bytes >= (uint64_t{1} << 48)) {
    return absl::InvalidArgumentError(absl::StrCat("a data region of ", data_bytes, " bytes is not possible"));
  }
  ArenaLayout l;
  l.ring_entries = ring_entries;
  l.request_ring_offset = kHeaderBytes;
  l.completion_ring_offset = l.request_ring_offset + RingBytes(ring_entries, sizeof(RequestDescriptor));
  l.data_offset = l.completion_ring_offset + RingBytes(ring_entries, sizeof(Completion));
  l.data_bytes = data_bytes;
  l.arena_bytes = l.data_offset + data_bytes;
  return l;
}

absl::StatusOr<ArenaLayout> LayoutFromReply(const HelloReply& reply) {
  auto want = ComputeArenaLayout(reply.ring_entries, reply.data_bytes);
  if (!want.ok()) return absl::DataLossError(absl::StrCat("engramd's hello reply: ", want.status().message()));
  if (reply.request_ring_offset != want->request_ring_offset ||
      reply.completion_ring_offset != want->completion_ring_offset || reply.data_offset != want->data_offset ||
      reply.arena_bytes != want->arena_bytes) {
    return absl::DataLossError("engramd's hello reply describes an arena this protocol does not lay out that way");
  }
  return *want;
}

HelloReply ReplyFor(const ArenaLayout& l) {
  return {0,           l.ring_entries, l.arena_bytes, l.request_ring_offset, l.completion_ring_offset, l.data_offset,
          l.data_bytes};
}

RequestDescriptor ArenaView::ReadRequest(uint32_t position) const {
  RequestDescriptor d;
  std::memcpy(&d, Slot(layout_.request_ring_offset, position, sizeof(d)), sizeof(d));
  return d;
}

void ArenaView::WriteRequest(uint32_t position, const RequestDescriptor& d) const {
  std::memcpy(Slot(layout_.request_ring_offset, position, sizeof(d)), &d, sizeof(d));
}

Completion ArenaView::ReadCompletion(uint32_t position) const {
  Completion c;
  std::memcpy(&c, Slot(layout_.completion_ring_offset, position, sizeof(c)), sizeof(c));
  c.message[sizeof(c.message) - 1] = '\0';
  return c;
}

void ArenaView::WriteCompletion(uint32_t position, const Completion& c) const {
  std::memcpy(Slot(layout_.completion_ring_offset, position, sizeof(c)), &c, sizeof(c));
}

uint8_t* ArenaView::DataRange(uint64_t offset, uint64_t length) const {
  if (offset > layout_.data_bytes || length > layout_.data_bytes - offset) return nullptr;
  return base_ + layout_.data_offset + offset;
}

}  // namespace engram::shm
