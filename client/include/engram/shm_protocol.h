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
// itself. The daemon writes rows into a client's data region and never reads them back: what it
// caches, promotes to HBM or hands to another request waiting on the same read comes from its own
// buffers (tiering/row_tier.h states the contract), so a client scribbling on its region while its
// lookups are in flight spoils only its own replies. Ring positions are free-running uint32 counters; the daemon keeps
// its own copies and treats an impossible producer position as a protocol violation (disconnect).
//
// Mapped tables: a MapTable frame asks for a resident table's rows themselves. The reply carries one
// sealed memfd per layer (read-only for good: no writable mapping, no resize), and the client
// gathers from its own mapping with no round trip. It reports what it served in CounterReport
// frames (batched, about once a second), which the daemon adds to its metrics.
//
// HBM (protocol 3): where the daemon runs an HBM tier over a mapped table, MapHbm hands the client
// each layer's published index (a memfd, read-only; engram/kernels/hbm_probe.h describes it and
// the pin protocol) and the slots (a read-only memfd for the host store, CUDA IPC handles for GPU
// memory), plus a range of pins in the client's own arena header. The client gathers hits from the
// slots and the rest from the mapped table, and sends AccessReport frames: samples of the rows it
// served (so the daemon's promoter sees its load) and how many rows came from HBM.
#ifndef ENGRAM_CLIENT_SHM_PROTOCOL_H_
#define ENGRAM_CLIENT_SHM_PROTOCOL_H_

#include <atomic>
#include <cstdint>

namespace engram::shm {

inline constexpr uint32_t kMagic = 0x52474e45;  // "ENGR"
inline constexpr uint32_t kVersion = 3;         // 2: MapTable and CounterReport; 3: MapHbm, AccessReport
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
  kMapHbm = 8,         // payload: MapTableRequest (the table must be mapped already)
  kMapHbmReply = 9,    // payload: MapTableReply + HbmLayer[layers] (OK; fds: index, then slots for host stores)
  kAccessReport = 10,  // payload: AccessReport + uint64 rows[samples]; no reply
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
  uint64_t data_bytes;  // size of the data region the client wants
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

inline constexpr uint32_t kMaxHbmPins = 256;     // in the arena header
inline constexpr uint32_t kPinsPerHbmLayer = 8;  // one per concurrent reader of a layer
inline constexpr uint32_t kMaxAccessSamples = 4096;
// A client samples about one in this many of the rows it gathers; each sample it reports stands
// for this many accesses.
inline constexpr uint32_t kAccessSampleEvery = 64;

enum class HbmKind : uint32_t { kHost = 1, kCuda = 2 };

struct HbmLayer {
  int32_t layer_id;
  uint32_t kind;       // HbmKind
  uint32_t first_pin;  // pins [first_pin, first_pin + kPinsPerHbmLayer) of ArenaHeader::hbm_pins
  uint32_t slots;
  uint64_t row_bytes;
  uint64_t index_bytes;  // the index memfd's size
  uint64_t slot_bytes;   // host stores: the slots memfd's size
  int32_t device;        // CUDA stores: the GPU
  uint32_t reserved;
  char ipc_slots[64];    // CUDA stores: cudaIpcMemHandle_t of the slots [slots][row_bytes]
  char ipc_keys[2][64];  // ... of the index buffers on the device
  char ipc_values[2][64];
};

// Rows a client served from a mapped layer since its last report: how many came from HBM, and a
// sample of the rows (global row numbers) for the promoter.
struct AccessReport {
  uint32_t table_id;
  int32_t layer_id;
  uint64_t hbm_rows;
  uint32_t samples;
  uint32_t reserved;
};

enum class Op : uint32_t { kLookup = 1, kPrefetch = 2 };

struct RequestDescriptor {
  uint64_t request_id;
  uint32_t op;  // Op
  uint32_t table_id;
  uint32_t layer;
  uint32_t num_tokens;
  uint64_t indices_offset;  // into the data region: little-endian uint32 [num_tokens][heads]
  uint64_t indices_bytes;
  uint64_t out_offset;  // into the data region: [num_tokens][heads][row_bytes] (Lookup)
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
  // Protocol 3: HBM readers' pins (generation + 1 in use, 0 idle); the daemon only reads them.
  alignas(64) std::atomic<uint64_t> hbm_pins[kMaxHbmPins];
};
static_assert(sizeof(ArenaHeader) <= kHeaderBytes);
static_assert(std::atomic<uint32_t>::is_always_lock_free);
static_assert(std::atomic<uint64_t>::is_always_lock_free);

inline constexpr uint64_t RingBytes(uint32_t entries, uint64_t entry_bytes) {
  return (entries * entry_bytes + 4095) / 4096 * 4096;
}

}  // namespace engram::shm

#endif  // ENGRAM_CLIENT_SHM_PROTOCOL_H_
