#include "service/daemon_metrics.h"

#include "absl/strings/str_cat.h"
#include "tiering/cache/row_cache.h"
#include "tiering/cache/zipf_estimator.h"
#include "tiering/nvme_reader.h"

namespace engram {
namespace {

std::string CodeName(absl::StatusCode code) {
  std::string name = absl::StatusCodeToString(code);
  return name.empty() ? absl::StrCat(static_cast<int>(code)) : name;
}

}  // namespace

LazyCounter::LazyCounter(MetricsRegistry* registry, std::string name, std::string help,
                         std::vector<std::string> label_names, std::vector<std::string> label_values)
    : registry_(registry),
      name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      label_values_(std::move(label_values)) {}

Counter* LazyCounter::Get() {
  Counter* c = counter_.load(std::memory_order_acquire);
  if (c != nullptr) return c;
  c = registry_->GetCounter(name_, help_, label_names_, label_values_);  // the same series for every racer
  counter_.store(c, std::memory_order_release);
  return c;
}

RequestMetrics::RequestMetrics(MetricsRegistry* registry, const std::string& transport, const std::string& method)
    : duration_(registry->GetHistogram(
          "engram_request_duration_seconds", "Time from a request's arrival to its reply, by transport and method",
          {"transport", "method"}, {transport, method}, MetricsRegistry::LatencyBucketsSeconds())) {
  for (int code = 0; code <= kCodes; ++code) {
    by_code_.push_back(std::make_unique<LazyCounter>(
        registry, "engram_requests_total", "Requests finished, by transport, method and status code",
        std::vector<std::string>{"transport", "method", "code"},
        std::vector<std::string>{transport, method,
                                 code < kCodes ? CodeName(static_cast<absl::StatusCode>(code)) : "UNKNOWN"}));
  }
  by_code_[0]->Get();  // OK appears from the start
}

void RequestMetrics::Record(absl::StatusCode code, double seconds) {
  const int c = static_cast<int>(code);
  by_code_[c >= 0 && c < kCodes ? c : kCodes]->Get()->Add();
  duration_->Observe(seconds);
}

DaemonMetrics::TableSeries::TableSeries(MetricsRegistry* registry, const std::string& table)
    : rows_requested(registry->GetCounter("engram_lookup_rows_total", "Rows asked for by lookups (repeats included)",
                                          {"table"}, {table})),
      rows_read(registry->GetCounter("engram_lookup_rows_read_total",
                                     "Rows read from tiers for lookups, after in-batch deduplication where it applies",
                                     {"table"}, {table})),
      mapped_lookups(registry->GetCounter(
          "engram_mapped_lookups_total",
          "Lookups clients served themselves from a mapped table (as they reported them)", {"table"}, {table})),
      mapped_rows(registry->GetCounter(
          "engram_mapped_rows_total",
          "Rows clients gathered themselves from a mapped table (included in engram_lookup_rows_total)", {"table"},
          {table})) {
  for (int t = 0; t < kNumTierKinds; ++t) {
    const std::string tier(kTierNames[t]);
    tier_rows.push_back(std::make_unique<LazyCounter>(registry, "engram_rows_served_total", "Rows read from each tier",
                                                      std::vector<std::string>{"table", "tier"},
                                                      std::vector<std::string>{table, tier}));
    tier_bytes.push_back(std::make_unique<LazyCounter>(
        registry, "engram_bytes_served_total", "Row bytes read from each tier",
        std::vector<std::string>{"table", "tier"}, std::vector<std::string>{table, tier}));
  }
}

DaemonMetrics::DaemonMetrics(MetricsRegistry* registry) : registry_(registry) {
  registry_->GetGauge("engram_build_info", "engramd version (value is always 1)", {"version"}, {ENGRAM_VERSION})
      ->Set(1);
}

RequestMetrics* DaemonMetrics::Requests(const std::string& transport, const std::string& method) {
  std::lock_guard<std::mutex> lock(late_mu_);
  auto& slot = requests_[{transport, method}];
  if (slot == nullptr) slot = std::make_unique<RequestMetrics>(registry_, transport, method);
  return slot.get();
}

DaemonMetrics::TableSeries* DaemonMetrics::SeriesFor(const Table& table) {
  if (auto it = tables_.find(&table); it != tables_.end()) return it->second.get();
  std::lock_guard<std::mutex> lock(late_mu_);
  auto& slot = late_tables_[&table];
  if (slot == nullptr) slot = std::make_unique<TableSeries>(registry_, table.name());
  return slot.get();
}

void DaemonMetrics::RecordLookup(const Table& table, const LookupStats& stats) {
  TableSeries* series = SeriesFor(table);
  series->rows_requested->Add(static_cast<double>(stats.rows_requested));
  series->rows_read->Add(static_cast<double>(stats.rows_read));
  for (int t = 0; t < kNumTierKinds; ++t) {
    const uint64_t rows = stats.tiers.rows[t];
    if (rows == 0) continue;
    series->tier_rows[t]->Get()->Add(static_cast<double>(rows));
    series->tier_bytes[t]->Get()->Add(static_cast<double>(rows * table.row_bytes()));
  }
}

void DaemonMetrics::RecordMappedLookups(const Table& table, uint64_t lookups, uint64_t rows, TierKind tier) {
  TableSeries* series = SeriesFor(table);
  series->mapped_lookups->Add(static_cast<double>(lookups));
  LookupStats stats;
  stats.rows_requested = stats.rows_read = rows;
  stats.tiers.rows[static_cast<int>(tier)] = rows;
  RecordLookup(table, stats);
  series->mapped_rows->Add(static_cast<double>(rows));
}

void DaemonMetrics::RecordTables(const Engine& engine, bool hbm_enabled) {
  const auto tables = engine.tables();
  for (const Table* table : tables) {
    if (!tables_.contains(table)) tables_[table] = std::make_unique<TableSeries>(registry_, table->name());
  }
  registry_->GetGauge("engram_tables_loaded", "Tables being served", {}, {})->Set(tables.size());
  for (const Table* table : tables) {
    registry_->GetGauge("engram_table_bytes", "Size of each table's rows on disk", {"table"}, {table->name()})
        ->Set(static_cast<double>(table->manifest().total_bytes()));
    registry_
        ->GetGauge("engram_table_resident_bytes", "Bytes of each table held in each memory tier", {"table", "tier"},
                   {table->name(), "dram"})
        ->Set(static_cast<double>(table->resident_bytes() + table->checksum_bytes()));
    registry_
        ->GetGauge("engram_table_verified",
                   "1 when every byte served is checked (resident: file checksum at load; NVMe: block checksums "
                   "on every read), 0 when the pack has no block checksums",
                   {"table"}, {table->name()})
        ->Set(table->verified() ? 1 : 0);
    for (const auto& layer : table->manifest().layers) {
      registry_
          ->GetGauge("engram_table_rows", "Rows of each table layer", {"table", "layer"},
                     {table->name(), absl::StrCat(layer.id)})
          ->Set(static_cast<double>(layer.layout.total_rows));
    }
  }
  const auto set_tier = [&](const std::string& tier, bool enabled) {
    registry_->GetGauge("engram_tier_enabled", "1 when the tier is in use on this daemon", {"tier"}, {tier})
        ->Set(enabled ? 1 : 0);
  };
  set_tier("hbm", hbm_enabled);
  set_tier("dram", true);
  bool nvme = false;
  for (const Table* table : tables) nvme |= !table->resident();
  set_tier("nvme", nvme);
}

void DaemonMetrics::RefreshTierGauges(const Engine& engine) {
  std::lock_guard<std::mutex> lock(refresh_mu_);
  for (const Table* table : engine.tables()) {
    uint64_t hbm_bytes = 0;
    bool has_hbm = false;
    for (const auto& layer : table->layers()) {
      if (layer.hbm == nullptr) continue;
      has_hbm = true;
      const HbmTierStats hs = layer.hbm->stats();
      hbm_bytes += layer.hbm->store()->bytes();
      const std::vector<std::string> labels = {table->name(), absl::StrCat(layer.pack_layer->id)};
      const std::vector<std::string> names = {"table", "layer"};
      auto mirror = [&](const std::string& name, const std::string& help, uint64_t value) {
        Counter* c = registry_->GetCounter(name, help, names, labels);
        const double delta = static_cast<double>(value) - c->value();
        if (delta > 0) c->Add(delta);
      };
      registry_->GetGauge("engram_hbm_resident_rows", "Rows held in the HBM tier", names, labels)
          ->Set(static_cast<double>(hs.resident));
      registry_->GetGauge("engram_hbm_slots", "Rows the HBM tier can hold", names, labels)
          ->Set(static_cast<double>(layer.hbm->store()->slots()));
      registry_->GetGauge("engram_hbm_readers", "Client pins watched by the HBM tier", names, labels)
          ->Set(static_cast<double>(hs.readers));
      mirror("engram_hbm_promotions_total", "Rows copied into the HBM tier", hs.promotions);
      mirror("engram_hbm_demotions_total", "Rows dropped from the HBM tier to make room", hs.demotions);
      mirror("engram_hbm_index_publications_total", "Index generations published to HBM readers", hs.generation);
      mirror("engram_hbm_stalls_total", "Promoter steps held back by a reader still on an older index", hs.stalls);
      mirror("engram_hbm_samples_total", "Row accesses the HBM promoter counted (sampled)", hs.samples);
      mirror("engram_hbm_samples_dropped_total", "Sampled row accesses dropped (promoter behind)", hs.samples_dropped);
      registry_
          ->GetGauge("engram_hbm_sample_every", "The HBM promoter counts one in this many of the rows engramd serves",
                     names, labels)
          ->Set(static_cast<double>(hs.sample_every));
      const uint64_t served = hs.served_hbm + hs.served_below;
      registry_
          ->GetGauge("engram_hbm_hit_ratio",
                     "Share of the rows clients mapping the HBM tier gathered that came from its slots, since start",
                     names, labels)
          ->Set(served > 0 ? static_cast<double>(hs.served_hbm) / static_cast<double>(served) : 0);
      if (const auto alpha = layer.hbm->zipf_alpha()) {
        registry_
            ->GetGauge("engram_hbm_zipf_alpha", "Zipf exponent fitted to the rows the HBM promoter counted", names,
                       labels)
            ->Set(*alpha);
        registry_
            ->GetGauge("engram_hbm_predicted_hit_ratio",
                       "Hit ratio the HBM tier's slots should give under the fitted Zipf exponent", names, labels)
            ->Set(ZipfEstimator::PredictHitRatio(*alpha, layer.hbm->store()->slots(), layer.hbm->total_rows()));
      }
    }
    if (has_hbm) {
      registry_
          ->GetGauge("engram_table_resident_bytes", "Bytes of each table held in each memory tier", {"table", "tier"},
                     {table->name(), "hbm"})
          ->Set(static_cast<double>(hbm_bytes));
    }
    for (const auto& layer : table->layers()) {
      const RowTier* tier = layer.tier.get();
      const NvmeReader* nvme = tier->nvme();
      if (nvme == nullptr) continue;
      const TierActivity activity = tier->activity();
      const std::vector<std::string> labels = {table->name(), absl::StrCat(layer.pack_layer->id)};
      const std::vector<std::string> names = {"table", "layer"};
      const NvmeStats& io = nvme->stats();
      // Counters mirror the tier's own monotonic counts: set by adding the difference.
      auto mirror = [&](const std::string& name, const std::string& help, uint64_t value) {
        Counter* c = registry_->GetCounter(name, help, names, labels);
        const double delta = static_cast<double>(value) - c->value();
        if (delta > 0) c->Add(delta);
      };
      mirror("engram_nvme_reads_total", "Device reads issued (rows in shared or adjoining blocks read once)",
             io.reads.load());
      mirror("engram_nvme_read_bytes_total", "Bytes read from NVMe", io.bytes.load());
      mirror("engram_nvme_read_retries_total", "Short reads re-issued", io.retries.load());
      mirror("engram_nvme_read_errors_total", "Lookups failed with DATA_LOSS by a read error", io.errors.load());
      mirror("engram_nvme_blocks_verified_total",
             "4096-byte blocks read from NVMe and checked against the pack's block checksums",
             io.blocks_verified.load());
      mirror("engram_nvme_checksum_retries_total", "Blocks that failed their checksum and passed when read again",
             io.checksum_retries.load());
      mirror("engram_nvme_checksum_failures_total",
             "Blocks that failed their checksum twice (their lookups failed with DATA_LOSS; never cached)",
             io.checksum_failures.load());
      mirror("engram_nvme_rings_abandoned_total", "io_uring rings given up after a failed wait with reads in flight",
             io.rings_abandoned.load());
      mirror("engram_nvme_shared_reads_total", "Rows a request took from another request's read in flight",
             activity.shared_reads);
      registry_
          ->GetGauge("engram_nvme_io_engine", "NVMe read engine in use (1 for the engine in use)",
                     {"table", "layer", "engine"}, {labels[0], labels[1], std::string(nvme->engine_name())})
          ->Set(1);
      const RowCache* cache = tier->cache();
      if (cache == nullptr) continue;
      const RowCacheStats s = cache->stats();
      const std::vector<std::string> outcome_names = {"table", "layer", "outcome"};
      const std::string prefetch_help =
          "Prefetched rows by outcome: useful (demand hit them), late (demand waited on their read), "
          "wasted (evicted or refused unused)";
      const std::pair<const char*, uint64_t> outcomes[] = {
          {"useful", s.prefetch_useful}, {"late", activity.prefetch_late}, {"wasted", s.prefetch_wasted}};
      for (const auto& [outcome, value] : outcomes) {
        Counter* c = registry_->GetCounter("engram_prefetch_rows_total", prefetch_help, outcome_names,
                                           {labels[0], labels[1], outcome});
        if (static_cast<double>(value) > c->value()) c->Add(static_cast<double>(value) - c->value());
      }
      mirror("engram_prefetch_requested_rows_total", "Distinct rows asked for by Prefetch",
             activity.prefetch_requested);
      mirror("engram_prefetch_dropped_rows_total", "Prefetch rows dropped because the queue was full",
             activity.prefetch_dropped);
      mirror("engram_cache_hits_total", "DRAM cache lookups that found the row", s.hits);
      mirror("engram_cache_misses_total", "DRAM cache lookups that did not", s.misses);
      mirror("engram_cache_evictions_total", "Rows evicted from the DRAM cache", s.evictions);
      mirror("engram_cache_admission_rejections_total", "Rows read after a miss but not admitted", s.rejected);
      registry_->GetGauge("engram_cache_rows", "Rows held in the DRAM cache", names, labels)
          ->Set(static_cast<double>(cache->size()));
      registry_->GetGauge("engram_cache_capacity_rows", "Row slots of the DRAM cache", names, labels)
          ->Set(static_cast<double>(cache->capacity_rows()));
      const double lookups = static_cast<double>(s.hits + s.misses);
      registry_->GetGauge("engram_cache_hit_ratio", "Share of DRAM cache lookups that hit, since start", names, labels)
          ->Set(lookups > 0 ? static_cast<double>(s.hits) / lookups : 0);
      if (const auto alpha = tier->frequency() ? tier->frequency()->Alpha() : std::nullopt) {
        registry_
            ->GetGauge("engram_cache_zipf_alpha", "Zipf exponent fitted to the layer's row accesses", names, labels)
            ->Set(*alpha);
        registry_
            ->GetGauge("engram_cache_predicted_hit_ratio",
                       "Hit ratio the cache's size should give under the fitted Zipf exponent", names, labels)
            ->Set(ZipfEstimator::PredictHitRatio(*alpha, cache->capacity_rows(), tier->total_rows()));
      }
    }
  }
}

void DaemonMetrics::SetReady(bool ready) {
  registry_->GetGauge("engram_ready", "1 when the daemon serves requests, 0 while starting or draining", {}, {})
      ->Set(ready ? 1 : 0);
}

}  // namespace engram
