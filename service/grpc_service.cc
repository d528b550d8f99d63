#include "service/grpc_service.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace engram {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// Wire bytes (little-endian uint32) to a native array. A copy, because a protobuf string need not
// be 4-byte aligned; small next to the gather.
absl::Status DecodeU32(const std::string& bytes, const char* field, std::vector<uint32_t>* out) {
  if (bytes.size() % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " holds ", bytes.size(), " bytes, not a whole number of 4-byte values"));
  }
  out->resize(bytes.size() / 4);
  if (!bytes.empty()) std::memcpy(out->data(), bytes.data(), bytes.size());  // an empty vector's data() may be null
  return absl::OkStatus();
}

class RequestTimer {
 public:
  explicit RequestTimer(RequestMetrics* metrics) : metrics_(metrics), start_(std::chrono::steady_clock::now()) {}
  grpc::Status Finish(const absl::Status& s) {
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    metrics_->Record(s.code(), seconds);
    return ToGrpc(s);
  }

 private:
  RequestMetrics* metrics_;
  std::chrono::steady_clock::time_point start_;
};

absl::Status Draining() {
  return absl::UnavailableError("engramd is shutting down; retry against the restarted daemon");
}

}  // namespace

void FillTableInfo(const Table& table, uint64_t max_batch_rows, v1::TableInfo* info) {
  const PackManifest& m = table.manifest();
  info->set_name(m.name);
  info->set_dtype(std::string(RowDtypeName(m.row.dtype)));
  info->set_dim(m.row.dim);
  info->set_row_bytes(static_cast<uint32_t>(m.row.bytes));
  info->set_heads(m.hash.heads_per_layer());
  info->set_total_bytes(m.total_bytes());
  info->set_synthetic(m.synthetic_seed.has_value());
  info->set_synthetic_seed(m.synthetic_seed.value_or(0));
  info->set_max_batch_rows(max_batch_rows);
  info->set_module(m.module);
  v1::HashConfig* hash = info->mutable_hash();
  hash->set_kind(m.hash_kind);
  hash->set_max_ngram(m.hash.max_ngram);
  hash->set_heads_per_ngram(m.hash.heads_per_ngram);
  hash->set_seed(m.hash.seed);
  for (int64_t v : m.hash.vocab_per_ngram) hash->add_vocab_per_ngram(static_cast<uint64_t>(v));
  hash->set_pad_id(m.hash.pad_id);
  hash->set_compressed_vocab(static_cast<uint64_t>(m.hash.compressed_vocab));
  if (m.hash.dead_token_id) {
    hash->set_has_dead_token_id(true);
    hash->set_dead_token_id(*m.hash.dead_token_id);
  }
  hash->set_compress_lut(std::string(reinterpret_cast<const char*>(m.hash.compress_lut.data()),
                                     m.hash.compress_lut.size() * sizeof(int32_t)));
  for (const auto& layer : table.layers()) {
    v1::LayerInfo* li = info->add_layers();
    li->set_id(layer.pack_layer->id);
    for (int64_t r : layer.pack_layer->layout.head_rows) li->add_head_rows(static_cast<uint64_t>(r));
    for (int64_t mult : layer.pack_layer->layout.multipliers) li->add_multipliers(mult);
    li->set_total_rows(layer.pack_layer->layout.total_rows);
    li->set_tier(std::string(layer.tier->description()));
  }
}

