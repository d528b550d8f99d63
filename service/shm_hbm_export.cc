#include "service/shm_hbm_export.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "service/log.h"

namespace engram {
namespace {

// A read-only descriptor of the same file (a client can then map it PROT_READ only).
int ReopenReadOnly(int fd) { return open(absl::StrCat("/proc/self/fd/", fd).c_str(), O_RDONLY | O_CLOEXEC); }

}  // namespace

absl::Status HandleMapHbm(const shm::Frame& frame, const ShmControlContext& ctx) {
  const std::vector<const Table*>& tables = *ctx.tables;
  ShmClientState* client = ctx.client;
  const int sock = ctx.sock;
  const std::string& who = ctx.who;
  shm::MapTableRequest request{};
  if (frame.payload.size() != sizeof(request)) {
    return absl::InvalidArgumentError("protocol violation: MapHbm frame of the wrong size");
  }
  std::memcpy(&request, frame.payload.data(), sizeof(request));
  const Table* table = request.table_id < tables.size() ? tables[request.table_id] : nullptr;
  absl::Status refusal;
  if (table == nullptr || !client->mapped[request.table_id]) {
    refusal = absl::FailedPreconditionError(
        absl::StrCat("table id ", request.table_id, " is not mapped by this client (MapTable first)"));
  } else if (client->hbm_mapped[request.table_id]) {
    refusal = absl::AlreadyExistsError(absl::StrCat("table '", table->name(), "' HBM tier is mapped already"));
  } else {
    for (const auto& layer : table->layers()) {
      if (layer.hbm == nullptr) {
        refusal = absl::FailedPreconditionError(
            absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id, " has no HBM tier"));
        break;
      }
    }
    const uint64_t pins = static_cast<uint64_t>(table->layers().size()) * shm::kPinsPerHbmLayer;
    if (refusal.ok() && client->next_pin + pins > shm::kMaxHbmPins) {
      refusal = absl::ResourceExhaustedError(absl::StrCat("a client may map the HBM tiers of at most ",
                                                          shm::kMaxHbmPins / shm::kPinsPerHbmLayer, " layers"));
    }
  }
  shm::MapTableReply reply{};
  std::string body;
  std::vector<int> fds;
  struct Closer {
    std::vector<int>* fds;
    ~Closer() {
      for (int fd : *fds) close(fd);
    }
  } closer{&fds};
  if (refusal.ok()) {
    for (const auto& layer : table->layers()) {
      HbmTier* tier = layer.hbm.get();
      shm::HbmLayer m{};
      m.layer_id = layer.pack_layer->id;
      m.kind = static_cast<uint32_t>(tier->store()->kind());
      m.first_pin = client->next_pin + static_cast<uint32_t>(body.size() / sizeof(m)) * shm::kPinsPerHbmLayer;
      m.slots = tier->store()->slots();
      m.row_bytes = static_cast<uint64_t>(tier->store()->row_bytes());
      m.index_bytes = tier->index_bytes();
      fds.push_back(ReopenReadOnly(tier->index_fd()));
      if (tier->store()->kind() == HbmStoreKind::kHost) {
        m.slot_bytes = tier->store()->bytes();
        fds.push_back(ReopenReadOnly(tier->store()->host_fd()));
      } else {
        auto ipc = tier->store()->ExportIpc();
        if (!ipc.ok()) {
          refusal = ipc.status();
          break;
        }
        m.device = ipc->device;
        std::memcpy(m.ipc_slots, ipc->slots.data(), std::min(ipc->slots.size(), sizeof(m.ipc_slots)));
        for (int b = 0; b < 2; ++b) {
          std::memcpy(m.ipc_keys[b], ipc->keys[b].data(), std::min(ipc->keys[b].size(), sizeof(m.ipc_keys[b])));
          std::memcpy(m.ipc_values[b], ipc->values[b].data(), std::min(ipc->values[b].size(), sizeof(m.ipc_values[b])));
        }
      }
      if (std::find(fds.begin(), fds.end(), -1) != fds.end()) {
        refusal = absl::InternalError(absl::StrCat("reopening the HBM tier's files read-only: ", std::strerror(errno)));
        break;
      }
      body.append(reinterpret_cast<const char*>(&m), sizeof(m));
    }
  }
  if (!refusal.ok()) {
    reply.status = static_cast<int32_t>(refusal.code());
    body = std::string(refusal.message());
    return shm::SendFrame(sock, shm::FrameType::kMapHbmReply,
                          std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, {});
  }
  // The pins are watched from now on: a step never rewrites what a pinned reader may be reading.
  uint32_t pin = client->next_pin;
  for (const auto& layer : table->layers()) {
    for (uint32_t k = 0; k < shm::kPinsPerHbmLayer; ++k, ++pin) {
      const std::atomic<uint64_t>* p = &client->header->hbm_pins[pin];
      layer.hbm->AddReader(p);
      client->readers.push_back({layer.hbm.get(), p});
    }
  }
  client->next_pin = pin;
  client->hbm_mapped[request.table_id] = true;
  reply.layers = static_cast<uint32_t>(table->layers().size());
  LogInfo("shm_hbm_mapped", {{"pid", who},
                             {"table", table->name()},
                             {"layers", absl::StrCat(reply.layers)},
                             {"store", table->layers()[0].hbm->store()->description()}});
  return shm::SendFrame(sock, shm::FrameType::kMapHbmReply,
                        std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, fds);
}

