// MappedTable: mapping a resident table, gathering from it with the daemon's checks, reporting.
#include "engram/mapped_table.h"

#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <fcntl.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/shm_internal.h"
#include "engram/kernels/gather_host.h"
#include "engram/shm_socket.h"
#include "engram/v1/engram.pb.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;
using shm_internal::FdsCloser;
using shm_internal::NowNs;

absl::StatusOr<std::unique_ptr<MappedTable>> ShmConnection::MapTable(const RemoteTable& table) {
  v1::TableInfo info;
  if (!info.ParseFromString(table.table_info)) return absl::InvalidArgumentError("the table's layout does not parse");
  if (version_ < 2) {
    return absl::FailedPreconditionError("this engramd speaks shared-memory protocol 1, which has no mapped tables");
  }
  shm::MapTableReply reply{};
  std::string body;
  auto got = MapCall(shm::FrameType::kMapTable, shm::FrameType::kMapTableReply, table.id, &reply, &body);
  if (!got.ok()) return got.status();
  shm::Frame frame = std::move(*got);
  FdsCloser closer{&frame.fds};  // the mappings keep the memory
  std::unique_ptr<MappedTable> mapped(new MappedTable());
  if (info.max_batch_rows() > 0) mapped->max_batch_rows_ = info.max_batch_rows();
  if (reply.layers != static_cast<uint32_t>(info.layers_size()) || frame.fds.size() != reply.layers ||
      body.size() != reply.layers * sizeof(shm::MappedLayer)) {
    return absl::DataLossError(absl::StrCat("engramd's map reply for '", table.name, "' does not match its layout"));
  }
  {
    std::lock_guard<std::mutex> lock(link_->mu);
    link_->connection = this;
  }
  mapped->link_ = link_;
  mapped->table_ = table;
  mapped->row_bytes_ = table.row_bytes;
  for (uint32_t i = 0; i < reply.layers; ++i) {
    shm::MappedLayer m{};
    std::memcpy(&m, body.data() + i * sizeof(m), sizeof(m));
    const auto& layer_info = info.layers(static_cast<int>(i));
    const int fd = frame.fds[i];
    struct stat st {};
    const int seals = fcntl(fd, F_GET_SEALS);
    if (m.layer_id != static_cast<int32_t>(layer_info.id()) || m.total_rows != layer_info.total_rows() ||
        m.row_bytes != table.row_bytes || fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != m.file_bytes ||
        m.file_bytes < m.total_rows * m.row_bytes) {
      return absl::DataLossError(absl::StrCat("engramd's mapping of '", table.name, "' layer ", layer_info.id(),
                                              " does not match its layout"));
    }
    // The daemon sealed the file against shrinking: a mapped row can never turn into SIGBUS.
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("engramd's rows of '", table.name, "' are not sealed against shrinking; refusing to map them"));
    }
    auto layer = std::make_unique<MappedTable::Layer>();
    layer->id = m.layer_id;
    layer->total_rows = m.total_rows;
    layer->layout.layer_id = m.layer_id;
    for (uint64_t rows : layer_info.head_rows()) layer->layout.head_rows.push_back(static_cast<int64_t>(rows));
    layer->layout.ComputeOffsets();
    if (layer->layout.total_rows != m.total_rows || layer->layout.head_rows.size() != table.heads) {
      return absl::DataLossError(absl::StrCat("'", table.name, "' layer ", m.layer_id, ": head sizes do not add up"));
    }
    void* p = mmap(nullptr, m.file_bytes, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(absl::StrCat("mapping '", table.name, "' layer ", m.layer_id, " (",
                                                       m.file_bytes, " bytes): ", std::strerror(errno)));
    }
    layer->base = static_cast<const uint8_t*>(p);
    layer->map_bytes = m.file_bytes;
    mapped->layers_.push_back(std::move(layer));
  }
  mapped->report_interval_ns_ = static_cast<int64_t>(options_.mapped_report_interval_ms) * 1'000'000;
  mapped->last_report_ns_.store(NowNs());
  mapped->version_ = version_;
  if (version_ >= 3 && options_.use_hbm) {
    // Without an HBM tier (the usual case: no GPU) the table is served from the mapping alone.
    (void)MapHbm(mapped.get(), info);
  }
  return mapped;
}

MappedTable::~MappedTable() {
  if (link_ != nullptr) (void)ReportCounters();
  for (const auto& layer : layers_) {
    munmap(const_cast<uint8_t*>(layer->base), layer->map_bytes);
    if (layer->hbm_index != nullptr) {
      munmap(const_cast<kernels::HbmIndexHeader*>(layer->hbm_index), layer->hbm_index_bytes);
    }
    if (layer->hbm_slots != nullptr) munmap(const_cast<uint8_t*>(layer->hbm_slots), layer->hbm_slot_bytes);
  }
}

uint64_t MappedTable::mapped_bytes() const {
  uint64_t total = 0;
  for (const auto& layer : layers_) total += layer->map_bytes;
  return total;
}

