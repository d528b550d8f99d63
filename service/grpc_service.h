// engram.v1.Engram over gRPC: decodes requests, calls the Engine, encodes replies, and records
// each request in DaemonMetrics. Stateless apart from the draining flag; gRPC calls it from
// many threads at once.
#ifndef ENGRAM_SERVICE_GRPC_SERVICE_H_
#define ENGRAM_SERVICE_GRPC_SERVICE_H_

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "engram/v1/engram.grpc.pb.h"
#include "service/daemon_metrics.h"
#include "tiering/engine.h"

namespace engram {

// Fills `info` with everything a client needs to configure itself for `table`.
void FillTableInfo(const Table& table, uint64_t max_batch_rows, v1::TableInfo* info);

// What client addresses hold at once (open streams, calls in flight): at most `total` in all and
// `per_client` from one address; beyond them RESOURCE_EXHAUSTED naming the flag. 0: no cap.
class ClientCaps {
 public:
  ClientCaps(std::string what, std::string total_flag, std::string per_client_flag)
      : what_(std::move(what)), total_flag_(std::move(total_flag)), per_client_flag_(std::move(per_client_flag)) {}
  void set_limits(int total, int per_client) {
    total_ = total;
    per_client_ = per_client;
  }
  absl::Status Admit(const std::string& client);
  void Release(const std::string& client);

 private:
  const std::string what_, total_flag_, per_client_flag_;
  int total_ = 0, per_client_ = 0;
  std::mutex mu_;
  int held_ = 0;
  std::map<std::string, int> by_client_;
};

class EngramGrpcService final : public v1::Engram::Service {
 public:
  EngramGrpcService(Engine* engine, DaemonMetrics* metrics);

  // While draining, new requests get UNAVAILABLE.
  void set_draining(bool draining) { draining_.store(draining); }
  // Open LookupStreams (each holds a server thread while open): at most `total`, and at most
  // `per_client` from one client address; beyond them RESOURCE_EXHAUSTED naming the limit. 0: none.
  void set_stream_limits(int total, int per_client) { streams_.set_limits(total, per_client); }
  // Unary Lookup, LookupTokens and Prefetch calls being served, likewise.
  void set_inflight_limits(int total, int per_client) { inflight_.set_limits(total, per_client); }

  // Lookup and LookupStream are served by LookupBytes and LookupStreamBytes (registered in the
  // constructor), whose replies are slices rather than LookupResponse messages.
  grpc::Status LookupTokens(grpc::ServerContext* context, const v1::LookupTokensRequest* request,
                            v1::LookupTokensResponse* response) override;
  grpc::Status Prefetch(grpc::ServerContext* context, const v1::PrefetchRequest* request,
                        v1::PrefetchResponse* response) override;
  grpc::Status ListTables(grpc::ServerContext* context, const v1::ListTablesRequest* request,
                          v1::ListTablesResponse* response) override;
  grpc::Status GetTable(grpc::ServerContext* context, const v1::GetTableRequest* request,
                        v1::TableInfo* response) override;

 private:
  // Lookup as gRPC serves it: the reply, a serialized LookupResponse, goes out as three slices (its
  // small fields, the rows field's tag and length, and the rows gathered into a buffer of their own
  // that gRPC frees once sent), so its megabytes are neither zero-filled nor copied by protobuf.
  grpc::Status LookupBytes(grpc::ServerContext* context,
                           grpc::ServerUnaryStreamer<v1::LookupRequest, grpc::ByteBuffer>* stream);
  // LookupStream the same way: each reply a serialized LookupResponse in slices, in request order.
  grpc::Status LookupStreamBytes(grpc::ServerContext* context,
                                 grpc::ServerReaderWriter<grpc::ByteBuffer, v1::LookupRequest>* stream);
  // Checks `request` and gathers its rows into the buffer `rows_buffer(bytes)` returns.
  absl::Status DoLookup(const v1::LookupRequest& request, const std::function<uint8_t*(uint64_t)>& rows_buffer,
                        v1::LookupStats* stats);
  absl::Status DoLookupBytes(const v1::LookupRequest& request, grpc::ByteBuffer* reply);
  // Runs `call` if the client's address is admitted to `caps`, releasing it afterwards.
  template <typename Call>
  absl::Status Admitted(ClientCaps& caps, grpc::ServerContext* context, Call call);
  ClientCaps streams_{"LookupStreams open", "--max-streams", "--max-streams-per-client"};
  ClientCaps inflight_{"calls in flight", "--max-inflight", "--max-inflight-per-client"};
  absl::Status DoLookupTokens(const v1::LookupTokensRequest& request, v1::LookupTokensResponse* response);

  Engine* engine_;
  DaemonMetrics* metrics_;
  // Each method's request series, resolved once.
  RequestMetrics* lookup_metrics_;
  RequestMetrics* stream_metrics_;
  RequestMetrics* tokens_metrics_;
  RequestMetrics* prefetch_metrics_;
  RequestMetrics* list_metrics_;
  RequestMetrics* get_metrics_;
  std::atomic<bool> draining_{false};
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_GRPC_SERVICE_H_
