// ReadLookupReply: a Lookup reply read out of gRPC's buffers gives the rows and stats protobuf
// would, wherever the bytes are split into slices, and a reply that is cut short, malformed or of
// the wrong size is an error naming what was wrong.
#include "client/grpc_reply.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace engram {
namespace {

std::string Rows(size_t n) {
  std::string rows(n, '\0');
  for (size_t i = 0; i < n; ++i) rows[i] = static_cast<char>(i * 7 + 3);
  return rows;
}

v1::LookupResponse Reply(const std::string& rows) {
  v1::LookupResponse r;
  r.set_request_id(42);
  r.set_rows(rows);
  r.mutable_stats()->set_rows_requested(10);
  r.mutable_stats()->set_rows_read(9);
  r.mutable_stats()->set_dram_rows(7);
  r.mutable_stats()->set_nvme_rows(2);
  return r;
}

// `bytes` as a ByteBuffer of slices of at most `slice` bytes (gRPC hands a reply over in pieces).
grpc::ByteBuffer Buffer(const std::string& bytes, size_t slice) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += slice) {
    slices.emplace_back(bytes.data() + at, std::min(slice, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

TEST(GrpcReplyTest, RowsAndStatsAsProtobufReadsThemWhereverTheSlicesSplit) {
  const std::string rows = Rows(64 * 128 + 5);
  const std::string wire = Reply(rows).SerializeAsString();
  for (size_t slice : {size_t{1}, size_t{3}, size_t{127}, size_t{4096}, wire.size()}) {
    SCOPED_TRACE(slice);
    grpc::ByteBuffer buffer = Buffer(wire, slice);
    std::string out(rows.size(), '\xee');
    v1::LookupStats stats;
    ASSERT_TRUE(
        ReadLookupReply(&buffer, absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), out.size()), &stats).ok());
    EXPECT_EQ(out, rows);
    EXPECT_EQ(stats.rows_requested(), 10u);
    EXPECT_EQ(stats.rows_read(), 9u);
    EXPECT_EQ(stats.dram_rows(), 7u);
    EXPECT_EQ(stats.nvme_rows(), 2u);
  }
}

TEST(GrpcReplyTest, FieldsItDoesNotKnowAreSkipped) {
  const std::string rows = Rows(256);
  std::string wire = Reply(rows).SerializeAsString();
  // Field 9, a varint, and field 10, 3 bytes: what a newer engramd might add.
  wire += std::string("\x48\x96\x01\x52\x03xyz", 8);
  grpc::ByteBuffer buffer = Buffer(wire, 100);
  std::string out(rows.size(), '\0');
  ASSERT_TRUE(
      ReadLookupReply(&buffer, absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), out.size()), nullptr).ok());
  EXPECT_EQ(out, rows);
}

TEST(GrpcReplyTest, ARowsFieldOfAnotherSizeIsRefusedBeforeAnyByteIsWritten) {
  const std::string wire = Reply(Rows(200)).SerializeAsString();
  grpc::ByteBuffer buffer = Buffer(wire, 64);
  std::string out(256, '\xee');
  const absl::Status s =
      ReadLookupReply(&buffer, absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), out.size()), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("200 bytes of rows, 256 expected"), std::string::npos) << s.message();
  EXPECT_EQ(out, std::string(256, '\xee'));
}

TEST(GrpcReplyTest, AReplyWithoutRowsIsRefusedWhenRowsWereExpected) {
  v1::LookupResponse r;
  r.set_request_id(1);
  grpc::ByteBuffer buffer = Buffer(r.SerializeAsString(), 64);
  std::string out(128, '\0');
  const absl::Status s =
      ReadLookupReply(&buffer, absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), out.size()), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("0 bytes of rows, 128 expected"), std::string::npos) << s.message();
  // And none expected: an empty lookup's reply.
  grpc::ByteBuffer empty = Buffer(r.SerializeAsString(), 64);
  EXPECT_TRUE(ReadLookupReply(&empty, absl::Span<uint8_t>(), nullptr).ok());
}

TEST(GrpcReplyTest, ATruncatedOrMalformedReplyIsDataLoss) {
  const std::string rows = Rows(1000);
  const std::string wire = Reply(rows).SerializeAsString();
  std::string out(rows.size(), '\0');
  const auto span = absl::MakeSpan(reinterpret_cast<uint8_t*>(out.data()), out.size());
  // Cut inside the rows, inside the stats, and right after a tag.
  const size_t rows_at = wire.find(rows.substr(0, 16));
  for (size_t cut : {rows_at + 500, wire.size() - 3, size_t{1}, rows_at - 1}) {
    SCOPED_TRACE(cut);
    grpc::ByteBuffer buffer = Buffer(wire.substr(0, cut), 64);
    v1::LookupStats stats;
    const absl::Status s = ReadLookupReply(&buffer, span, &stats);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find("is not a LookupResponse"), std::string::npos) << s.message();
  }
  // A tag of field 0 is never valid protobuf.
  grpc::ByteBuffer bad = Buffer(std::string("\x00\x01", 2) + wire, 64);
  EXPECT_EQ(ReadLookupReply(&bad, span, nullptr).code(), absl::StatusCode::kDataLoss);
}

}  // namespace
}  // namespace engram
