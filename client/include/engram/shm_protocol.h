// The shared-memory transport's wire format, shared by engramd and libengram_client.
//
// Control: a Unix stream socket carrying frames (FrameHeader + payload). The client says Hello; the
// daemon checks the peer's credentials, creates a per-client arena (a sealed memfd: it cannot be
// shrunk, so the daemon never faults on it) and two eventfds, and passes the three with SCM_RIGHTS
// in its HelloReply. OpenTable frames resolve a table name to an id and its layout (a serialized
// engram.v1.TableInfo).
//
// Data: the arena holds an ArenaHeader, a request ring (client produces, daemon consumes), a
// completion ring (daemon produces, client consumes) and a data region where the client places
// indices and the daemon gathers rows. Every descriptor is copied out of shared memory before it is
// checked, the indices too, so a client that rewrites memory under the daemon's feet only hurts
// itself. Ring positions are free-running uint32 counters; the daemon keeps its own copies and
// treats an impossible producer position as a protocol violation (disconnect).
//
// Mapped tables: a MapTable frame asks for a resident table's rows themselves. The reply carries one
// sealed memfd per layer (read-only for good: no writable mapping, no resize), and the client
// gathers from its own mapping with no round trip. It reports what it served in CounterReport
// frames (batched, about once a second), which the daemon adds to its metrics.
#ifndef ENGRAM_CLIENT_SHM_PROTOCOL_H_
#define ENGRAM_CLIENT_SHM_PROTOCOL_H_

#include <atomic>
#include <cstdint>

namespace engram::shm {

inline constexpr uint32_t kMagic = 0x52474e45;  // "ENGR"
inline constexpr uint32_t kVersion = 2;         // 2: MapTable and CounterReport
inline constexpr uint32_t kMinVersion = 1;      // the oldest a daemon still serves (no mapped tables)
inline constexpr uint32_t kMaxRingEntries = 4096;
inline constexpr uint64_t kHeaderBytes = 4096;

enum class FrameType : uint32_t {
  kHello = 1,
  kHelloReply = 2,
  kOpenTable = 3,
  kOpenTableReply = 4,
  kMapTable = 5,       // payload: MapTableRequest
  kMapTableReply = 6,  // payload: MapTableReply + MappedLayer[layers] (OK, one fd each) or a message
  kCounterReport = 7,  // payload: CounterReport[1..kMaxCounterReports]; no reply
};

struct FrameHeader {
  uint32_t type;
  uint32_t payload_bytes;  // at most 64 MiB
};

struct Hello {
  uint32_t magic;
  uint32_t version;
  uint32_t ring_entries;  // power of two, 2..kMaxRingEntries
  uint32_t reserved;
  uint64_t data_bytes;    // size of the data region the client wants
};

// Status codes are absl::StatusCode values. A non-OK reply carries a message after the struct.
struct HelloReply {
  int32_t status;
  uint32_t ring_entries;
  uint64_t arena_bytes;
  uint64_t request_ring_offset;
  uint64_t completion_ring_offset;
  uint64_t data_offset;
  uint64_t data_bytes;
};

struct OpenTableReply {
  int32_t status;
  uint32_t table_id;
  // followed by a serialized engram.v1.TableInfo (OK) or a message (error)
};

struct MapTableRequest {
  uint32_t table_id;
};

struct MapTableReply {
  int32_t status;
  uint32_t layers;
};

struct MappedLayer {
  int32_t layer_id;
  uint32_t reserved;
  uint64_t total_rows;
  uint64_t row_bytes;
  uint64_t file_bytes;  // the memfd's size (>= total_rows * row_bytes)
};

inline constexpr uint32_t kMaxCounterReports = 256;

// What a client served from a mapped table's layer since its last report.
struct CounterReport {
  uint32_t table_id;
  int32_t layer_id;
  uint64_t lookups;
  uint64_t rows;
};

enum class Op : uint32_t { kLookup = 1, kPrefetch = 2 };

struct RequestDescriptor {
  uint64_t request_id;
  uint32_t op;          // Op
  uint32_t table_id;
  uint32_t layer;
  uint32_t num_tokens;
  uint64_t indices_offset;  // into the data region: little-endian uint32 [num_tokens][heads]
  uint64_t indices_bytes;
  uint64_t out_offset;      // into the data region: [num_tokens][heads][row_bytes] (Lookup)
  uint64_t out_bytes;
};

struct Completion {
  uint64_t request_id;
  int32_t status;  // absl::StatusCode
  uint32_t reserved;
  uint64_t rows_read, dram_rows, nvme_rows;
  char message[224];  // NUL-terminated when status is not OK
};

struct alignas(64) ArenaHeader {
  uint32_t magic;
  uint32_t version;
  uint32_t ring_entries;
  uint32_t reserved;
  alignas(64) std::atomic<uint32_t> request_tail;     // client writes
  alignas(64) std::atomic<uint32_t> request_head;     // daemon writes
  alignas(64) std::atomic<uint32_t> completion_tail;  // daemon writes
  alignas(64) std::atomic<uint32_t> completion_head;  // client writes
  alignas(64) std::atomic<uint32_t> daemon_sleeping;  // 1: the daemon waits on the request eventfd
  alignas(64) std::atomic<uint32_t> client_sleeping;  // 1: the client waits on the completion eventfd
};
static_assert(sizeof(ArenaHeader) <= kHeaderBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free);

inline constexpr uint64_t RingBytes(uint32_t entries, uint64_t entry_bytes) {
  return (entries * entry_bytes + 4095) / 4096 * 4096;
}

}  // namespace engram::shm

#endif  // ENGRAM_CLIENT_SHM_PROTOCOL_H_
