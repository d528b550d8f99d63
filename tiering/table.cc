#include "tiering/table.h"

#include "absl/strings/str_cat.h"
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
  for (const auto& pack_layer : table->manifest_.layers) {
    auto tier = DramResidentTier::Load(absl::StrCat(dir, "/", pack_layer.file),
                                       pack_layer.layout.total_rows, table->manifest_.row.bytes,
                                       options.verify_checksums ? pack_layer.xxh3_64 : "");
    if (!tier.ok()) return tier.status();
    table->layers_.push_back(Layer{&pack_layer, std::move(*tier)});
  }
  return table;
}

const Table::Layer* Table::FindLayer(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer.pack_layer->id == layer_id) return &layer;
  }
  return nullptr;
}

uint64_t Table::resident_bytes() const {
  uint64_t total = 0;
  for (const auto& layer : layers_) total += layer.tier->resident_bytes();
  return total;
}

}  // namespace engram
