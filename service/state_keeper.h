// The --state-dir, kept optional: the state is only a warm-start cache, so no fault of it may stop
// engramd from starting or serving. Before RocksDB is opened or written, the directory is checked
// (it exists or can be made, a file can be written and synced in it, it has --state-min-free
// bytes free): a full, read-only or unwritable directory is logged once and the daemon runs cold.
// That way RocksDB never meets a full disk, which is what took it (and engramd) down. A corrupt store is moved
// aside (renamed, never deleted; the new path is logged) and a fresh one made; a store another
// process holds is left alone. While serving, snapshots pause when free space falls below the
// minimum and resume when it returns (the checks keep every write off a full disk; a write that
// fails anyway ends snapshots until a restart, and the store is left open rather than closed,
// since closing RocksDB after a failed write can abort the process). An unclean previous shutdown (the marker file
// written at start is still there) is logged at start. Thread-compatible: the daemon calls it from its main and
// snapshot threads in turn.
#ifndef ENGRAM_SERVICE_STATE_KEEPER_H_
#define ENGRAM_SERVICE_STATE_KEEPER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tiering/state_store.h"

namespace engram {

class StateKeeper {
 public:
  explicit StateKeeper(std::string dir, uint64_t min_free_bytes = 64ull << 20);
  ~StateKeeper();

  // Checks and opens the store, or logs why the daemon starts cold. Never fails.
  void Start();
  // The open store, or null (cold, or paused).
  StateStore* store() const { return store_.get(); }
  // The store to write a snapshot to, or null when it must be skipped now (disk nearly full,
  // unwritable, or closed after a failure and not reopenable yet); logs each change of state once.
  StateStore* ForWrite();
  // A read or write of the store failed: no more snapshots until engramd restarts (RocksDB is not
  // closed after a failed write: that can abort the process).
  void Failed(const absl::Status& status);
  // A clean shutdown: closes the store and removes the running marker.
  void Stop();

  // The checks, for tests: OK, or why the directory cannot take writes now.
  static absl::Status CheckWritable(const std::string& dir, uint64_t min_free_bytes);

 private:
  bool Open(bool at_start);

  std::string dir_;
  uint64_t min_free_bytes_;
  std::unique_ptr<StateStore> store_;
  std::vector<std::unique_ptr<StateStore>> abandoned_;
  bool given_up_ = false;
  bool paused_logged_ = false;
  bool marker_written_ = false;
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_STATE_KEEPER_H_
