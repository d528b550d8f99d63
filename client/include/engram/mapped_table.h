// MappedTable: a resident table's rows mapped read-only into an engine's process through a
// ShmConnection (ShmConnection::MapTable), gathered here with the daemon's own checks and no round
// trip, and, where the daemon runs an HBM tier over the table (protocol 3), its slots gathered
// from under pins (the pin protocol: engram/kernels/hbm_probe.h). Counts go back to the daemon in
// batched reports. Thread-safe; it may outlive its connection.
#ifndef ENGRAM_CLIENT_MAPPED_TABLE_H_
#define ENGRAM_CLIENT_MAPPED_TABLE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/kernels/hbm_probe.h"
#include "engram/shm_connection.h"
#include "engram/shm_protocol.h"
#include "tiering/hbm/hbm_sampler.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

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
  // into row k of `staged` (room for every row; a row the request names more than once is staged
  // once, and all its sources name that copy). Release the pin with ReleaseDevicePin once the
  // device copy that reads the slots has completed (a stream callback). FailedPrecondition when
  // the layer has no HBM tier or all its pins are in use; use Lookup then.
  struct DevicePin {
    int layer_id = 0;
    uint32_t pin = 0;
    // Distinct rows written to `staged` (SplitForDeviceDirect: read from host memory): what crosses PCIe.
    uint64_t staged_rows = 0;
    uint64_t repeated_rows = 0;  // rows of the request not in the tier whose row an earlier one already brings
    bool pinned = true;          // false: no HBM pin was taken (ReleaseDevicePin does nothing)
  };
  absl::StatusOr<DevicePin> SplitForDevice(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                           uint32_t* sources, uint8_t* staged);
  // The device path with no staging: the GPU reads the rows the tier lacks straight from this
  // mapping (registered with CUDA by the caller) over PCIe. For every row, `sources` gets its HBM
  // slot when `use_hbm` and the layer's index holds it (under a pin, released as above), else
  // kernels::kDirectFromHost | its row in layer_rows(layer_id), or kernels::kDirectRepeat | the
  // earlier position that reads the same row (the gather's second pass copies it on the device:
  // each row crosses PCIe once per request). Without an HBM tier, or with every pin busy, every
  // row comes from host memory and nothing is pinned. Checks the request like Lookup.
  absl::StatusOr<DevicePin> SplitForDeviceDirect(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                                 bool use_hbm, uint64_t* sources);
  // The layer's rows as mapped here (read-only; empty for an unknown layer): what the direct
  // device path registers with CUDA.
  absl::Span<const uint8_t> layer_rows(int layer_id) const;
  uint64_t row_bytes() const { return row_bytes_; }
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
    LayerHashLayout layout;                     // head sizes and offsets, as the daemon described them
    std::atomic<uint64_t> lookups{0}, rows{0};  // served, not yet reported
    // HBM (see engram/kernels/hbm_probe.h for the index and the pin protocol).
    const kernels::HbmIndexHeader* hbm_index = nullptr;
    uint64_t hbm_index_bytes = 0;
    const uint8_t* hbm_slots = nullptr;  // host stores
    uint64_t hbm_slot_bytes = 0;
    uint32_t hbm_slot_count = 0;
    uint32_t first_pin = 0;
    shm::HbmLayer hbm_info{};
    std::atomic<uint32_t> pins_busy{0};                    // bit k: pin first_pin + k is in use by a reader here
    std::atomic<uint64_t> hbm_rows{0}, hbm_rows_total{0};  // unreported / all time
    std::mutex sample_mu;
    // Rows served, about one in kAccessSampleEvery, for the daemon's promoter.
    std::vector<uint64_t> samples ABSL_GUARDED_BY(sample_mu);
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

  std::shared_ptr<ShmLink> link_;  // to the connection (reports, the arena that holds the pins)
  RemoteTable table_;
  uint64_t row_bytes_ = 0;
  uint64_t max_batch_rows_ = UINT64_MAX;  // the daemon's limit (TableInfo.max_batch_rows, when it says)
  std::vector<std::unique_ptr<Layer>> layers_;
  HbmAccess hbm_access_ = HbmAccess::kNone;
  uint32_t version_ = 0;  // the connection's protocol
  int64_t report_interval_ns_ = 0;
  std::atomic<int64_t> last_report_ns_{0};
  std::mutex report_mu_;  // one report at a time (the counts are swapped out under it)
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_MAPPED_TABLE_H_
