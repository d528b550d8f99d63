// Hot sets: the rows of each layer worth keeping in DRAM, with their access counts, hottest first.
// The daemon snapshots its caches' hot sets (into the state store) and warms from them after a
// restart; `engramctl profile` builds one offline from a token corpus. One binary encoding serves
// both: little-endian, "EHS1", the table name, a fingerprint of the pack's layout and data, then
// per layer its id, row count and (row u64, count u32) pairs. Plain data; no shared state.
#ifndef ENGRAM_TIERING_HOT_SET_H_
#define ENGRAM_TIERING_HOT_SET_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "tiering/layout/manifest.h"

namespace engram {

struct LayerHotSet {
  int layer_id = 0;
  std::vector<std::pair<uint64_t, uint32_t>> rows;  // (global row, count), hottest first
};

struct HotSet {
  std::string table;
  std::string fingerprint;  // PackFingerprint() of the pack it was taken from
  std::vector<LayerHotSet> layers;
  const LayerHotSet* FindLayer(int layer_id) const;
};

// Identifies a pack's layout and contents: layer ids, row counts, row size and checksums. A hot
// set taken from another pack (or an older one under the same name) does not match.
std::string PackFingerprint(const PackManifest& manifest);

std::string EncodeHotSet(const HotSet& hot_set);
absl::StatusOr<HotSet> DecodeHotSet(absl::string_view bytes, absl::string_view source);
absl::Status WriteHotSetFile(const HotSet& hot_set, const std::string& path);
absl::StatusOr<HotSet> ReadHotSetFile(const std::string& path);

// Counts every row access of a token corpus (hashed as sequences of `seq_len` tokens) and keeps
// the `fraction` most used rows of each layer.
absl::StatusOr<HotSet> ProfileTokens(const PackManifest& manifest, const std::vector<int32_t>& tokens,
                                     uint32_t seq_len, double fraction);

}  // namespace engram

#endif  // ENGRAM_TIERING_HOT_SET_H_
