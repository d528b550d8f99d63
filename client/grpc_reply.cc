#include "client/grpc_reply.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <climits>

#include "absl/strings/str_cat.h"

namespace engram {

absl::Status ReadLookupReply(grpc::ByteBuffer* reply, absl::Span<uint8_t> out, v1::LookupStats* stats) {
  using google::protobuf::internal::WireFormatLite;
  const uint64_t reply_bytes = reply->Length();
  grpc::ProtoBufferReader reader(reply);
  if (!reader.status().ok()) {
    return absl::DataLossError(absl::StrCat("the Lookup reply cannot be read: ", reader.status().error_message()));
  }
  google::protobuf::io::CodedInputStream in(&reader);
  in.SetTotalBytesLimit(INT_MAX);
  auto bad = [&](const char* what) {
    return absl::DataLossError(absl::StrCat("engramd's Lookup reply (", reply_bytes,
                                            " bytes) is not a LookupResponse: ", what, " at byte ",
                                            in.CurrentPosition()));
  };
  bool rows_seen = false;
  while (const uint32_t tag = in.ReadTag()) {
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    const bool delimited = WireFormatLite::GetTagWireType(tag) == WireFormatLite::WIRETYPE_LENGTH_DELIMITED;
    if (field == v1::LookupResponse::kRowsFieldNumber && delimited) {
      uint32_t length = 0;
      if (!in.ReadVarint32(&length)) return bad("a truncated rows length");
      if (length != out.size()) {
        return absl::InternalError(absl::StrCat("engramd sent ", length, " bytes of rows, ", out.size(), " expected"));
      }
      if (!in.ReadRaw(out.data(), static_cast<int>(length))) return bad("truncated rows");
      rows_seen = true;
    } else if (field == v1::LookupResponse::kStatsFieldNumber && delimited && stats != nullptr) {
      uint32_t length = 0;
      if (!in.ReadVarint32(&length)) return bad("a truncated stats length");
      const auto limit = in.PushLimit(static_cast<int>(length));
      if (!stats->MergeFromCodedStream(&in) || !in.ConsumedEntireMessage()) return bad("malformed stats");
      in.PopLimit(limit);
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return bad("a truncated field");
    }
  }
  if (!in.ConsumedEntireMessage()) return bad("a malformed tag");
  // proto3 leaves an empty rows field out.
  if (!rows_seen && !out.empty()) {
    return absl::InternalError(absl::StrCat("engramd sent 0 bytes of rows, ", out.size(), " expected"));
  }
  return absl::OkStatus();
}

}  // namespace engram
