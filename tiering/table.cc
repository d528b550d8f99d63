#include "tiering/table.h"

#include "absl/strings/str_cat.h"
#include "tiering/block_checksums.h"
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
  for (const auto& l : m.layers) {
    const bool layer_verified = table->resident_ ? options.verify_checksums && !l.xxh3_64.empty()
                                                 : !l.block_checksums_file.empty();
    table->verified_ = table->verified_ && layer_verified;
  }
  if (options.require_verified && !table->verified_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "table '", m.name, "' at ", dir, " would be served unverified: ",
        table->resident_ ? "a resident layer has no xxh3_64 or --verify-checksums is off"
                         : "it is served from NVMe and its pack has no block checksums (add them with "
                           "`engramctl pack checksum DIR`)",
        "; --require-verified refuses it"));
  }
  // NVMe layers: the block checksums are held in DRAM and paid for out of the budget first.
  std::vector<std::vector<uint64_t>> block_checksums(m.layers.size());
  if (!table->resident_) {
    for (size_t i = 0; i < m.layers.size(); ++i) {
      const PackLayer& l = m.layers[i];
      if (l.block_checksums_file.empty()) continue;
      auto sums = LoadBlockChecksums(absl::StrCat(dir, "/", l.block_checksums_file),
                                     l.layout.total_rows * static_cast<uint64_t>(m.row.bytes), l.block_checksums_xxh3_64);
      if (!sums.ok()) return sums.status();
      table->checksum_bytes_ += sums->size() * sizeof(uint64_t);
      block_checksums[i] = std::move(*sums);
    }
  }
  const uint64_t cache_budget =
      options.dram_budget_bytes > table->checksum_bytes_ ? options.dram_budget_bytes - table->checksum_bytes_ : 0;
  for (size_t li = 0; li < m.layers.size(); ++li) {
    const PackLayer& pack_layer = m.layers[li];
    const std::string path = absl::StrCat(dir, "/", pack_layer.file);
    if (table->resident_) {
      auto tier = DramResidentTier::Load(path, pack_layer.layout.total_rows, m.row.bytes,
                                         options.verify_checksums ? pack_layer.xxh3_64 : "", options.share_resident);
      if (!tier.ok()) return tier.status();
      table->layers_.push_back(Layer{&pack_layer, std::move(*tier), nullptr});
      continue;
    }
    auto reader = NvmeReader::Open(path, m.row.bytes, pack_layer.layout.total_rows, options.nvme,
                                   absl::StrCat("table '", m.name, "' layer ", pack_layer.id),
                                   std::move(block_checksums[li]));
    if (!reader.ok()) return reader.status();
    // The budget (less the block checksums) is split over layers by their share of the table's rows.
    const uint64_t capacity_rows = static_cast<uint64_t>(
        static_cast<long double>(cache_budget) * pack_layer.layout.total_rows / table_rows / m.row.bytes);
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
