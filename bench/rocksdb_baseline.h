// The baseline a user might pick instead of engramd: the same rows stored in RocksDB (one key per
// row, 8-byte big-endian layer/row key), read with MultiGet through an LRU block cache of the
// same DRAM budget, with direct reads so the OS page cache does not hold the data for it.
#ifndef ENGRAM_BENCH_ROCKSDB_BASELINE_H_
#define ENGRAM_BENCH_ROCKSDB_BASELINE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"

namespace rocksdb {
class DB;
}

namespace engram {

class RocksDbRows {
 public:
  // Opens `db_dir`, loading the pack's rows into it first unless a previous load of the same pack
  // is there. `cache_bytes` is the block cache.
  static absl::StatusOr<std::unique_ptr<RocksDbRows>> OpenOrLoad(const PackManifest& manifest, const std::string& pack_dir,
                                                                 const std::string& db_dir, uint64_t cache_bytes);
  ~RocksDbRows();

  // Reads global `rows` of layer `layer_index` (manifest order), deduplicated, into out
  // ([rows][row_bytes], repeats copied). Thread-safe.
  absl::Status Read(int layer_index, const std::vector<uint64_t>& rows, uint8_t* out) const;

 private:
  RocksDbRows() = default;
  rocksdb::DB* db_ = nullptr;
  // RocksDB's async MultiGet: tried for fairness; Debian's 7.8 build showed no gain from it
  // (1.92e4 vs 2.22e4 rows/s without, bench/RESULTS.md), it is kept on as the documented best.
  bool async_io_ = true;
  int64_t row_bytes_ = 0;
};

}  // namespace engram

#endif  // ENGRAM_BENCH_ROCKSDB_BASELINE_H_
