#include "service/table_loader.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "service/cli_flags.h"
#include "service/log.h"
#include "tiering/cached_tier.h"

namespace engram {

void TierFlags::Register(FlagSet& flags) {
  flags.String("dram-budget", &dram_budget,
               "host memory for table rows, all tables together (e.g. 64G, 512M), or 'all': every table\n"
               "                              loaded whole. A table that does not fit its share is served from NVMe\n"
               "                              with a DRAM cache of that size; shares follow table sizes");
  flags.StringList("table-budget", &table_budgets, "NAME=BYTES: a table's own share, taken out of --dram-budget");
  flags.String("cache-policy", &cache_policy,
               "DRAM cache policy: s3fifo, tinylfu (TinyLFU admission + S3-FIFO), lru, static-topk");
  flags.Int("cache-shards", &cache_shards, "independently locked parts of each layer's cache");
  flags.Int("nvme-queue-depth", &nvme_queue_depth, "NVMe reads in flight per request thread (1-256)");
  flags.String("nvme-io", &nvme_io, "auto (io_uring, else pread), io_uring, or pread");
  flags.Bool("verify-checksums", &verify_checksums,
             "check each resident row file's xxh3_64 against the manifest while loading (NVMe-served\n"
             "                              files are not read whole at start; `engramctl pack verify` checks them)");
  flags.Bool("require-verified", &require_verified,
             "refuse to serve a table any of whose bytes would go out unchecked: an NVMe-served pack\n"
             "                              without block checksums (`engramctl pack checksum DIR` adds them), or a\n"
             "                              resident one with --verify-checksums off. Without it such a table is served\n"
             "                              with a warning and engram_table_verified 0");
  flags.Bool("share-tables", &share_tables,
             "hold resident tables in sealed memfds that shared-memory clients may map read-only and\n"
             "                              gather from without a round trip (they report their counts back)");
}

absl::StatusOr<PlacementOptions> TierFlags::ToPlacement() const {
  PlacementOptions placement;
  placement.table.verify_checksums = verify_checksums;
  placement.table.require_verified = require_verified;
  placement.table.nvme.on_corrupt_block = [](const absl::Status& what) {
    LogError("nvme_block_corrupt", {{"error", std::string(what.message())}});
  };
  placement.table.share_resident = share_tables;
  if (cache_shards < 1) return absl::InvalidArgumentError("--cache-shards must be at least 1");
  placement.table.cache_shards = static_cast<int>(cache_shards);
  if (nvme_queue_depth < 1 || nvme_queue_depth > 256) {
    return absl::InvalidArgumentError("--nvme-queue-depth must be in [1, 256]");
  }
  placement.table.nvme.queue_depth = static_cast<uint32_t>(nvme_queue_depth);
  if (dram_budget != "all") {
    if (absl::Status s = ParseBytes(dram_budget, &placement.dram_budget_bytes); !s.ok()) return s;
  }
  for (const auto& tb : table_budgets) {
    if (absl::Status s = ParseTableBudget(tb, &placement.table_budgets); !s.ok()) return s;
  }
  auto policy = ParsePolicy(cache_policy);
  if (!policy.ok()) return policy.status();
  placement.table.cache_policy = *policy;
  auto engine = ParseIoEngine(nvme_io);
  if (!engine.ok()) return engine.status();
  placement.table.nvme.engine = *engine;
  return placement;
}

absl::Status ParseTableBudget(const std::string& text, std::map<std::string, uint64_t>* out) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) {
    return absl::InvalidArgumentError(absl::StrCat("--table-budget '", text, "' is not NAME=BYTES"));
  }
  uint64_t bytes = 0;
  if (absl::Status s = ParseBytes(text.substr(eq + 1), &bytes); !s.ok()) return s;
  (*out)[text.substr(0, eq)] = bytes;
  return absl::OkStatus();
}

