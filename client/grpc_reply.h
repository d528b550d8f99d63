// A Lookup reply read straight out of gRPC's receive buffers: the rows field is copied once, from
// the slices the bytes arrived in into the caller's buffer, instead of being parsed into a
// LookupResponse string and copied again (8 MiB per 4096-token batch).
#ifndef ENGRAM_CLIENT_GRPC_REPLY_H_
#define ENGRAM_CLIENT_GRPC_REPLY_H_

#include <grpcpp/support/byte_buffer.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "engram/v1/engram.pb.h"

namespace engram {

// Parses a serialized v1::LookupResponse held in `reply`: its rows go to `out`, which must be
// exactly their size (else INTERNAL, naming both sizes, and `out` is not written), its stats to
// `stats` (may be null). A reply that is not a well-formed LookupResponse (truncated, a bad tag or
// length) is DATA_LOSS, and `out` may then hold part of the rows. Fields this version does not
// know are skipped, as protobuf would.
absl::Status ReadLookupReply(grpc::ByteBuffer* reply, absl::Span<uint8_t> out, v1::LookupStats* stats);

}  // namespace engram

#endif  // ENGRAM_CLIENT_GRPC_REPLY_H_
