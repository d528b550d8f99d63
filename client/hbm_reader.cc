// A mapped table's HBM side: attaching the daemon's published index and slots (MapHbm), the pin
// protocol (engram/kernels/hbm_probe.h), gathering hits from host slots, the device split.
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
#include "tiering/batch_dedup.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;
using shm_internal::FdsCloser;
using shm_internal::NowNs;

absl::Status ShmConnection::MapHbm(MappedTable* mapped, const v1::TableInfo& info) {
  shm::MapTableReply reply{};
  std::string body;
  auto got = MapCall(shm::FrameType::kMapHbm, shm::FrameType::kMapHbmReply, mapped->table_.id, &reply, &body);
  if (!got.ok()) return got.status();
  shm::Frame frame = std::move(*got);
  FdsCloser closer{&frame.fds};
  if (reply.layers != static_cast<uint32_t>(info.layers_size()) ||
      body.size() != reply.layers * sizeof(shm::HbmLayer)) {
    return absl::DataLossError("engramd's HBM map reply does not match the table's layout");
  }
  std::vector<shm::HbmLayer> layers(reply.layers);
  std::memcpy(layers.data(), body.data(), body.size());
  const bool host = reply.layers > 0 && layers[0].kind == static_cast<uint32_t>(shm::HbmKind::kHost);
  if (frame.fds.size() != reply.layers * (host ? 2u : 1u)) {
    return absl::DataLossError("engramd's HBM map reply carries the wrong number of files");
  }
  // Check everything before anything is attached: the mappings are made into a staging list.
  struct Staged {
    const kernels::HbmIndexHeader* index = nullptr;
    uint64_t index_bytes = 0;
    const uint8_t* slots = nullptr;
    uint64_t slot_bytes = 0;
  };
  std::vector<Staged> staged(reply.layers);
  auto unmap_all = [&] {
    for (const Staged& st : staged) {
      if (st.index != nullptr) munmap(const_cast<kernels::HbmIndexHeader*>(st.index), st.index_bytes);
      if (st.slots != nullptr) munmap(const_cast<uint8_t*>(st.slots), st.slot_bytes);
    }
  };
  auto map_ro = [](int fd, uint64_t bytes) -> const uint8_t* {
    struct stat st {};
    const int seals = fcntl(fd, F_GET_SEALS);
    if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) != bytes || seals < 0 ||
        (seals & F_SEAL_SHRINK) == 0) {
      return nullptr;
    }
    void* p = mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? nullptr : static_cast<const uint8_t*>(p);
  };
  for (uint32_t i = 0; i < reply.layers; ++i) {
    const shm::HbmLayer& m = layers[i];
    const MappedTable::Layer* layer = i < mapped->layers_.size() ? mapped->layers_[i].get() : nullptr;
    const bool kind_ok =
        m.kind == (host ? static_cast<uint32_t>(shm::HbmKind::kHost) : static_cast<uint32_t>(shm::HbmKind::kCuda));
    const bool pins_ok = m.first_pin <= shm::kMaxHbmPins - shm::kPinsPerHbmLayer;
    const uint8_t* index = (layer != nullptr && kind_ok && pins_ok && m.row_bytes == mapped->row_bytes_ &&
                            m.layer_id == layer->id && m.index_bytes >= sizeof(kernels::HbmIndexHeader))
                               ? map_ro(frame.fds[host ? 2 * i : i], m.index_bytes)
                               : nullptr;
    if (index == nullptr) {
      unmap_all();
      return absl::DataLossError(absl::StrCat("engramd's HBM tier of '", mapped->table_.name, "' layer ", m.layer_id,
                                              " does not match the table, or its index cannot be mapped"));
    }
    staged[i].index = reinterpret_cast<const kernels::HbmIndexHeader*>(index);
    staged[i].index_bytes = m.index_bytes;
    const kernels::HbmIndexHeader* h = staged[i].index;
    const uint64_t buckets = h->bucket_mask + 1;
    bool ok = h->magic == kernels::kHbmIndexMagic && h->version == kernels::kHbmIndexVersion && h->slots == m.slots &&
              h->row_bytes == m.row_bytes && (buckets & h->bucket_mask) == 0 && buckets <= (m.index_bytes >> 3) &&
              h->total_bytes == m.index_bytes;
    for (int b = 0; ok && b < 2; ++b) {
      ok = h->keys_offset[b] % 8 == 0 && h->values_offset[b] % 4 == 0 && h->keys_offset[b] <= m.index_bytes &&
           buckets * 8 <= m.index_bytes - h->keys_offset[b] && h->values_offset[b] <= m.index_bytes &&
           buckets * 4 <= m.index_bytes - h->values_offset[b];
    }
    if (ok && host) {
      ok = m.slot_bytes >= uint64_t{m.slots} * m.row_bytes;
      staged[i].slots = ok ? map_ro(frame.fds[2 * i + 1], m.slot_bytes) : nullptr;
      staged[i].slot_bytes = m.slot_bytes;
      ok = staged[i].slots != nullptr;
    }
    if (!ok) {
      unmap_all();
      return absl::DataLossError(absl::StrCat("engramd's HBM index of '", mapped->table_.name, "' layer ", m.layer_id,
                                              " is not laid out as its header says"));
    }
  }
  {
    std::unique_lock<std::shared_mutex> lock(link_->arena_mu);
    link_->arena = header();
  }
  for (uint32_t i = 0; i < reply.layers; ++i) {
    MappedTable::Layer* layer = mapped->layers_[i].get();
    layer->hbm_index = staged[i].index;
    layer->hbm_index_bytes = staged[i].index_bytes;
    layer->hbm_slots = staged[i].slots;
    layer->hbm_slot_bytes = staged[i].slot_bytes;
    layer->hbm_slot_count = layers[i].slots;
    layer->first_pin = layers[i].first_pin;
    layer->hbm_info = layers[i];
    // Each process and layer draws its own sample positions.
    layer->sampler =
        HbmSampler(shm::kAccessSampleEvery, 0x9e3779b97f4a7c15ULL ^ (static_cast<uint64_t>(getpid()) << 20) ^
                                                static_cast<uint64_t>(static_cast<uint32_t>(layer->id)));
  }
  // A GPU store's slots are reached through its IPC handles on the device path; the host path
  // (Lookup) gathers from host stores only.
  mapped->hbm_access_ = host ? MappedTable::HbmAccess::kHost : MappedTable::HbmAccess::kCuda;
  return absl::OkStatus();
}