absl::StatusOr<MappedTable::Layer*> MappedTable::ResolveRows(int layer_id, uint32_t num_tokens,
                                                             absl::Span<const uint32_t> indices, uint64_t out_bytes,
                                                             std::vector<uint64_t>* rows) {
  Layer* layer = nullptr;
  for (const auto& l : layers_) {
    if (l->id == layer_id) layer = l.get();
  }
  if (layer == nullptr) return absl::NotFoundError(absl::StrCat("table '", table_.name, "' has no layer ", layer_id));
  // The daemon's own checks, limit included; every index is checked before any row is copied.
  if (absl::Status s = ResolveHeadIndices(layer->layout, num_tokens, indices, max_batch_rows_, rows); !s.ok()) return s;
  const uint64_t total = rows->size();
  if (out_bytes != total * row_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat("output buffer holds ", out_bytes, " bytes; ", total, " rows x ",
                                                   row_bytes_, " bytes = ", total * row_bytes_, " expected"));
  }
  return layer;
}

absl::Status MappedTable::Lookup(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                                 absl::Span<uint8_t> out) {
  thread_local std::vector<uint64_t> rows;
  auto resolved = ResolveRows(layer_id, num_tokens, indices, out.size(), &rows);
  if (!resolved.ok()) return resolved.status();
  Layer* layer = *resolved;
  const uint64_t total = rows.size();
  const bool hbm = hbm_access_ == HbmAccess::kHost && layer->hbm_index != nullptr &&
                   GatherWithHbm(layer, absl::MakeConstSpan(rows), out);
  if (!hbm) {
    // Through plain pointers: `rows` is thread_local, and in a shared object (the Python module)
    // each use of it per row would be a __tls_get_addr call.
    const uint64_t* row_ids = rows.data();
    uint8_t* dest = out.data();
    const uint64_t row_bytes = row_bytes_;
    kernels::GatherRowsHost(
        layer->base, row_bytes, total, [row_ids](size_t i) { return row_ids[i]; },
        [dest, row_bytes](size_t i) { return dest + i * row_bytes; });
    layer->rows.fetch_add(total, std::memory_order_relaxed);
  }
  if (layer->hbm_index != nullptr) Sample(layer, rows);
  layer->lookups.fetch_add(1, std::memory_order_relaxed);
  if (NowNs() - last_report_ns_.load(std::memory_order_relaxed) >= report_interval_ns_) return ReportCounters();
  return absl::OkStatus();
}

absl::Status MappedTable::ReportCounters() {
  std::lock_guard<std::mutex> lock(report_mu_);
  last_report_ns_.store(NowNs(), std::memory_order_relaxed);
  std::vector<shm::CounterReport> reports;
  for (const auto& layer : layers_) {
    const uint64_t lookups = layer->lookups.exchange(0, std::memory_order_relaxed);
    const uint64_t rows = layer->rows.exchange(0, std::memory_order_relaxed);  // from the DRAM mapping
    if (lookups > 0) reports.push_back({table_.id, layer->id, lookups, rows});
  }
  // HBM layers: rows from the slots and the sampled rows, one AccessReport frame each (best
  // effort: a lost sample only slows promotion).
  std::vector<std::string> access;
  for (const auto& layer : layers_) {
    if (layer->hbm_index == nullptr || version_ < 3) continue;
    std::vector<uint64_t> samples;
    {
      std::lock_guard<std::mutex> lock(layer->sample_mu);
      samples.swap(layer->samples);
    }
    const uint64_t hbm_rows = layer->hbm_rows.exchange(0, std::memory_order_relaxed);
    if (samples.empty() && hbm_rows == 0) continue;
    shm::AccessReport r{table_.id, layer->id, hbm_rows, static_cast<uint32_t>(samples.size()), 0};
    std::string payload(reinterpret_cast<const char*>(&r), sizeof(r));
    payload.append(reinterpret_cast<const char*>(samples.data()), samples.size() * 8);
    access.push_back(std::move(payload));
  }
  if (reports.empty() && access.empty()) return absl::OkStatus();
  absl::Status s;
  {
    std::lock_guard<std::mutex> link_lock(link_->mu);
    s = link_->connection != nullptr ? absl::OkStatus() : absl::UnavailableError("the ShmConnection was closed");
    if (s.ok() && !reports.empty()) s = link_->connection->SendCounters(reports);
    for (size_t i = 0; s.ok() && i < access.size(); ++i) {
      s = link_->connection->SendFrame(shm::FrameType::kAccessReport, access[i]);
    }
  }
  if (!s.ok()) {
    // Keep the counts for a later report (to a reconnected daemon, if it comes to that).
    for (const auto& r : reports) {
      for (const auto& layer : layers_) {
        if (layer->id == r.layer_id) {
          layer->lookups.fetch_add(r.lookups, std::memory_order_relaxed);
          layer->rows.fetch_add(r.rows, std::memory_order_relaxed);
        }
      }
    }
    return absl::UnavailableError(
        absl::StrCat("engramd went away (reporting mapped lookups failed: ", s.message(), "); reconnect"));
  }
  return absl::OkStatus();
}

}  // namespace engram