EngramGrpcService::EngramGrpcService(Engine* engine, DaemonMetrics* metrics)
    : engine_(engine),
      metrics_(metrics),
      lookup_metrics_(metrics->Requests("grpc", "Lookup")),
      stream_metrics_(metrics->Requests("grpc", "LookupStream")),
      tokens_metrics_(metrics->Requests("grpc", "LookupTokens")),
      prefetch_metrics_(metrics->Requests("grpc", "Prefetch")),
      list_metrics_(metrics->Requests("grpc", "ListTables")),
      get_metrics_(metrics->Requests("grpc", "GetTable")) {
  // Method 0 is Lookup (the order of engram.proto). Served as a "streamed unary" call: one request
  // read, one reply written, on the same sync threads, but the reply is a ByteBuffer of our slices.
  MarkMethodStreamed(0, new grpc::internal::StreamedUnaryHandler<v1::LookupRequest, grpc::ByteBuffer>(
                            [this](grpc::ServerContext* context,
                                   grpc::ServerUnaryStreamer<v1::LookupRequest, grpc::ByteBuffer>* stream) {
                              return LookupBytes(context, stream);
                            }));
  // Method 1 is LookupStream, a stream already: only its reply type changes.
  MarkMethodStreamed(1,
                     new grpc::internal::BidiStreamingHandler<EngramGrpcService, v1::LookupRequest, grpc::ByteBuffer>(
                         [](EngramGrpcService* service, grpc::ServerContext* context,
                            grpc::ServerReaderWriter<grpc::ByteBuffer, v1::LookupRequest>* stream) {
                           return service->LookupStreamBytes(context, stream);
                         },
                         this));
}

absl::Status EngramGrpcService::DoLookup(const v1::LookupRequest& request,
                                         const std::function<uint8_t*(uint64_t)>& rows_buffer, v1::LookupStats* ps) {
  if (draining_.load()) return Draining();
  const Table* table = engine_->FindTable(request.table());
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("no table named '", request.table(), "'"));
  std::vector<uint32_t> indices;
  if (absl::Status s = DecodeU32(request.indices(), "indices", &indices); !s.ok()) return s;
  const uint64_t rows = static_cast<uint64_t>(request.num_tokens()) * table->heads();
  if (rows > engine_->options().max_batch_rows) {
    return absl::ResourceExhaustedError(absl::StrCat(request.num_tokens(), " tokens x ", table->heads(),
                                                     " heads = ", rows, " rows exceeds --max-batch-rows ",
                                                     engine_->options().max_batch_rows));
  }
  // A count that does not match gets an empty buffer, and the engine's error naming both.
  const uint64_t bytes = indices.size() == rows ? rows * table->row_bytes() : 0;
  uint8_t* out = rows_buffer(bytes);
  LookupStats stats;
  absl::Status s = engine_->Lookup(*table, static_cast<int>(request.layer()), request.num_tokens(), indices,
                                   absl::MakeSpan(out, bytes), &stats);
  if (!s.ok()) return s;
  metrics_->RecordLookup(*table, stats);
  ps->set_rows_requested(stats.rows_requested);
  ps->set_rows_read(stats.rows_read);
  ps->set_hbm_rows(stats.tiers.rows[static_cast<int>(TierKind::kHbm)]);
  ps->set_dram_rows(stats.tiers.rows[static_cast<int>(TierKind::kDram)]);
  ps->set_nvme_rows(stats.tiers.rows[static_cast<int>(TierKind::kNvme)]);
  return absl::OkStatus();
}

namespace {

void FreeRows(void* p) { std::free(p); }

// Appends `value` as a protobuf varint.
void PutVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

}  // namespace

absl::Status EngramGrpcService::DoLookupBytes(const v1::LookupRequest& request, grpc::ByteBuffer* reply) {
  // Freed by gRPC once the bytes are sent (or by us, if the lookup fails first).
  std::unique_ptr<uint8_t, void (*)(void*)> rows(nullptr, FreeRows);
  uint64_t rows_bytes = 0;
  v1::LookupResponse head;  // every field but rows
  head.set_request_id(request.request_id());
  absl::Status s = DoLookup(
      request,
      [&](uint64_t bytes) {
        rows.reset(static_cast<uint8_t*>(std::malloc(std::max<uint64_t>(bytes, 1))));
        if (rows == nullptr) throw std::bad_alloc();
        rows_bytes = bytes;
        return rows.get();
      },
      head.mutable_stats());
  if (!s.ok()) return s;
  // A LookupResponse on the wire is its fields in any order: the small ones, then rows as field 2
  // (tag, length, bytes). proto3 leaves an empty bytes field out.
  std::string prefix = head.SerializeAsString();
  std::vector<grpc::Slice> slices;
  if (rows_bytes > 0) {
    prefix.push_back(static_cast<char>((v1::LookupResponse::kRowsFieldNumber << 3) | 2));
    PutVarint(rows_bytes, &prefix);
    slices.emplace_back(prefix);
    slices.emplace_back(rows.release(), rows_bytes, FreeRows);
  } else {
    slices.emplace_back(prefix);
  }
  *reply = grpc::ByteBuffer(slices.data(), slices.size());
  return absl::OkStatus();
}

