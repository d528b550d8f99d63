#include "tiering/engine.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "tiering/batch_dedup.h"
#include "tiering/layout/request_rows.h"

namespace engram {

absl::StatusOr<EngineOptions::Dedup> ParseDedup(absl::string_view text) {
  if (text == "auto") return EngineOptions::Dedup::kAuto;
  if (text == "on") return EngineOptions::Dedup::kOn;
  if (text == "off") return EngineOptions::Dedup::kOff;
  return absl::InvalidArgumentError(absl::StrCat("--dedup '", text, "' is not auto, on or off"));
}

Engine::Engine(const EngineOptions& options) : options_(options) {
  int helpers = options.worker_threads;
  if (helpers < 0) helpers = std::max(0, static_cast<int>(std::thread::hardware_concurrency()) - 1);
  pool_ = std::make_unique<WorkerPool>(helpers);
  if (options_.rows_per_piece == 0) options_.rows_per_piece = 8192;
}

absl::Status Engine::AddTable(std::unique_ptr<Table> table) {
  if (FindTable(table->name()) != nullptr) {
    return absl::AlreadyExistsError(
        absl::StrCat("a table named '", table->name(), "' is already served (from ", table->dir(), ")"));
  }
  tables_.push_back(std::move(table));
  return absl::OkStatus();
}

const Table* Engine::FindTable(absl::string_view name) const {
  for (const auto& t : tables_) {
    if (t->name() == name) return t.get();
  }
  return nullptr;
}

std::vector<Table*> Engine::mutable_tables() {
  std::vector<Table*> out;
  for (const auto& t : tables_) out.push_back(t.get());
  return out;
}

std::vector<const Table*> Engine::tables() const {
  std::vector<const Table*> out;
  for (const auto& t : tables_) out.push_back(t.get());
  return out;
}

absl::Status Engine::Lookup(absl::string_view table_name, int layer_id, uint32_t num_tokens,
                            absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                            LookupStats* stats) {
  const Table* table = FindTable(table_name);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("no table named '", table_name, "'"));
  return Lookup(*table, layer_id, num_tokens, indices, out, stats);
}

absl::StatusOr<const Table::Layer*> Engine::ResolveRows(const Table& table, int layer_id, uint32_t num_tokens,
                                                        absl::Span<const uint32_t> indices,
                                                        std::vector<uint64_t>* rows) const {
  const Table::Layer* layer = table.FindLayer(layer_id);
  if (layer == nullptr) {
    return absl::NotFoundError(absl::StrCat("table '", table.name(), "' has no layer ", layer_id));
  }
  if (absl::Status s = ResolveHeadIndices(layer->pack_layer->layout, num_tokens, indices, options_.max_batch_rows, rows);
      !s.ok()) {
    return s;
  }
  return layer;
}

absl::StatusOr<PrefetchCounts> Engine::Prefetch(const Table& table, int layer_id, uint32_t num_tokens,
                                                absl::Span<const uint32_t> indices) {
  std::vector<uint64_t> rows;
  auto layer = ResolveRows(table, layer_id, num_tokens, indices, &rows);
  if (!layer.ok()) return layer.status();
  BatchDedup dedup;
  dedup.Build(rows);
  return (*layer)->tier->Prefetch(dedup.unique_rows());
}