absl::Status LoadTables(const std::vector<std::string>& pack_dirs, const PlacementOptions& options, Engine* engine) {
  // Sizes first, so the shared budget can be split before anything is loaded.
  std::vector<PackManifest> manifests;
  uint64_t unassigned_bytes = 0, explicit_bytes = 0;
  for (const std::string& dir : pack_dirs) {
    auto m = LoadPackManifest(dir);
    if (!m.ok()) return m.status();
    if (auto it = options.table_budgets.find(m->name); it != options.table_budgets.end()) {
      explicit_bytes += it->second;
    } else {
      unassigned_bytes += m->total_bytes();
    }
    manifests.push_back(std::move(*m));
  }
  for (const auto& [name, bytes] : options.table_budgets) {
    bool known = false;
    for (const auto& m : manifests) known |= m.name == name;
    if (!known) return absl::InvalidArgumentError(absl::StrCat("--table-budget names '", name, "', which no --pack serves"));
  }
  const bool unlimited = options.dram_budget_bytes == UINT64_MAX;
  if (!unlimited && explicit_bytes > options.dram_budget_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("--table-budget values add up to ", explicit_bytes,
                                                   " bytes, more than --dram-budget ", options.dram_budget_bytes));
  }
  const uint64_t shared = unlimited ? UINT64_MAX : options.dram_budget_bytes - explicit_bytes;

  for (size_t i = 0; i < pack_dirs.size(); ++i) {
    const PackManifest& m = manifests[i];
    TableOptions table_options = options.table;
    if (auto it = options.table_budgets.find(m.name); it != options.table_budgets.end()) {
      table_options.dram_budget_bytes = it->second;
    } else if (!unlimited) {
      table_options.dram_budget_bytes = static_cast<uint64_t>(
          static_cast<long double>(shared) * m.total_bytes() / std::max<uint64_t>(1, unassigned_bytes));
    }
    const auto start = std::chrono::steady_clock::now();
    auto table = Table::Open(pack_dirs[i], table_options);
    if (!table.ok()) return table.status();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (const auto& layer : (*table)->layers()) {
      std::vector<LogField> fields = {{"table", (*table)->name()},
                                      {"layer", absl::StrCat(layer.pack_layer->id)},
                                      {"rows", absl::StrCat(layer.pack_layer->layout.total_rows)},
                                      {"row_bytes", absl::StrCat((*table)->row_bytes())},
                                      {"tier", std::string(layer.tier->description())},
                                      {"dram_bytes", absl::StrCat(layer.tier->resident_bytes())}};
      if (const NvmeReader* nvme = layer.tier->nvme()) {
        const RowCache* cache = layer.tier->cache();
        fields.push_back({"cache_rows", absl::StrCat(cache ? cache->capacity_rows() : 0)});
        fields.push_back({"cache_policy", cache ? cache->policy().name : "none"});
        fields.push_back({"nvme_io", std::string(nvme->engine_name())});
        fields.push_back({"o_direct", nvme->direct() ? "true" : "false"});
        fields.push_back({"block_checksums", nvme->verified() ? "verified-on-read" : "none"});
        fields.push_back({"checksum_bytes", absl::StrCat(nvme->checksum_bytes())});
      } else {
        fields.push_back({"checksum", table_options.verify_checksums ? "verified" : "skipped"});
      }
      fields.push_back({"pack", pack_dirs[i]});
      fields.push_back({"load_seconds", absl::StrCat(seconds)});
      LogFields("INFO", "table_loaded", fields);
    }
    if (!(*table)->verified()) {
      LogWarn("table_unverified",
              {{"table", (*table)->name()},
               {"pack", pack_dirs[i]},
               {"reason", (*table)->resident() ? "resident rows not checked at load (--verify-checksums off or no xxh3_64)"
                                               : "no block checksums: rows read from NVMe are served unchecked"},
               {"fix", (*table)->resident() ? "--verify-checksums" : absl::StrCat("engramctl pack checksum ", pack_dirs[i])}});
    }
    if (absl::Status s = engine->AddTable(std::move(*table)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace engram
