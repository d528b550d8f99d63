// Warm starts and hot-set snapshots for the daemon's NVMe-backed tables. Warm() fills each cache
// (hottest rows first, until full) from a profile given with --warm-from or, failing that, from
// the state store's last snapshot of that table; a hot set whose pack fingerprint differs is
// skipped with a log line. Snapshot() writes every cached table's current hot set to the store.
// Call from one thread at a time.
#ifndef ENGRAM_SERVICE_WARM_STATE_H_
#define ENGRAM_SERVICE_WARM_STATE_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "tiering/engine.h"
#include "tiering/state_store.h"

namespace engram {

// `store` may be null (no --state-dir). Errors name the file or table; errors of the store are
// not errors (logged; the table starts cold; *store_failed, when given, gets the first write error).
absl::Status WarmTables(const Engine& engine, StateStore* store, const std::vector<std::string>& warm_from,
                        absl::Status* store_failed = nullptr);
absl::Status SnapshotHotSets(const Engine& engine, StateStore* store);

}  // namespace engram

#endif  // ENGRAM_SERVICE_WARM_STATE_H_