absl::StatusOr<MappedTable::DevicePin> MappedTable::SplitForDevice(int layer_id, uint32_t num_tokens,
                                                                   absl::Span<const uint32_t> indices,
                                                                   uint32_t* sources, uint8_t* staged) {
  // Counts and samples go out as from Lookup (before the pin: a daemon that is gone is an error).
  if (NowNs() - last_report_ns_.load(std::memory_order_relaxed) >= report_interval_ns_) {
    if (absl::Status s = ReportCounters(); !s.ok()) return s;
  }
  thread_local std::vector<uint64_t> rows;
  const uint64_t heads = table_.heads;
  auto resolved = ResolveRows(layer_id, num_tokens, indices, uint64_t{num_tokens} * heads * row_bytes_, &rows);
  if (!resolved.ok()) return resolved.status();
  Layer* layer = *resolved;
  if (layer->hbm_index == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("table '", table_.name, "' layer ", layer_id, " has no HBM tier"));
  }
  thread_local std::vector<uint64_t> missed;  // positions the staging takes, in order
  missed.reserve(rows.size());                // before the pin: nothing may throw while it is held
  // Each distinct row once: a repeat of a row the tier lacks takes the first one's staged copy.
  thread_local FirstPositionScratch scratch;
  thread_local std::vector<uint32_t> first, staged_at;  // position -> its row's first position; -> its staged row
  FirstPositions(rows, &scratch, &first);
  staged_at.resize(rows.size());
  std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
  if (link_->arena == nullptr) return absl::FailedPreconditionError("the connection to engramd is closed");
  uint64_t g = 0;
  const int k = AcquirePin(layer, &g);
  if (k == kDetached) return absl::FailedPreconditionError("engramd has detached its HBM tier (it is shutting down)");
  if (k < 0) return absl::FailedPreconditionError("every HBM pin of this layer is in use");
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const int b = static_cast<int>(g & 1);
  const auto* keys = reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]);
  const auto* values = reinterpret_cast<const uint32_t*>(base + h->values_offset[b]);
  DevicePin pin{layer_id, static_cast<uint32_t>(k), 0};
  kernels::HbmProbeMany(keys, values, h->bucket_mask, rows.data(), rows.size(), sources);
  missed.clear();
  for (size_t i = 0; i < rows.size(); ++i) {
    if (sources[i] < layer->hbm_slot_count) continue;
    // A row's first position comes first and is a miss too (the same row, the same index).
    if (first[i] == i) {
      staged_at[i] = static_cast<uint32_t>(missed.size());
      missed.push_back(i);
    } else {
      ++pin.repeated_rows;
    }
    sources[i] = kernels::kHbmFromStaging | staged_at[first[i]];
  }
  pin.staged_rows = missed.size();
  // Through plain pointers (the vectors are thread_local: see MappedTable::Lookup).
  const uint64_t* row_ids = rows.data();
  const uint64_t* missed_at = missed.data();
  const uint64_t row_bytes = row_bytes_;
  kernels::GatherRowsHost(
      layer->base, row_bytes, missed.size(), [row_ids, missed_at](size_t j) { return row_ids[missed_at[j]]; },
      [staged, row_bytes](size_t j) { return staged + j * row_bytes; });
  const uint64_t hits = rows.size() - pin.staged_rows - pin.repeated_rows;
  layer->hbm_rows.fetch_add(hits, std::memory_order_relaxed);
  layer->hbm_rows_total.fetch_add(hits, std::memory_order_relaxed);
  layer->rows.fetch_add(rows.size() - hits, std::memory_order_relaxed);
  layer->lookups.fetch_add(1, std::memory_order_relaxed);
  Sample(layer, rows);
  link_->device_pins.fetch_add(1, std::memory_order_acq_rel);
  return pin;
}

