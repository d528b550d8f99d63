// ShmConnection: a client's end of engramd's shared-memory transport. Connect performs the
// handshake (peer credentials are checked by the daemon), maps the arena the daemon created, and
// then each call places indices in the arena's data region, posts a descriptor and waits (briefly
// spinning, then on an eventfd) for its completion; rows are gathered by the daemon straight into
// the data region. A daemon that goes away surfaces as UNAVAILABLE. Tables the daemon holds
// resident can also be mapped read-only (MapTable) and gathered from here without a round trip.
// Thread-safe: calls on one connection are serialized (one request in flight).
#ifndef ENGRAM_CLIENT_SHM_CLIENT_H_
#define ENGRAM_CLIENT_SHM_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/kernels/hbm_probe.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"
#include "tiering/hbm/hbm_sampler.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {
namespace v1 {
class TableInfo;
}

struct ShmConnectOptions {
  uint64_t data_bytes = 64ull << 20;  // the largest request's indices + rows must fit
  uint32_t ring_entries = 64;
  int timeout_ms = 30000;             // for one request's completion
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

// A resident table's rows mapped read-only into this process (ShmConnection::MapTable): lookups
// gather from the mapping, with no round trip to the daemon. What was served is counted here and
// reported to the daemon about once a second (and when the table is destroyed), so its metrics
// still see the load. Thread-safe. It may outlive its ShmConnection: lookups keep working from
// the mapping, and reports then fail with UNAVAILABLE.
class MappedTable {
 public:
  ~MappedTable();
  MappedTable(const MappedTable&) = delete;
  MappedTable& operator=(const MappedTable&) = delete;

  // Rows for head-local `indices` [num_tokens][heads] into `out` ([num_tokens][heads][row_bytes]),
  // checked exactly as the daemon checks them. When a due report fails (the daemon is gone) that
  // status is returned although `out` holds the rows.
  absl::Status Lookup(int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices, absl::Span<uint8_t> out);
  // Sends the counts not yet reported (Lookup does so every mapped_report_interval_ms).
  absl::Status ReportCounters();
  const RemoteTable& table() const { return table_; }
  uint64_t mapped_bytes() const;

  // The daemon's HBM tier over this table, when it runs one and handed it over (protocol 3): a
  // host store's slots are gathered from by Lookup; a GPU's by the device path (LookupToDevice).
  enum class HbmAccess { kNone, kHost, kCuda };
  HbmAccess hbm_access() const { return hbm_access_; }
  // Rows of `layer_id` that Lookup took from HBM slots so far (counted here; also reported).
  uint64_t hbm_rows_served(int layer_id) const;

  // The device path over the HBM tier (libengram_client's CUDA code uses it; it runs on the host,
  // so it is tested everywhere). Checks the request like Lookup, pins the layer's published
  // index and, for every row, writes where the device should copy it from into `sources`: its
  // slot, or kernels::kHbmFromStaging | k when the tier does not hold it and it was copied here
  // into row k of `staged` (room for every row). Release the pin with ReleaseDevicePin once the
  // device copy that reads the slots has completed (a stream callback). FailedPrecondition when
  // the layer has no HBM tier or all its pins are in use; use Lookup then.
  struct DevicePin {
    int layer_id = 0;
    uint32_t pin = 0;
    uint64_t staged_rows = 0;  // rows written to `staged`
  };
  absl::StatusOr<DevicePin> SplitForDevice(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                           uint32_t* sources, uint8_t* staged);
  void ReleaseDevicePin(const DevicePin& pin);
  // The layer's HBM tier as the daemon described it (kind, slots, CUDA IPC handles), or nullptr.
  const shm::HbmLayer* hbm_layer(int layer_id) const;
  // A host store's slots as mapped here (for checks), or nullptr.
  const uint8_t* hbm_host_slots(int layer_id) const;

