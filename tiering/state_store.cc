#include "tiering/state_store.h"

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/options.h>

#include "absl/strings/str_cat.h"

namespace engram {
namespace {

// RocksDB's own info log is a file it writes on its own schedule; on a disk that fills up a failed
// write there can later trip an assertion inside RocksDB (this build has them on) and abort the
// process. The store logs nothing of its own: engramd's log says what happened to it.
class NullLogger final : public rocksdb::Logger {
 public:
  using rocksdb::Logger::Logv;
  void Logv(const char*, va_list) override {}
};

}  // namespace

absl::StatusOr<std::unique_ptr<StateStore>> StateStore::Open(const std::string& dir) {
  rocksdb::Options options;
  options.create_if_missing = true;
  options.keep_log_file_num = 2;
  options.max_open_files = 64;
  options.info_log = std::make_shared<NullLogger>();
  options.stats_dump_period_sec = 0;  // no writes of its own between ours
  options.stats_persist_period_sec = 0;
  rocksdb::DB* db = nullptr;
  const rocksdb::Status s = rocksdb::DB::Open(options, dir, &db);
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat("the state store in ", dir, " is corrupt: ", s.ToString()));
  if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
    return absl::FailedPreconditionError(
        absl::StrCat("the state store in ", dir, " is locked (another engramd uses it?): ", s.ToString()));
  }
  if (!s.ok()) return absl::UnavailableError(absl::StrCat("cannot open the state store in ", dir, ": ", s.ToString()));
  return std::unique_ptr<StateStore>(new StateStore(db));
}

StateStore::~StateStore() {
  if (!abandoned_) delete db_;
}

absl::Status StateStore::RecordPack(const std::string& name, const std::string& dir, const std::string& fingerprint) {
  const rocksdb::Status s = db_->Put(rocksdb::WriteOptions(), "pack/" + name, dir + "\n" + fingerprint);
  return s.ok() ? absl::OkStatus() : absl::InternalError(absl::StrCat("state store: ", s.ToString()));
}

absl::Status StateStore::SaveHotSet(const HotSet& hot_set) {
  rocksdb::WriteOptions write;
  write.sync = true;  // a snapshot taken at shutdown must survive the process
  const rocksdb::Status s = db_->Put(write, "hot/" + hot_set.table, EncodeHotSet(hot_set));
  return s.ok() ? absl::OkStatus() : absl::InternalError(absl::StrCat("state store: ", s.ToString()));
}

absl::StatusOr<std::optional<HotSet>> StateStore::LoadHotSet(const std::string& table) {
  std::string value;
  const rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), "hot/" + table, &value);
  if (s.IsNotFound()) return std::optional<HotSet>();
  if (!s.ok()) return absl::InternalError(absl::StrCat("state store: ", s.ToString()));
  auto hot = DecodeHotSet(value, "state store hot/" + table);
  if (!hot.ok()) return hot.status();
  return std::optional<HotSet>(std::move(*hot));
}

}  // namespace engram