absl::Status HandleAccessReport(const shm::Frame& frame, const ShmControlContext& ctx) {
  const std::vector<const Table*>& tables = *ctx.tables;
  ShmClientState* client = ctx.client;
  const std::string& who = ctx.who;
  shm::AccessReport r{};
  if (frame.payload.size() < sizeof(r)) {
    return absl::InvalidArgumentError("protocol violation: AccessReport frame of the wrong size");
  }
  std::memcpy(&r, frame.payload.data(), sizeof(r));
  if (r.samples > shm::kMaxAccessSamples || frame.payload.size() != sizeof(r) + uint64_t{r.samples} * 8) {
    return absl::InvalidArgumentError("protocol violation: AccessReport frame of the wrong size");
  }
  const Table* table = r.table_id < tables.size() && client->hbm_mapped[r.table_id] ? tables[r.table_id] : nullptr;
  const Table::Layer* layer = table != nullptr ? table->FindLayer(r.layer_id) : nullptr;
  std::string refused;
  std::vector<uint64_t> rows(r.samples);
  if (r.samples > 0) std::memcpy(rows.data(), frame.payload.data() + sizeof(r), rows.size() * 8);
  if (table == nullptr) {
    refused = absl::StrCat("table id ", r.table_id, " has no HBM tier mapped by this client");
  } else if (layer == nullptr || layer->hbm == nullptr) {
    refused = absl::StrCat("table '", table->name(), "' has no HBM layer ", r.layer_id);
  } else if (r.hbm_rows > (1ull << 40)) {
    refused = absl::StrCat(r.hbm_rows, " rows from HBM is not a possible count");
  } else {
    for (uint64_t row : rows) {
      if (row >= layer->hbm->total_rows()) {
        refused = absl::StrCat("sampled row ", row, " is beyond the ", layer->hbm->total_rows(), " rows of layer ",
                               r.layer_id);
        break;
      }
    }
  }
  if (!refused.empty()) {
    LogWarn("shm_access_report_refused", {{"pid", who}, {"reason", refused}});
    return absl::OkStatus();
  }
  layer->hbm->RecordRows(rows, shm::kAccessSampleEvery);
  layer->hbm->CountServed(r.hbm_rows, 0);
  if (r.hbm_rows > 0) ctx.metrics->RecordMappedLookups(*table, 0, r.hbm_rows, TierKind::kHbm);
  return absl::OkStatus();
}

}  // namespace engram
