#include "service/shm_control.h"

#include <sys/stat.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engram/v1/engram.pb.h"
#include "service/grpc_service.h"
#include "service/log.h"
#include "service/shm_hbm_export.h"

namespace engram {

absl::Status HandleControlFrame(const shm::Frame& frame, const ShmControlContext& ctx) {
  const std::vector<const Table*>& tables = *ctx.tables;
  ShmClientState* client = ctx.client;
  const int sock = ctx.sock;
  const std::string& who = ctx.who;
  std::vector<bool>* mapped = &client->mapped;
  auto id_of = [&](const Table* table) {
    for (size_t i = 0; i < tables.size(); ++i) {
      if (tables[i] == table) return static_cast<uint32_t>(i);
    }
    return UINT32_MAX;
  };
  switch (frame.type) {
    case shm::FrameType::kOpenTable: {
      shm::OpenTableReply open{};
      std::string body;
      const Table* table = ctx.engine->FindTable(frame.payload);
      if (table == nullptr) {
        open.status = static_cast<int32_t>(absl::StatusCode::kNotFound);
        body = absl::StrCat("no table named '", frame.payload, "'");
      } else {
        open.table_id = id_of(table);
        v1::TableInfo info;
        FillTableInfo(*table, ctx.engine->options().max_batch_rows, &info);
        body = info.SerializeAsString();
      }
      return shm::SendFrame(sock, shm::FrameType::kOpenTableReply,
                            std::string(reinterpret_cast<const char*>(&open), sizeof(open)) + body, {});
    }
    case shm::FrameType::kMapTable: {
      shm::MapTableRequest request{};
      shm::MapTableReply reply{};
      std::string body, message;
      std::vector<int> fds;
      const Table* table = nullptr;
      if (frame.payload.size() != sizeof(request)) {
        return absl::InvalidArgumentError("protocol violation: MapTable frame of the wrong size");
      }
      std::memcpy(&request, frame.payload.data(), sizeof(request));
      table = request.table_id < tables.size() ? tables[request.table_id] : nullptr;
      if (table == nullptr) {
        reply.status = static_cast<int32_t>(absl::StatusCode::kNotFound);
        message = absl::StrCat("table id ", request.table_id, " is not one this daemon gave out");
      } else {
        for (const auto& layer : table->layers()) {
          if (layer.tier->shared_fd() < 0) {
            reply.status = static_cast<int32_t>(absl::StatusCode::kFailedPrecondition);
            message = absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id, " is ",
                                   layer.tier->description(),
                                   ": only tables resident in DRAM with --share-tables can be mapped");
            break;
          }
          shm::MappedLayer m{};
          m.layer_id = layer.pack_layer->id;
          m.total_rows = layer.tier->total_rows();
          m.row_bytes = static_cast<uint64_t>(layer.tier->row_bytes());
          struct stat st {};
          if (fstat(layer.tier->shared_fd(), &st) != 0) {
            reply.status = static_cast<int32_t>(absl::StatusCode::kInternal);
            message = absl::StrCat("table '", table->name(), "' layer ", layer.pack_layer->id,
                                   ": cannot stat its shared memory: ", std::strerror(errno));
            break;
          }
          m.file_bytes = static_cast<uint64_t>(st.st_size);
          body.append(reinterpret_cast<const char*>(&m), sizeof(m));
          fds.push_back(layer.tier->shared_fd());
        }
      }
      if (reply.status != 0) {
        body = message;
        fds.clear();
      } else {
        reply.layers = static_cast<uint32_t>(fds.size());
        (*mapped)[request.table_id] = true;
        LogInfo("shm_table_mapped", {{"pid", who}, {"table", table->name()}, {"layers", absl::StrCat(fds.size())}});
      }
      return shm::SendFrame(sock, shm::FrameType::kMapTableReply,
                            std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)) + body, fds);
    }
    case shm::FrameType::kCounterReport: {
      const size_t n = frame.payload.size() / sizeof(shm::CounterReport);
      if (frame.payload.size() % sizeof(shm::CounterReport) != 0 || n == 0 || n > shm::kMaxCounterReports) {
        return absl::InvalidArgumentError("protocol violation: CounterReport frame of the wrong size");
      }
      size_t refused_count = 0;
      std::string first_refusal;
      for (size_t i = 0; i < n; ++i) {
        shm::CounterReport r{};
        std::memcpy(&r, frame.payload.data() + i * sizeof(r), sizeof(r));
        const Table* table = r.table_id < tables.size() && (*mapped)[r.table_id] ? tables[r.table_id] : nullptr;
        std::string refused;
        if (table == nullptr) {
          refused = absl::StrCat("table id ", r.table_id, " was not mapped by this client");
        } else if (table->FindLayer(r.layer_id) == nullptr) {
          refused = absl::StrCat("table '", table->name(), "' has no layer ", r.layer_id);
        } else if (r.lookups > r.rows || r.rows > (1ull << 40)) {
          refused = absl::StrCat(r.lookups, " lookups of ", r.rows, " rows is not a possible count");
        }
        if (!refused.empty()) {
          if (refused_count++ == 0) first_refusal = refused;
          continue;
        }
        ctx.metrics->RecordMappedLookups(*table, r.lookups, r.rows);
        const Table::Layer* layer = table->FindLayer(r.layer_id);
        if (layer->hbm != nullptr && client->hbm_mapped[r.table_id]) layer->hbm->CountServed(0, r.rows);
      }
      if (refused_count > 0) {  // one line per frame, however many entries were wrong
        LogWarn("shm_counter_report_refused",
                {{"pid", who}, {"entries", absl::StrCat(refused_count)}, {"reason", first_refusal}});
      }
      return absl::OkStatus();
    }
    case shm::FrameType::kMapHbm:
      return HandleMapHbm(frame, ctx);
    case shm::FrameType::kAccessReport:
      return HandleAccessReport(frame, ctx);
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("protocol violation: unexpected frame type ", static_cast<uint32_t>(frame.type)));
  }
}

}  // namespace engram