grpc::Status EngramGrpcService::LookupBytes(grpc::ServerContext* context,
                                            grpc::ServerUnaryStreamer<v1::LookupRequest, grpc::ByteBuffer>* stream) {
  RequestTimer timer(lookup_metrics_);
  v1::LookupRequest request;
  if (!stream->Read(&request)) {
    // INTERNAL, as gRPC itself answers a request that does not parse on the other methods.
    return timer.Finish(absl::InternalError("the Lookup request could not be read or is not a LookupRequest"));
  }
  grpc::ByteBuffer reply;
  const absl::Status s = Admitted(inflight_, context, [&] { return DoLookupBytes(request, &reply); });
  // The reply goes out with the status, in one write.
  if (s.ok() && !stream->Write(reply, grpc::WriteOptions().set_last_message())) {
    return timer.Finish(absl::CancelledError("the client went away before the reply was sent"));
  }
  return timer.Finish(s);
}

absl::Status ClientCaps::Admit(const std::string& client) {
  std::lock_guard<std::mutex> lock(mu_);
  if (total_ > 0 && held_ >= total_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(held_, " ", what_, ", the limit (", total_flag_, " ", total_, ")"));
  }
  int& mine = by_client_[client];
  if (per_client_ > 0 && mine >= per_client_) {
    return absl::ResourceExhaustedError(absl::StrCat(client, " has ", mine, " ", what_, ", the limit per client (",
                                                     per_client_flag_, " ", per_client_, ")"));
  }
  ++mine;
  ++held_;
  return absl::OkStatus();
}

void ClientCaps::Release(const std::string& client) {
  std::lock_guard<std::mutex> lock(mu_);
  --held_;
  if (--by_client_[client] <= 0) by_client_.erase(client);
}

namespace {

// The client's address without its port: "ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1".
std::string ClientKey(const grpc::ServerContext* context) {
  std::string client = context->peer();
  if (const size_t colon = client.rfind(':'); colon != std::string::npos && colon > client.find(':')) {
    client.resize(colon);
  }
  return client;
}

}  // namespace

template <typename Call>
absl::Status EngramGrpcService::Admitted(ClientCaps& caps, grpc::ServerContext* context, Call call) {
  const std::string client = ClientKey(context);
  if (absl::Status s = caps.Admit(client); !s.ok()) return s;
  absl::Status s = call();
  caps.Release(client);
  return s;
}

grpc::Status EngramGrpcService::LookupStreamBytes(
    grpc::ServerContext* context, grpc::ServerReaderWriter<grpc::ByteBuffer, v1::LookupRequest>* stream) {
  const std::string client = ClientKey(context);
  if (absl::Status s = streams_.Admit(client); !s.ok()) return ToGrpc(s);
  struct Release {
    ClientCaps& caps;
    const std::string& client;
    ~Release() { caps.Release(client); }
  } release{streams_, client};
  v1::LookupRequest request;
  while (stream->Read(&request)) {
    RequestTimer timer(stream_metrics_);
    grpc::ByteBuffer reply;
    const absl::Status s = DoLookupBytes(request, &reply);
    timer.Finish(s);
    // A bad message ends the stream with its status: the client learns which request failed
    // from the request_id in the message.
    if (!s.ok()) {
      return ToGrpc(absl::Status(s.code(), absl::StrCat("request_id ", request.request_id(), ": ", s.message())));
    }
    if (!stream->Write(reply)) break;
  }
  return grpc::Status::OK;
}