absl::StatusOr<MappedTable::DevicePin> MappedTable::SplitForDeviceDirect(int layer_id, uint32_t num_tokens,
                                                                         absl::Span<const uint32_t> indices,
                                                                         bool use_hbm, uint64_t* sources) {
  if (NowNs() - last_report_ns_.load(std::memory_order_relaxed) >= report_interval_ns_) {
    if (absl::Status s = ReportCounters(); !s.ok()) return s;
  }
  thread_local std::vector<uint64_t> rows;
  thread_local std::vector<uint32_t> slots;
  auto resolved = ResolveRows(layer_id, num_tokens, indices, uint64_t{num_tokens} * table_.heads * row_bytes_, &rows);
  if (!resolved.ok()) return resolved.status();
  Layer* layer = *resolved;
  slots.resize(rows.size());  // before any pin: nothing may throw while it is held
  thread_local FirstPositionScratch scratch;
  thread_local std::vector<uint32_t> first;  // position -> its row's first position
  FirstPositions(rows, &scratch, &first);
  DevicePin pin{.layer_id = layer_id, .pinned = false};
  // A row not in the tier is read from host memory at its first position and copied on the device
  // from there to the others (a row's first position comes first and is a miss too).
  auto from_host = [&](size_t i) {
    if (first[i] == i) {
      ++pin.staged_rows;
      return kernels::kDirectFromHost | rows[i];
    }
    ++pin.repeated_rows;
    return kernels::kDirectRepeat | first[i];
  };
  uint64_t hits = 0;
  if (use_hbm && layer->hbm_index != nullptr) {
    std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
    if (link_->arena == nullptr) return absl::FailedPreconditionError("the connection to engramd is closed");
    uint64_t g = 0;
    const int k = AcquirePin(layer, &g);
    if (k >= 0) {  // detached or every pin busy: all rows from host memory, still exact
      const kernels::HbmIndexHeader* h = layer->hbm_index;
      const auto* base = reinterpret_cast<const uint8_t*>(h);
      const int b = static_cast<int>(g & 1);
      kernels::HbmProbeMany(reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]),
                            reinterpret_cast<const uint32_t*>(base + h->values_offset[b]), h->bucket_mask, rows.data(),
                            rows.size(), slots.data());
      for (size_t i = 0; i < rows.size(); ++i) {
        const bool hit = slots[i] < layer->hbm_slot_count;
        sources[i] = hit ? slots[i] : from_host(i);
        hits += hit ? 1 : 0;
      }
      pin.pin = static_cast<uint32_t>(k);
      pin.pinned = true;
      link_->device_pins.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  if (!pin.pinned) {
    for (size_t i = 0; i < rows.size(); ++i) sources[i] = from_host(i);
  }
  layer->hbm_rows.fetch_add(hits, std::memory_order_relaxed);
  layer->hbm_rows_total.fetch_add(hits, std::memory_order_relaxed);
  layer->rows.fetch_add(rows.size() - hits, std::memory_order_relaxed);
  layer->lookups.fetch_add(1, std::memory_order_relaxed);
  Sample(layer, rows);
  return pin;
}

absl::Span<const uint8_t> MappedTable::layer_rows(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id) return absl::Span<const uint8_t>(layer->base, layer->total_rows * row_bytes_);
  }
  return {};
}

void MappedTable::ReleaseDevicePin(const DevicePin& pin) {
  if (!pin.pinned) return;
  for (const auto& layer : layers_) {
    if (layer->id != pin.layer_id || pin.pin >= shm::kPinsPerHbmLayer) continue;
    {
      std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
      UnpinLocked(layer.get(), static_cast<int>(pin.pin));
    }
    link_->device_pins.fetch_sub(1, std::memory_order_acq_rel);
    return;
  }
}

