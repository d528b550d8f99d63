// Shared-memory and gRPC transports for Client.
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/client_unary_call.h>
#include <grpcpp/impl/rpc_method.h>

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "client/grpc_reply.h"
#include "client/transport.h"
#include "engram/shm_client.h"
#include "engram/v1/engram.grpc.pb.h"

namespace engram {
namespace {

absl::Status FromGrpc(const grpc::Status& s) {
  return s.ok() ? absl::OkStatus() : absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

class ShmTransport final : public Transport {
 public:
  ShmTransport(std::unique_ptr<ShmConnection> connection, bool map_tables)
      : connection_(std::move(connection)), map_tables_(map_tables) {}
  absl::StatusOr<std::string> OpenTable(const std::string& name) override {
    auto table = connection_->OpenTable(name);
    if (!table.ok()) return table.status();
    // Opened again on the same connection: the same table, so the mapping stays (device work may
    // still read it: HBM pins, CUDA registrations).
    if (map_tables_ && mapped_.count(name) == 0) {
      // Not resident, not shared, or not mappable here (address space, map count): lookups go
      // through the ring instead. Only a daemon that went away is an error.
      auto mapped = connection_->MapTable(*table);
      if (mapped.ok()) {
        mapped_[name] = std::move(*mapped);
      } else if (mapped.status().code() == absl::StatusCode::kUnavailable) {
        return mapped.status();
      }
    }
    tables_[name] = *table;
    return table->table_info;
  }
  bool Mapped(const std::string& table) const override { return mapped_.count(table) > 0; }
  MappedTable* mapped_table(const std::string& table) override {
    auto it = mapped_.find(table);
    return it == mapped_.end() ? nullptr : it->second.get();
  }
  absl::Status Lookup(const std::string& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                      absl::Span<uint8_t> out, ClientLookupStats* stats) override {
    auto it = tables_.find(table);
    if (it == tables_.end()) return absl::FailedPreconditionError(absl::StrCat("table '", table, "' is not open"));
    if (auto m = mapped_.find(table); m != mapped_.end()) {
      absl::Status status = m->second->Lookup(layer, num_tokens, indices, out);
      if (stats != nullptr) *stats = {indices.size(), indices.size(), 0};
      return status;
    }
    RemoteLookupStats s;
    absl::Status status = connection_->Lookup(it->second, layer, num_tokens, indices, out, &s);
    if (status.ok() && stats != nullptr) *stats = {s.rows_read, s.dram_rows, s.nvme_rows};
    return status;
  }
  absl::Status Prefetch(const std::string& table, int layer, uint32_t num_tokens,
                        absl::Span<const uint32_t> indices) override {
    auto it = tables_.find(table);
    if (it == tables_.end()) return absl::FailedPreconditionError(absl::StrCat("table '", table, "' is not open"));
    return connection_->Prefetch(it->second, layer, num_tokens, indices);
  }

 private:
  std::unique_ptr<ShmConnection> connection_;
  bool map_tables_;
  std::map<std::string, RemoteTable> tables_;
  std::map<std::string, std::unique_ptr<MappedTable>> mapped_;  // destroyed first: they report through connection_
};

class GrpcTransport final : public Transport {
 public:
  GrpcTransport(const std::shared_ptr<grpc::Channel>& channel, int timeout_ms)
      : channel_(channel),
        stub_(v1::Engram::NewStub(channel)),
        lookup_method_("/engram.v1.Engram/Lookup", grpc::internal::RpcMethod::NORMAL_RPC, channel),
        timeout_ms_(timeout_ms) {}
  absl::StatusOr<std::string> OpenTable(const std::string& name) override {
    v1::GetTableRequest request;
    request.set_table(name);
    v1::TableInfo info;
    grpc::ClientContext context;
    SetDeadline(&context);
    if (absl::Status s = FromGrpc(stub_->GetTable(&context, request, &info)); !s.ok()) return s;
    return info.SerializeAsString();
  }
  absl::Status Lookup(const std::string& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                      absl::Span<uint8_t> out, ClientLookupStats* stats) override {
    v1::LookupRequest request;
    request.set_table(table);
    request.set_layer(static_cast<uint32_t>(layer));
    request.set_num_tokens(num_tokens);
    request.set_indices(reinterpret_cast<const char*>(indices.data()), indices.size() * 4);
    // The reply stays in gRPC's buffers: the rows are copied once from there into `out`.
    grpc::ByteBuffer reply;
    grpc::ClientContext context;
    SetDeadline(&context);
    if (absl::Status s = FromGrpc(grpc::internal::BlockingUnaryCall<v1::LookupRequest, grpc::ByteBuffer,
                                                                    grpc::protobuf::MessageLite, grpc::ByteBuffer>(
            channel_.get(), lookup_method_, &context, request, &reply));
        !s.ok()) {
      return s;
    }
    v1::LookupStats reply_stats;
    if (absl::Status s = ReadLookupReply(&reply, out, &reply_stats); !s.ok()) return s;
    if (stats != nullptr) *stats = {reply_stats.rows_read(), reply_stats.dram_rows(), reply_stats.nvme_rows()};
    return absl::OkStatus();
  }
  absl::Status Prefetch(const std::string& table, int layer, uint32_t num_tokens,
                        absl::Span<const uint32_t> indices) override {
    v1::PrefetchRequest request;
    request.set_table(table);
    request.set_layer(static_cast<uint32_t>(layer));
    request.set_num_tokens(num_tokens);
    request.set_indices(reinterpret_cast<const char*>(indices.data()), indices.size() * 4);
    v1::PrefetchResponse response;
    grpc::ClientContext context;
    SetDeadline(&context);
    return FromGrpc(stub_->Prefetch(&context, request, &response));
  }

 private:
  void SetDeadline(grpc::ClientContext* context) const {
    context->set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(CallTimeout::Effective(timeout_ms_)));
  }
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Engram::Stub> stub_;
  grpc::internal::RpcMethod lookup_method_;  // Lookup with its reply left as bytes
  int timeout_ms_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Transport>> MakeShmTransport(const std::string& socket_path,
                                                            const ClientOptions& options) {
  ShmConnectOptions shm_options;
  shm_options.data_bytes = options.shm_data_bytes;
  shm_options.timeout_ms = options.timeout_ms;
  shm_options.mapped_report_interval_ms = options.mapped_report_interval_ms;
  auto connection = ShmConnection::Connect(socket_path, shm_options);
  if (!connection.ok()) return connection.status();
  return std::unique_ptr<Transport>(new ShmTransport(std::move(*connection), options.map_tables));
}

absl::StatusOr<std::unique_ptr<Transport>> MakeGrpcTransport(const std::string& address, const ClientOptions& options) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  // Replies are megabytes: a fixed wide window rather than BDP probing (bench/RESULTS.md).
  args.SetInt(GRPC_ARG_HTTP2_BDP_PROBE, 0);
  args.SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 64 << 20);
  // gRPC's own reconnect backoff (1 s at first by default) would hold a connect attempt made just
  // before a restarted daemon listens for most of connect_timeout_ms: retry within the attempt
  // at the client's pace instead.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, std::max(1, options.reconnect_backoff_ms));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, std::max(1, options.reconnect_backoff_ms));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, std::max(1, options.reconnect_backoff_max_ms));
  auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  const int connect_ms = std::max(1, std::min(options.timeout_ms, options.connect_timeout_ms));
  if (!channel->WaitForConnected(std::chrono::system_clock::now() + std::chrono::milliseconds(connect_ms))) {
    return absl::UnavailableError(absl::StrCat("cannot connect to engramd at grpc://", address));
  }
  return std::unique_ptr<Transport>(new GrpcTransport(channel, options.timeout_ms));
}

}  // namespace engram