absl::Status EngramGrpcService::DoLookupTokens(const v1::LookupTokensRequest& request,
                                               v1::LookupTokensResponse* response) {
  if (draining_.load()) return Draining();
  const Table* table = engine_->FindTable(request.table());
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("no table named '", request.table(), "'"));
  if (request.token_ids().size() % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("token_ids holds ", request.token_ids().size(), " bytes, not a whole number of int32 ids"));
  }
  std::vector<int32_t> tokens(request.token_ids().size() / 4);
  if (!tokens.empty()) std::memcpy(tokens.data(), request.token_ids().data(), request.token_ids().size());
  std::vector<int> layers(request.layers().begin(), request.layers().end());
  if (layers.empty()) layers = table->manifest().layer_ids();
  // batch x seq_len fits 64 bits (two 32-bit fields); times heads it may not, so divide instead.
  const uint64_t tokens_count = static_cast<uint64_t>(request.batch()) * request.seq_len();
  if (tokens_count > engine_->options().max_batch_rows / std::max<uint64_t>(1, table->heads())) {
    return absl::ResourceExhaustedError(absl::StrCat(request.batch(), " x ", request.seq_len(), " tokens x ",
                                                     table->heads(), " heads exceeds --max-batch-rows ",
                                                     engine_->options().max_batch_rows));
  }
  std::vector<uint32_t> indices;
  for (int layer : layers) {
    if (absl::Status s = Engine::HashTokens(*table, layer, tokens, request.batch(), request.seq_len(), &indices);
        !s.ok()) {
      return s;
    }
    std::string* out = response->add_rows();
    out->resize(indices.size() * table->row_bytes());
    LookupStats stats;
    absl::Status s = engine_->Lookup(*table, layer, static_cast<uint32_t>(tokens_count), indices,
                                     absl::MakeSpan(reinterpret_cast<uint8_t*>(out->data()), out->size()), &stats);
    if (!s.ok()) {
      response->Clear();
      return s;
    }
    response->add_layers(static_cast<uint32_t>(layer));
    metrics_->RecordLookup(*table, stats);
  }
  return absl::OkStatus();
}

grpc::Status EngramGrpcService::LookupTokens(grpc::ServerContext* context, const v1::LookupTokensRequest* request,
                                             v1::LookupTokensResponse* response) {
  RequestTimer timer(tokens_metrics_);
  return timer.Finish(Admitted(inflight_, context, [&] { return DoLookupTokens(*request, response); }));
}

grpc::Status EngramGrpcService::Prefetch(grpc::ServerContext* context, const v1::PrefetchRequest* request,
                                         v1::PrefetchResponse* response) {
  RequestTimer timer(prefetch_metrics_);
  return timer.Finish(Admitted(inflight_, context, [&]() -> absl::Status {
    if (draining_.load()) return Draining();
    const Table* table = engine_->FindTable(request->table());
    if (table == nullptr) return absl::NotFoundError(absl::StrCat("no table named '", request->table(), "'"));
    std::vector<uint32_t> indices;
    if (absl::Status s = DecodeU32(request->indices(), "indices", &indices); !s.ok()) return s;
    auto counts = engine_->Prefetch(*table, static_cast<int>(request->layer()), request->num_tokens(), indices);
    if (!counts.ok()) return counts.status();
    response->set_rows_queued(counts->queued);
    response->set_rows_skipped(counts->skipped);
    response->set_rows_dropped(counts->dropped);
    return absl::OkStatus();
  }));
}

grpc::Status EngramGrpcService::ListTables(grpc::ServerContext*, const v1::ListTablesRequest*,
                                           v1::ListTablesResponse* response) {
  RequestTimer timer(list_metrics_);
  for (const Table* table : engine_->tables()) {
    FillTableInfo(*table, engine_->options().max_batch_rows, response->add_tables());
    response->mutable_tables()->rbegin()->mutable_hash()->clear_compress_lut();  // GetTable has it
  }
  return timer.Finish(absl::OkStatus());
}

grpc::Status EngramGrpcService::GetTable(grpc::ServerContext*, const v1::GetTableRequest* request,
                                         v1::TableInfo* response) {
  RequestTimer timer(get_metrics_);
  const Table* table = engine_->FindTable(request->table());
  if (table == nullptr) {
    return timer.Finish(absl::NotFoundError(absl::StrCat("no table named '", request->table(), "'")));
  }
  FillTableInfo(*table, engine_->options().max_batch_rows, response);
  return timer.Finish(absl::OkStatus());
}

}  // namespace engram