 private:
  friend class ShmConnection;
  struct Layer {
    int id = 0;
    const uint8_t* base = nullptr;
    uint64_t map_bytes = 0;
    uint64_t total_rows = 0;
    LayerHashLayout layout;  // head sizes and offsets, as the daemon described them
    std::atomic<uint64_t> lookups{0}, rows{0};  // served, not yet reported
    // HBM (see engram/kernels/hbm_probe.h for the index and the pin protocol).
    const kernels::HbmIndexHeader* hbm_index = nullptr;
    uint64_t hbm_index_bytes = 0;
    const uint8_t* hbm_slots = nullptr;  // host stores
    uint64_t hbm_slot_bytes = 0;
    uint32_t hbm_slot_count = 0;
    uint32_t first_pin = 0;
    shm::HbmLayer hbm_info{};
    std::atomic<uint32_t> pins_busy{0};  // bit k: pin first_pin + k is in use by a reader here
    std::atomic<uint64_t> hbm_rows{0}, hbm_rows_total{0};  // unreported / all time
    std::mutex sample_mu;
    std::vector<uint64_t> samples;  // rows served, about one in kAccessSampleEvery, for the daemon's promoter
    HbmSampler sampler{shm::kAccessSampleEvery};  // reseeded per process and layer when mapped
  };
  MappedTable() = default;
  // Gathers through the HBM index (pinned); false when no pin was free or the link is gone.
  bool GatherWithHbm(Layer* layer, absl::Span<const uint64_t> rows, absl::Span<uint8_t> out);
  // Checks a request like the daemon and turns indices into the layer's rows.
  absl::StatusOr<Layer*> ResolveRows(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                     uint64_t out_bytes, std::vector<uint64_t>* rows);
  // A free pin of the layer set to the current generation (returned in *generation); -1 when every
  // pin is in use, kDetached when the daemon detached the index (then nothing is pinned). Call
  // with link_->arena_mu held shared and link_->arena set.
  static constexpr int kDetached = -2;
  int AcquirePin(Layer* layer, uint64_t* generation);
  void UnpinLocked(Layer* layer, int k);
  void Sample(Layer* layer, absl::Span<const uint64_t> rows);

  // The connection, cleared (under `mu`) when the connection is destroyed. `arena_mu` is held
  // shared while a reader uses an HBM pin in the connection's arena and exclusively when the
  // arena is unmapped (`arena` then becomes nullptr).
  struct Link {
    std::mutex mu;
    ShmConnection* connection = nullptr;
    std::shared_mutex arena_mu;
    shm::ArenaHeader* arena = nullptr;
  };
  std::shared_ptr<Link> link_;
  RemoteTable table_;
  uint64_t row_bytes_ = 0;
  uint64_t max_batch_rows_ = UINT64_MAX;  // the daemon's limit (TableInfo.max_batch_rows, when it says)
  std::vector<std::unique_ptr<Layer>> layers_;
  HbmAccess hbm_access_ = HbmAccess::kNone;
  uint32_t version_ = 0;  // the connection's protocol
  int64_t report_interval_ns_ = 0;
  std::atomic<int64_t> last_report_ns_{0};
  std::mutex report_mu_;
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

  // Raw access, for tests that play a misbehaving client.
  shm::ArenaHeader* header() const { return reinterpret_cast<shm::ArenaHeader*>(base_); }
  uint8_t* data() const { return base_ + reply_.data_offset; }
  uint64_t data_bytes() const { return reply_.data_bytes; }
  absl::Status Post(const shm::RequestDescriptor& descriptor);
  absl::StatusOr<shm::Completion> WaitCompletion();

 private:
  friend class MappedTable;
  ShmConnection() = default;
  static absl::StatusOr<std::unique_ptr<ShmConnection>> ConnectVersion(const std::string& socket_path,
                                                                       const ShmConnectOptions& options,
                                                                       uint32_t version);
  // Sends a control frame and waits for its reply (under mu_).
  absl::StatusOr<shm::Frame> ControlCallLocked(shm::FrameType type, const std::string& payload);
  absl::Status SendCounters(const std::vector<shm::CounterReport>& reports);
  absl::Status SendFrame(shm::FrameType type, const std::string& payload);
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

  std::mutex mu_;
  ShmConnectOptions options_;
  int sock_ = -1, memfd_ = -1, request_efd_ = -1, completion_efd_ = -1;
  uint8_t* base_ = nullptr;
  shm::HelloReply reply_{};
  uint32_t request_tail_ = 0, completion_head_ = 0;
  uint64_t next_id_ = 1;
  uint32_t version_ = shm::kVersion;  // the protocol this connection speaks
  std::shared_ptr<MappedTable::Link> link_ = std::make_shared<MappedTable::Link>();  // shared with MappedTables
  bool broken_ = false;               // a control reply went missing: every later call is UNAVAILABLE
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_SHM_CLIENT_H_
