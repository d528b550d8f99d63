#include "service/warm_state.h"

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "service/log.h"
#include "tiering/cached_tier.h"

namespace engram {

absl::Status WarmTables(const Engine& engine, StateStore* store, const std::vector<std::string>& warm_from,
                        absl::Status* store_failed) {
  std::map<std::string, std::pair<HotSet, std::string>> profiles;  // table -> (hot set, source)
  for (const std::string& path : warm_from) {
    auto hot = ReadHotSetFile(path);
    if (!hot.ok()) return hot.status();
    if (engine.FindTable(hot->table) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("--warm-from ", path, " is for table '", hot->table,
                                                     "', which is not served"));
    }
    const std::string table = hot->table;
    profiles[table] = {std::move(*hot), "profile:" + path};
  }
  // The state store is optional: a read or write of it that fails is logged and the table starts
  // cold (the caller may close the store when `store_failed` says so).
  for (const Table* table : engine.tables()) {
    if (store != nullptr) {
      if (absl::Status s = store->RecordPack(table->name(), table->dir(), PackFingerprint(table->manifest())); !s.ok()) {
        LogWarn("state_store_write_failed", {{"table", table->name()}, {"error", std::string(s.message())}});
        if (store_failed != nullptr) *store_failed = s;
        store = nullptr;
      }
    }
    if (table->resident()) continue;
    std::optional<HotSet> hot;
    std::string source;
    if (auto it = profiles.find(table->name()); it != profiles.end()) {
      hot = std::move(it->second.first);
      source = it->second.second;
    } else if (store != nullptr) {
      auto saved = store->LoadHotSet(table->name());
      if (!saved.ok()) {
        LogWarn("hot_set_unreadable", {{"table", table->name()}, {"error", std::string(saved.status().message())},
                                       {"action", "starting this table cold"}});
        continue;
      }
      hot = std::move(*saved);
      source = "state";
    }
    if (!hot) continue;
    if (hot->fingerprint != PackFingerprint(table->manifest())) {
      LogWarn("hot_set_skipped", {{"table", table->name()}, {"source", source},
                                  {"reason", "taken from a different pack (layout or checksums differ)"}});
      continue;
    }
    for (const auto& layer : table->layers()) {
      RowTier* tier = layer.tier.get();
      const LayerHotSet* rows = hot->FindLayer(layer.pack_layer->id);
      if (tier->cache() == nullptr || rows == nullptr) continue;
      const auto start = std::chrono::steady_clock::now();
      auto placed = tier->Warm(rows->rows);
      if (!placed.ok()) return placed.status();
      LogInfo("cache_warmed", {{"table", table->name()}, {"layer", absl::StrCat(layer.pack_layer->id)},
                               {"rows", absl::StrCat(*placed)}, {"offered", absl::StrCat(rows->rows.size())},
                               {"capacity_rows", absl::StrCat(tier->cache()->capacity_rows())}, {"source", source},
                               {"seconds", absl::StrCat(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count())}});
    }
  }
  return absl::OkStatus();
}

absl::Status SnapshotHotSets(const Engine& engine, StateStore* store) {
  if (store == nullptr) return absl::OkStatus();
  for (const Table* table : engine.tables()) {
    if (table->resident()) continue;
    HotSet hot;
    hot.table = table->name();
    hot.fingerprint = PackFingerprint(table->manifest());
    uint64_t rows = 0;
    for (const auto& layer : table->layers()) {
      const RowTier* tier = layer.tier.get();
      if (tier->cache() == nullptr) continue;
      hot.layers.push_back({layer.pack_layer->id, tier->cache()->HotSet(tier->cache()->capacity_rows())});
      rows += hot.layers.back().rows.size();
    }
    if (hot.layers.empty()) continue;
    if (absl::Status s = store->SaveHotSet(hot); !s.ok()) return s;
    LogInfo("hot_set_saved", {{"table", table->name()}, {"rows", absl::StrCat(rows)}});
  }
  return absl::OkStatus();
}

}  // namespace engram
