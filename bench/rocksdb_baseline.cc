#include "bench/rocksdb_baseline.h"

#include <rocksdb/cache.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/sst_file_writer.h>
#include <rocksdb/table.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "tiering/hot_set.h"

namespace engram {
namespace {

std::string Key(int layer_index, uint64_t row) {
  const uint64_t k = (static_cast<uint64_t>(layer_index) << 56) | row;
  char bytes[8];
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(k >> (56 - 8 * i));
  return std::string(bytes, 8);
}

absl::Status FromRocks(const rocksdb::Status& s, const std::string& what) {
  return s.ok() ? absl::OkStatus() : absl::InternalError(absl::StrCat(what, ": ", s.ToString()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<RocksDbRows>> RocksDbRows::OpenOrLoad(const PackManifest& m, const std::string& pack_dir,
                                                                     const std::string& db_dir, uint64_t cache_bytes) {
  namespace fs = std::filesystem;
  const std::string marker = db_dir + "/engram-baseline-fingerprint";
  const std::string fingerprint = PackFingerprint(m);
  std::string existing;
  if (std::ifstream in(marker); in) std::getline(in, existing);
  rocksdb::Options options;
  options.create_if_missing = true;
  options.use_direct_reads = true;
  options.compression = rocksdb::kNoCompression;  // rows are dense values; compression would only cost
  options.max_open_files = -1;
  rocksdb::BlockBasedTableOptions table;
  table.block_size = 4096;
  table.block_cache = rocksdb::NewLRUCache(std::max<uint64_t>(cache_bytes, 1 << 20));
  options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  if (existing != fingerprint) {
    std::error_code ec;
    fs::remove_all(db_dir, ec);
    fs::create_directories(db_dir, ec);
    // Keys ascend (layer, row), so one SST per layer is written in order and ingested.
    std::vector<std::string> files;
    for (size_t li = 0; li < m.layers.size(); ++li) {
      rocksdb::SstFileWriter writer(rocksdb::EnvOptions(), options);
      const std::string sst = absl::StrCat(db_dir, "/load-", li, ".sst");
      if (auto s = FromRocks(writer.Open(sst), "open " + sst); !s.ok()) return s;
      std::ifstream rows(absl::StrCat(pack_dir, "/", m.layers[li].file), std::ios::binary);
      std::vector<char> value(m.row.bytes);
      for (uint64_t r = 0; r < m.layers[li].layout.total_rows; ++r) {
        rows.read(value.data(), m.row.bytes);
        if (!rows) return absl::DataLossError(absl::StrCat("short read of ", m.layers[li].file));
        if (auto s = FromRocks(writer.Put(Key(static_cast<int>(li), r), rocksdb::Slice(value.data(), value.size())), "put");
            !s.ok()) {
          return s;
        }
      }
      if (auto s = FromRocks(writer.Finish(), "finish " + sst); !s.ok()) return s;
      files.push_back(sst);
    }
    rocksdb::DB* db = nullptr;
    if (auto s = FromRocks(rocksdb::DB::Open(options, db_dir, &db), "open " + db_dir); !s.ok()) return s;
    rocksdb::IngestExternalFileOptions ingest;
    ingest.move_files = true;
    const rocksdb::Status s = db->IngestExternalFile(files, ingest);
    delete db;
    if (!s.ok()) return FromRocks(s, "ingest");
    std::ofstream(marker) << fingerprint << "\n";
  }
  std::unique_ptr<RocksDbRows> rows(new RocksDbRows());
  rows->row_bytes_ = m.row.bytes;
  if (auto s = FromRocks(rocksdb::DB::Open(options, db_dir, &rows->db_), "open " + db_dir); !s.ok()) return s;
  return rows;
}

RocksDbRows::~RocksDbRows() { delete db_; }

absl::Status RocksDbRows::Read(int layer_index, const std::vector<uint64_t>& rows, uint8_t* out) const {
  absl::flat_hash_map<uint64_t, size_t> first;  // the same dedup the engine does
  std::vector<std::string> keys;
  std::vector<size_t> first_pos;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (first.try_emplace(rows[i], i).second) {
      keys.push_back(Key(layer_index, rows[i]));
      first_pos.push_back(i);
    }
  }
  std::vector<rocksdb::Slice> slices(keys.begin(), keys.end());
  std::vector<rocksdb::PinnableSlice> values(keys.size());
  std::vector<rocksdb::Status> statuses(keys.size());
  rocksdb::ReadOptions read;
  read.async_io = async_io_;  // RocksDB's own parallel MultiGet reads, where its build supports them
  read.optimize_multiget_for_io = async_io_;
  db_->MultiGet(read, db_->DefaultColumnFamily(), keys.size(), slices.data(), values.data(), statuses.data());
  for (size_t k = 0; k < keys.size(); ++k) {
    if (!statuses[k].ok() || values[k].size() != static_cast<size_t>(row_bytes_)) {
      return absl::DataLossError(absl::StrCat("rocksdb row ", rows[first_pos[k]], ": ", statuses[k].ToString()));
    }
    std::memcpy(out + first_pos[k] * row_bytes_, values[k].data(), static_cast<size_t>(row_bytes_));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const size_t f = first[rows[i]];
    if (f != i) std::memcpy(out + i * row_bytes_, out + f * row_bytes_, static_cast<size_t>(row_bytes_));
  }
  return absl::OkStatus();
}

}  // namespace engram
