// ShmConnection: a client's end of engramd's shared-memory transport (engram/shm_protocol.h).
// Connect performs the handshake (peer credentials are checked by the daemon), maps the arena the
// daemon created, and then each call places indices in the arena's data region, posts a
// descriptor and waits (briefly spinning, then on an eventfd) for its completion; rows are
// gathered by the daemon straight into the data region. A daemon that goes away surfaces as
// UNAVAILABLE. Tables the daemon holds resident can also be mapped read-only (MapTable, see
// engram/mapped_table.h) and gathered from here without a round trip.
// Thread-safe: calls on one connection are serialized (one request in flight).
#ifndef ENGRAM_CLIENT_SHM_CONNECTION_H_
#define ENGRAM_CLIENT_SHM_CONNECTION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/shm_arena.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"

namespace engram {
namespace v1 {
class TableInfo;
}

struct ShmConnectOptions {
  uint64_t data_bytes = 64ull << 20;  // the largest request's indices + rows must fit
  uint32_t ring_entries = 64;
  int timeout_ms = 30000;  // for one request's completion
  int spin_us = 50;
  // Mapped tables report their counts this often; a report is also how a mapped table notices
  // that the daemon went away (UNAVAILABLE), so this bounds how long it serves without one.
  int mapped_report_interval_ms = 1000;
  // Mapped tables also gather from the daemon's HBM tier when it offers one.
  bool use_hbm = true;
};

struct RemoteTable {
  uint32_t id = 0;
  std::string name;
  uint32_t heads = 0;
  uint32_t row_bytes = 0;
  std::string table_info;  // serialized engram.v1.TableInfo: the full layout
};

struct RemoteLookupStats {
  uint64_t rows_read = 0, dram_rows = 0, nvme_rows = 0;
};

class ShmConnection;
class MappedTable;

// What a ShmConnection shares with the MappedTables made through it, so that a table may outlive
// its connection: `connection` (cleared under `mu` when the connection is destroyed) carries the
// tables' reports; `arena_mu` is held shared while a reader uses an HBM pin in the connection's
// arena and exclusively when the arena is unmapped (`arena` then becomes nullptr).
struct ShmLink {
  std::mutex mu;
  ShmConnection* connection ABSL_GUARDED_BY(mu) = nullptr;
  std::shared_mutex arena_mu;
  shm::ArenaHeader* arena ABSL_GUARDED_BY(arena_mu) = nullptr;
  // Pins handed to device copies (SplitForDevice) and not yet released: the connection waits for
  // them before it closes (the daemon stops watching a client's pins when its socket closes).
  std::atomic<int> device_pins{0};
};

class ShmConnection {
 public:
  static absl::StatusOr<std::unique_ptr<ShmConnection>> Connect(const std::string& socket_path,
                                                                const ShmConnectOptions& options = {});
  ~ShmConnection();

  absl::StatusOr<RemoteTable> OpenTable(const std::string& name);
  // Rows for head-local `indices` [num_tokens][heads] into `out` ([num_tokens][heads][row_bytes]).
  absl::Status Lookup(const RemoteTable& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                      absl::Span<uint8_t> out, RemoteLookupStats* stats = nullptr);
  // The same without the copy: the rows stay where the daemon gathered them, in the arena's data
  // region (register it with cudaHostRegister to copy straight to a GPU). The span is valid until
  // the next call on this connection.
  absl::StatusOr<absl::Span<const uint8_t>> LookupInPlace(const RemoteTable& table, int layer, uint32_t num_tokens,
                                                          absl::Span<const uint32_t> indices,
                                                          RemoteLookupStats* stats = nullptr);
  absl::Status Prefetch(const RemoteTable& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices);
  // Maps a table the daemon holds resident and shares (engramd --share-tables, the default):
  // FailedPrecondition when it is served from NVMe or not shared.
  absl::StatusOr<std::unique_ptr<MappedTable>> MapTable(const RemoteTable& table);

 private:
  friend class MappedTable;
  friend class ShmConnectionTestPeer;  // tests that play a misbehaving client (client/shm_testing.h)
  shm::ArenaHeader* header() const { return reinterpret_cast<shm::ArenaHeader*>(base_); }
  uint8_t* data() const { return base_ + reply_.data_offset; }
  // Places a descriptor in the request ring (waiting, bounded, while it is full) and wakes the daemon.
  absl::Status Post(const shm::RequestDescriptor& descriptor);
  // The next completion (spinning briefly, then sleeping on the eventfd); UNAVAILABLE when the
  // daemon hung up, DEADLINE_EXCEEDED after timeout_ms.
  absl::StatusOr<shm::Completion> WaitCompletion();
  ShmConnection() = default;
  static absl::StatusOr<std::unique_ptr<ShmConnection>> ConnectVersion(const std::string& socket_path,
                                                                       const ShmConnectOptions& options,
                                                                       uint32_t version);
  // Sends a control frame and waits for its reply (under mu_).
  absl::StatusOr<shm::Frame> ControlCallLocked(shm::FrameType type, const std::string& payload);
  absl::Status SendCounters(const std::vector<shm::CounterReport>& reports);
  absl::Status SendFrame(shm::FrameType type, const std::string& payload);
  // UNAVAILABLE (and the connection marked broken) once the daemon has ended the session.
  absl::Status CheckSessionLocked();
  // Asks for the HBM tier over a freshly mapped table and attaches it (protocol 3). An error
  // means the table is served without it.
  absl::Status MapHbm(MappedTable* mapped, const v1::TableInfo& info);
  // A MapTable/MapHbm round trip: the reply checked for its type and size and split into `reply`
  // and `body`; an error reply becomes its status. The caller closes the frame's fds.
  absl::StatusOr<shm::Frame> MapCall(shm::FrameType request_type, shm::FrameType reply_type, uint32_t table_id,
                                     shm::MapTableReply* reply, std::string* body);
  absl::Status Call(const shm::RequestDescriptor& d, shm::Completion* c);
  absl::StatusOr<absl::Span<const uint8_t>> LookupLocked(const RemoteTable& table, int layer, uint32_t num_tokens,
                                                         absl::Span<const uint32_t> indices, uint64_t out_bytes,
                                                         RemoteLookupStats* stats);

  std::mutex mu_;  // one call at a time: the ring positions, the request ids, the socket's frames
  ShmConnectOptions options_;
  int sock_ = -1, memfd_ = -1, request_efd_ = -1, completion_efd_ = -1;
  uint8_t* base_ = nullptr;
  shm::HelloReply reply_{};
  shm::ArenaView arena_;  // the rings and data region, as laid out by the reply (checked)
  uint32_t request_tail_ ABSL_GUARDED_BY(mu_) = 0;
  uint32_t completion_head_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  uint32_t version_ = shm::kVersion;                             // the protocol this connection speaks
  std::shared_ptr<ShmLink> link_ = std::make_shared<ShmLink>();  // shared with MappedTables
  // A control reply went missing, or the daemon ended the session: every later call is UNAVAILABLE.
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_SHM_CONNECTION_H_
