// The client's transports behind one small interface: shared memory (unix://) and gRPC
// (grpc://). Internal to libengram_client. Not thread-safe; Client serializes calls.
#ifndef ENGRAM_CLIENT_TRANSPORT_H_
#define ENGRAM_CLIENT_TRANSPORT_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/client.h"

namespace engram {

class MappedTable;

class Transport {
 public:
  virtual ~Transport() = default;
  // The serialized engram.v1.TableInfo of `name`; remembers whatever the transport needs for it.
  virtual absl::StatusOr<std::string> OpenTable(const std::string& name) = 0;
  virtual absl::Status Lookup(const std::string& table, int layer, uint32_t num_tokens,
                              absl::Span<const uint32_t> indices, absl::Span<uint8_t> out, ClientLookupStats* stats) = 0;
  virtual absl::Status Prefetch(const std::string& table, int layer, uint32_t num_tokens,
                                absl::Span<const uint32_t> indices) = 0;
  // True when lookups of an open table gather from a read-only mapping of its rows.
  virtual bool Mapped(const std::string& table) const { return false; }
  // The mapping of an open table, when the transport has one (shared memory); else nullptr.
  virtual MappedTable* mapped_table(const std::string& table) { return nullptr; }
};

absl::StatusOr<std::unique_ptr<Transport>> MakeShmTransport(const std::string& socket_path, const ClientOptions& options);
absl::StatusOr<std::unique_ptr<Transport>> MakeGrpcTransport(const std::string& address, const ClientOptions& options);

}  // namespace engram

#endif  // ENGRAM_CLIENT_TRANSPORT_H_
