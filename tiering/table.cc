#include "tiering/table.h"

#include "absl/strings/str_cat.h"
#include "tiering/cached_tier.h"
#include "tiering/dram_tier.h"

namespace engram {

absl::StatusOr<std::unique_ptr<Table>> Table::Open(const std::string& dir, const TableOptions& options) {
  auto manifest = LoadPackManifest(dir);
  if (!manifest.ok()) return manifest.status();
  std::unique_ptr<Table> table(new Table());
  table->dir_ = dir;
  table->manifest_ = std::move(*manifest);
  std::vector<LayerHashLayout> layouts;
  for (const auto& l : table->manifest_.layers) layouts.push_back(l.layout);
  auto hasher = NgramHasher::Create(table->manifest_.hash, std::move(layouts));
  if (!hasher.ok()) return hasher.status();
  table->hasher_ = std::move(*hasher);
  const PackManifest& m = table->manifest_;
  table->resident_ = m.total_bytes() <= options.dram_budget_bytes;
  uint64_t table_rows = 0;
  for (const auto& l : m.layers) table_rows += l.layout.total_rows;
  for (const auto& pack_layer : m.layers) {
    const std::string path = absl::StrCat(dir, "/", pack_layer.file);
    if (table->resident_) {
      auto tier = DramResidentTier::Load(path, pack_layer.layout.total_rows, m.row.bytes,
                                         options.verify_checksums ? pack_layer.xxh3_64 : "", options.share_resident);
      if (!tier.ok()) return tier.status();
      table->layers_.push_back(Layer{&pack_layer, std::move(*tier), nullptr});
      continue;
    }
    auto reader = NvmeReader::Open(path, m.row.bytes, pack_layer.layout.total_rows, options.nvme,
                                   absl::StrCat("table '", m.name, "' layer ", pack_layer.id));
    if (!reader.ok()) return reader.status();
    // The budget is split over layers by their share of the table's rows.
    const uint64_t capacity_rows = static_cast<uint64_t>(
        static_cast<long double>(options.dram_budget_bytes) * pack_layer.layout.total_rows / table_rows / m.row.bytes);
    std::unique_ptr<RowCache> cache;
    if (capacity_rows > 0) {
      auto created = RowCache::Create(capacity_rows, m.row.bytes, options.cache_policy, options.cache_shards);
      if (!created.ok()) return created.status();
      cache = std::move(*created);
    }
    table->layers_.push_back(Layer{&pack_layer, std::make_unique<CachedNvmeTier>(std::move(*reader), std::move(cache)), nullptr});
  }
  return table;
}

const Table::Layer* Table::FindLayer(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer.pack_layer->id == layer_id) return &layer;
  }
  return nullptr;
}

absl::Status Table::AttachHbm(int layer_id, std::unique_ptr<HbmTier> hbm) {
  for (auto& layer : layers_) {
    if (layer.pack_layer->id != layer_id) continue;
    if (layer.hbm != nullptr) return absl::AlreadyExistsError(absl::StrCat("layer ", layer_id, " has an HBM tier"));
    layer.hbm = std::move(hbm);
    return absl::OkStatus();
  }
  return absl::NotFoundError(absl::StrCat("table '", name(), "' has no layer ", layer_id));
}

uint64_t Table::resident_bytes() const {
  uint64_t total = 0;
  for (const auto& layer : layers_) total += layer.tier->resident_bytes();
  return total;
}

}  // namespace engram
