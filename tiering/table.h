// A served table: one pack's manifest, its hasher, and one RowTier per layer. Immutable once
// built, so lookups read it from any thread without locks.
#ifndef ENGRAM_TIERING_TABLE_H_
#define ENGRAM_TIERING_TABLE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/ngram_hasher.h"
#include "tiering/cache/policy.h"
#include "tiering/nvme_reader.h"
#include "tiering/hbm/hbm_tier.h"
#include "tiering/row_tier.h"

namespace engram {

struct TableOptions {
  // Host memory for this table's rows. When the table fits, it is loaded whole (resident);
  // otherwise its layers are read from NVMe with a DRAM cache of this size, split by rows.
  uint64_t dram_budget_bytes = UINT64_MAX;
  bool verify_checksums = true;  // resident tables: refuse a row file that fails its xxh3_64
  // Refuse a table any of whose layers would be served unverified (NVMe layers without block
  // checksums, resident layers with verify_checksums off or no xxh3_64).
  bool require_verified = false;
  // Resident tables: hold rows in sealed memfds that shared-memory clients may map read-only.
  bool share_resident = false;
  PolicySpec cache_policy = *ParsePolicy(kDefaultPolicy);
  int cache_shards = 16;
  NvmeOptions nvme;
};

class Table {
 public:
  struct Layer {
    const PackLayer* pack_layer = nullptr;
    std::unique_ptr<RowTier> tier;
    // The layer's HBM tier (hottest rows in GPU memory) on top of `tier`, when one was attached.
    std::unique_ptr<HbmTier> hbm;
  };

  // Loads the pack at `dir` into memory (the DRAM-resident tier for every layer).
  static absl::StatusOr<std::unique_ptr<Table>> Open(const std::string& dir, const TableOptions& options);

  const std::string& name() const { return manifest_.name; }
  const std::string& dir() const { return dir_; }
  const PackManifest& manifest() const { return manifest_; }
  const NgramHasher& hasher() const { return *hasher_; }
  int heads() const { return manifest_.hash.heads_per_layer(); }
  int64_t row_bytes() const { return manifest_.row.bytes; }
  const std::vector<Layer>& layers() const { return layers_; }
  // nullptr when the table has no such layer.
  const Layer* FindLayer(int layer_id) const;
  uint64_t resident_bytes() const;
  // Puts an HBM tier on a layer (at start-up, before serving; its source is the layer's tier).
  absl::Status AttachHbm(int layer_id, std::unique_ptr<HbmTier> hbm);
  // True when every layer is held whole in DRAM.
  bool resident() const { return resident_; }
  // True when every byte served is checked: resident layers against their file's xxh3_64 at
  // load, NVMe layers block by block on every read.
  bool verified() const { return verified_; }
  // Bytes of DRAM the NVMe layers' block checksums take (out of the table's budget).
  uint64_t checksum_bytes() const { return checksum_bytes_; }

 private:
  Table() = default;

  std::string dir_;
  PackManifest manifest_;
  std::unique_ptr<NgramHasher> hasher_;
  std::vector<Layer> layers_;
  bool resident_ = true;
  bool verified_ = true;
  uint64_t checksum_bytes_ = 0;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_TABLE_H_