const shm::HbmLayer* MappedTable::hbm_layer(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id && layer->hbm_index != nullptr) return &layer->hbm_info;
  }
  return nullptr;
}

const uint8_t* MappedTable::hbm_host_slots(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id) return layer->hbm_slots;
  }
  return nullptr;
}

uint64_t MappedTable::hbm_rows_served(int layer_id) const {
  for (const auto& layer : layers_) {
    if (layer->id == layer_id) return layer->hbm_rows_total.load(std::memory_order_relaxed);
  }
  return 0;
}

void MappedTable::Sample(Layer* layer, absl::Span<const uint64_t> rows) {
  std::lock_guard<std::mutex> lock(layer->sample_mu);
  layer->sampler.ForEach(rows.size(), [&](size_t i) {
    if (layer->samples.size() < shm::kMaxAccessSamples) layer->samples.push_back(rows[i]);
  });
}

int MappedTable::AcquirePin(Layer* layer, uint64_t* generation) {
  uint32_t busy = layer->pins_busy.load(std::memory_order_relaxed);
  uint32_t k = 0;
  for (;;) {
    while (k < shm::kPinsPerHbmLayer && (busy & (1u << k)) != 0) ++k;
    if (k == shm::kPinsPerHbmLayer) return -1;
    if (layer->pins_busy.compare_exchange_weak(busy, busy | (1u << k), std::memory_order_acquire)) break;
    k = 0;
  }
  std::atomic<uint64_t>& pin = link_->arena->hbm_pins[layer->first_pin + k];
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  for (;;) {
    const uint64_t g = h->generation.load(std::memory_order_acquire);
    pin.store(g + 1, std::memory_order_seq_cst);
    if (h->generation.load(std::memory_order_seq_cst) != g) continue;
    if (h->detached.load(std::memory_order_seq_cst) != 0) {  // the daemon no longer protects the slots
      pin.store(0, std::memory_order_seq_cst);
      layer->pins_busy.fetch_and(~(1u << k), std::memory_order_release);
      return kDetached;
    }
    *generation = g;
    return static_cast<int>(k);
  }
}

void MappedTable::UnpinLocked(Layer* layer, int k) {
  if (link_->arena != nullptr) link_->arena->hbm_pins[layer->first_pin + k].store(0, std::memory_order_seq_cst);
  layer->pins_busy.fetch_and(~(1u << k), std::memory_order_release);
}

bool MappedTable::GatherWithHbm(Layer* layer, absl::Span<const uint64_t> rows, absl::Span<uint8_t> out) {
  thread_local std::vector<uint32_t> slots;
  slots.resize(rows.size());  // before the pin: nothing may throw while it is held
  std::shared_lock<std::shared_mutex> arena_lock(link_->arena_mu);
  if (link_->arena == nullptr) return false;  // the connection is gone: nobody protects the slots
  uint64_t g = 0;
  const int k = AcquirePin(layer, &g);
  if (k < 0) return false;
  const kernels::HbmIndexHeader* h = layer->hbm_index;
  const auto* base = reinterpret_cast<const uint8_t*>(h);
  const int b = static_cast<int>(g & 1);
  const auto* keys = reinterpret_cast<const uint64_t*>(base + h->keys_offset[b]);
  const auto* values = reinterpret_cast<const uint32_t*>(base + h->values_offset[b]);
  kernels::HbmProbeMany(keys, values, h->bucket_mask, rows.data(), rows.size(), slots.data());
  uint64_t hits = 0;
  const uint8_t* hbm = layer->hbm_slots;
  const uint32_t slot_count = layer->hbm_slot_count;
  // Through plain pointers (`slots` is thread_local: see MappedTable::Lookup).
  const uint32_t* slot_of = slots.data();
  const uint64_t* row_ids = rows.data();
  const uint8_t* dram = layer->base;
  const uint64_t row_bytes = row_bytes_;
  auto source = [=](size_t i) {
    return slot_of[i] < slot_count ? hbm + uint64_t{slot_of[i]} * row_bytes : dram + row_ids[i] * row_bytes;
  };
  for (size_t i = 0; i < rows.size(); ++i) hits += slot_of[i] < slot_count ? 1 : 0;
  uint8_t* dest = out.data();
  kernels::GatherFromHost(row_bytes, rows.size(), source, [dest, row_bytes](size_t i) { return dest + i * row_bytes; });
  UnpinLocked(layer, k);
  layer->hbm_rows.fetch_add(hits, std::memory_order_relaxed);
  layer->hbm_rows_total.fetch_add(hits, std::memory_order_relaxed);
  layer->rows.fetch_add(rows.size() - hits, std::memory_order_relaxed);
  return true;
}

}  // namespace engram
