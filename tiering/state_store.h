// StateStore: the daemon's RocksDB (under --state-dir). It holds the catalog of packs served
// ("pack/<name>" -> directory and fingerprint) and each table's latest hot-set snapshot
// ("hot/<name>" -> encoded HotSet), so a restarted daemon warms its caches before it reports
// ready. Thread-safe (RocksDB is).
#ifndef ENGRAM_TIERING_STATE_STORE_H_
#define ENGRAM_TIERING_STATE_STORE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "tiering/hot_set.h"

namespace rocksdb {
class DB;
}

namespace engram {

class StateStore {
 public:
  // DataLoss when the store is corrupt, FailedPrecondition when another process holds its lock,
  // Unavailable for anything else.
  static absl::StatusOr<std::unique_ptr<StateStore>> Open(const std::string& dir);
  ~StateStore();

  absl::Status RecordPack(const std::string& name, const std::string& dir, const std::string& fingerprint);
  absl::Status SaveHotSet(const HotSet& hot_set);
  // nullopt when nothing was saved for `table`.
  absl::StatusOr<std::optional<HotSet>> LoadHotSet(const std::string& table);
  // After a failed write RocksDB must not be closed (closing can trip an assertion inside it and
  // abort the process): the destructor then leaves it open, leaked, until the process exits.
  void Abandon() { abandoned_ = true; }

 private:
  explicit StateStore(rocksdb::DB* db) : db_(db) {}
  rocksdb::DB* db_;
  bool abandoned_ = false;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_STATE_STORE_H_
