#include "service/hbm_setup.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "service/log.h"
#include "tiering/hbm/gpu_probe.h"
#include "tiering/hbm/hbm_slot_store.h"
#include "tiering/hbm/hbm_tier.h"

namespace engram {

absl::Status CheckHbmOptions(const HbmSetupOptions& options) {
  if (options.store != "auto" && options.store != "cuda" && options.store != "host") {
    return absl::InvalidArgumentError(absl::StrCat("--hbm-store: '", options.store, "' is not auto, cuda or host"));
  }
  if (options.step_ms < 1 || options.step_ms > 60000) {
    return absl::InvalidArgumentError(absl::StrCat("--hbm-step-ms: ", options.step_ms, " is not in [1, 60000]"));
  }
  if (options.store == "host" && options.budget_bytes == 0) {
    return absl::InvalidArgumentError("--hbm-store host needs an --hbm-budget");
  }
  return absl::OkStatus();
}

namespace {

// The most slots whose rows and index (two buffers of 12-byte buckets on the device) fit `bytes`.
uint32_t SlotsFor(uint64_t bytes, int64_t row_bytes, uint64_t rows) {
  uint64_t slots = std::min<uint64_t>(rows, bytes / static_cast<uint64_t>(row_bytes));
  slots = std::min<uint64_t>(slots, UINT32_MAX / 2);
  while (slots > 0 && slots * static_cast<uint64_t>(row_bytes) +
                              HbmResidency::BucketsFor(static_cast<uint32_t>(slots)) * 24 > bytes) {
    slots -= std::max<uint64_t>(1, slots / 64);
  }
  return static_cast<uint32_t>(slots);
}

}  // namespace

absl::StatusOr<bool> SetUpHbm(const HbmSetupOptions& options, Engine* engine) {
  auto off = [&](const std::string& reason, std::vector<LogField> extra = {}) -> absl::StatusOr<bool> {
    std::vector<LogField> fields = {{"reason", reason}};
    fields.insert(fields.end(), extra.begin(), extra.end());
    LogFields(options.budget_bytes > 0 ? "WARN" : "INFO", "tier_hbm_off", fields);
    return false;
  };
  if (options.budget_bytes == 0) return off("--hbm-budget is 0");
  std::string where;
  if (options.store != "host") {
    // Probe only when asked: touching the CUDA runtime makes a context that holds GPU memory.
    auto gpu = ProbeGpu(options.gpu);
    if (!gpu.ok()) {
      if (options.store == "cuda") {
        return absl::FailedPreconditionError(absl::StrCat("--hbm-store cuda: ", gpu.status().message()));
      }
      return off(std::string(gpu.status().message()));
    }
    if (gpu->free_bytes < options.budget_bytes) {
      const std::string reason = absl::StrCat("--hbm-budget ", options.budget_bytes, " bytes exceeds GPU ",
                                              gpu->device, "'s ", gpu->free_bytes, " free bytes");
      if (options.store == "cuda") return absl::ResourceExhaustedError(reason);
      return off(reason, {{"gpu", absl::StrCat(gpu->device, " (", gpu->name, ")")}});
    }
    where = absl::StrCat("GPU ", gpu->device, " (", gpu->name, ")");
  } else {
    where = "host memory (emulated HBM, for testing)";
  }
  // The budget is shared by every layer in proportion to its rows.
  uint64_t all_rows = 0;
  for (const Table* table : engine->tables()) {
    for (const auto& layer : table->layers()) all_rows += layer.tier->total_rows();
  }
  HbmTierOptions tier_options;
  tier_options.samples_per_step = options.samples_per_step;
  tier_options.max_moves = options.max_moves;
  uint64_t slots_total = 0, bytes_total = 0;
  for (Table* table : engine->mutable_tables()) {
    for (const auto& layer : table->layers()) {
      const uint64_t rows = layer.tier->total_rows();
      const uint64_t share = static_cast<uint64_t>(static_cast<long double>(options.budget_bytes) * rows / all_rows);
      const uint32_t slots = SlotsFor(share, layer.tier->row_bytes(), rows);
      if (slots == 0) {
        return absl::InvalidArgumentError(absl::StrCat("--hbm-budget ", options.budget_bytes,
                                                       " bytes leaves no room for a single row of table '",
                                                       table->name(), "' layer ", layer.pack_layer->id));
      }
      absl::StatusOr<std::unique_ptr<HbmSlotStore>> store =
          options.store == "host"
              ? CreateHostSlotStore(slots, layer.tier->row_bytes())
              : CreateCudaSlotStore(options.gpu, slots, layer.tier->row_bytes(), HbmResidency::BucketsFor(slots));
      if (!store.ok()) return store.status();
      auto tier = HbmTier::Create(layer.tier.get(), std::move(*store), tier_options);
      if (!tier.ok()) return tier.status();
      slots_total += slots;
      bytes_total += (*tier)->store()->bytes();
      LogInfo("tier_hbm_layer", {{"table", table->name()}, {"layer", absl::StrCat(layer.pack_layer->id)},
                                 {"slots", absl::StrCat(slots)}, {"rows", absl::StrCat(rows)},
                                 {"bytes", absl::StrCat((*tier)->store()->bytes())}});
      if (absl::Status s = table->AttachHbm(layer.pack_layer->id, std::move(*tier)); !s.ok()) return s;
    }
  }
  LogInfo("tier_hbm_on", {{"store", where}, {"slots", absl::StrCat(slots_total)},
                          {"bytes", absl::StrCat(bytes_total)}, {"step_ms", absl::StrCat(options.step_ms)}});
  return true;
}

HbmPromoter::HbmPromoter(Engine* engine, int step_ms) : step_ms_(step_ms) {
  for (const Table* table : engine->tables()) {
    for (const auto& layer : table->layers()) {
      if (layer.hbm == nullptr) continue;
      tiers_.push_back(layer.hbm.get());
      names_.push_back(absl::StrCat(table->name(), "/", layer.pack_layer->id));
    }
  }
  if (!tiers_.empty()) thread_ = std::thread([this] { Loop(); });
}

HbmPromoter::~HbmPromoter() { Stop(); }

void HbmPromoter::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void HbmPromoter::Loop() {
  std::vector<bool> failed(tiers_.size(), false);
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::milliseconds(step_ms_), [&] { return stop_; })) {
    lock.unlock();
    for (size_t i = 0; i < tiers_.size(); ++i) {
      auto stepped = tiers_[i]->Step();
      if (!stepped.ok() && !failed[i]) {  // once per layer: a frozen tier keeps returning it
        failed[i] = true;
        LogWarn("hbm_step_failed", {{"layer", names_[i]}, {"error", std::string(stepped.status().message())}});
      }
    }
    lock.lock();
  }
}

}  // namespace engram