absl::Status Engine::Lookup(const Table& table, int layer_id, uint32_t num_tokens,
                            absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                            LookupStats* stats) {
  // Reused across requests on this thread: a fresh 8-byte-per-row buffer would cost page faults.
  // (Bound to a reference: the helpers below must use this thread's buffer, not their own.)
  thread_local std::vector<uint64_t> tls_rows;
  std::vector<uint64_t>& rows = tls_rows;
  auto layer = ResolveRows(table, layer_id, num_tokens, indices, &rows);
  if (!layer.ok()) return layer.status();
  const uint64_t total = rows.size();
  const int64_t row_bytes = table.row_bytes();
  if (out.size() != total * static_cast<uint64_t>(row_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("output buffer holds ", out.size(), " bytes, ",
                                                   total * row_bytes, " needed"));
  }

  const uint32_t piece_rows = options_.rows_per_piece;
  const int pieces = static_cast<int>((total + piece_rows - 1) / piece_rows);
  std::mutex mu;
  absl::Status first_error;
  LookupStats totals;
  totals.rows_requested = total;
  RowTier* tier = (*layer)->tier.get();
  if ((*layer)->hbm != nullptr) (*layer)->hbm->SampleLookup(rows);
  const bool use_dedup = options_.dedup == EngineOptions::Dedup::kOn ||
                         (options_.dedup == EngineOptions::Dedup::kAuto && tier->dedup_saves_reads());
  pool_->ParallelFor(pieces, [&](int piece) {
    thread_local BatchDedup dedup;
    thread_local std::vector<uint8_t*> dests;
    const size_t begin = static_cast<size_t>(piece) * piece_rows;
    const size_t end = std::min<size_t>(total, begin + piece_rows);
    const absl::Span<const uint64_t> piece_span(rows.data() + begin, end - begin);
    uint8_t* base = out.data() + begin * row_bytes;
    TierCounts counts;
    if (!use_dedup) {
      dests.resize(piece_span.size());
      for (size_t i = 0; i < dests.size(); ++i) dests[i] = base + i * row_bytes;
      const absl::Status s = tier->ReadRows(piece_span, dests, &counts);
      std::lock_guard<std::mutex> lock(mu);
      if (!s.ok() && first_error.ok()) first_error = s;
      totals.rows_read += piece_span.size();
      totals.tiers.Add(counts);
      return;
    }
    dedup.Build(piece_span);
    dests.resize(dedup.unique_rows().size());
    for (size_t u = 0; u < dests.size(); ++u) dests[u] = base + dedup.first_positions()[u] * row_bytes;
    absl::Status s = tier->ReadRows(dedup.unique_rows(), dests, &counts);
    if (s.ok()) {
      for (const auto& rep : dedup.repeats()) {
        std::memcpy(base + static_cast<size_t>(rep.position) * row_bytes, dests[rep.unique_index],
                    static_cast<size_t>(row_bytes));
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    if (!s.ok() && first_error.ok()) first_error = s;
    totals.rows_read += dedup.unique_rows().size();
    totals.tiers.Add(counts);
  });
  if (!first_error.ok()) return first_error;
  if (stats != nullptr) *stats = totals;
  return absl::OkStatus();
}

absl::Status Engine::HashTokens(const Table& table, int layer_id, absl::Span<const int32_t> token_ids,
                                uint32_t batch, uint32_t seq_len, std::vector<uint32_t>* indices) {
  const NgramHasher& hasher = table.hasher();
  const int layer_index = hasher.LayerIndex(layer_id);
  if (layer_index < 0) {
    return absl::NotFoundError(absl::StrCat("table '", table.name(), "' has no layer ", layer_id));
  }
  const size_t tokens = static_cast<size_t>(batch) * seq_len;
  if (tokens == 0 || token_ids.size() != tokens) {
    return absl::InvalidArgumentError(absl::StrCat("token_ids hold ", token_ids.size() * 4,
                                                   " bytes; batch ", batch, " x seq_len ", seq_len,
                                                   " x 4 bytes = ", tokens * 4, " expected (non-zero)"));
  }
  std::vector<int64_t> compressed(tokens);
  if (absl::Status s = hasher.Compress(token_ids, absl::MakeSpan(compressed)); !s.ok()) return s;
  std::vector<int64_t> local(tokens * hasher.heads_per_layer());
  hasher.HashCompressed(compressed, static_cast<int>(batch), static_cast<int>(seq_len), layer_index,
                        absl::MakeSpan(local));
  indices->assign(local.begin(), local.end());
  return absl::OkStatus();
}

}  // namespace engram
