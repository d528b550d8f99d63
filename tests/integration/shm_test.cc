// The shared-memory transport against the real engramd: rows equal the synthetic formula for
// batch sizes from 1 token to --max-batch-rows; descriptors written straight into the ring with
// bad offsets, lengths, table ids or ring positions get an error completion or a disconnect and
// never take the daemon down; a uid that is not allowed is refused; a client killed mid-request
// leaves the daemon serving others; a restarted daemon surfaces as UNAVAILABLE, then a new
// connection works.
#include <fcntl.h>
#include <grp.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "client/shm_testing.h"
#include "engram/shm_client.h"
#include "engram/shm_socket.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/test_util.h"
#include "tiering/layout/manifest.h"
#include "engram/kernels/hbm_probe.h"
#include "tiering/hbm/gpu_probe.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

using testing::Daemon;
using testing::RunCommand;
using testing::TempDir;

class ShmTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --dtype f16 --quiet --out " +
                         dir_->path() + "/pack").first, 0);
    manifest_ = new PackManifest(*LoadPackManifest(dir_->path() + "/pack"));
  }
  static void TearDownTestSuite() {
    delete manifest_;
    delete dir_;
  }
  void StartDaemon(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--pack", dir_->path() + "/pack", "--max-batch-rows", "16384"};
    args.insert(args.end(), extra.begin(), extra.end());
    daemon_ = std::make_unique<Daemon>(args, dir_->path());
    ASSERT_TRUE(daemon_->running()) << daemon_->log();
    ASSERT_FALSE(daemon_->socket().empty());
  }
  // engramd with the HBM tier's slots in host memory, the promoter stepping every 2 ms.
  void StartHbmDaemon() { StartDaemon({"--hbm-budget", "512K", "--hbm-store", "host", "--hbm-step-ms", "2"}); }
  // A connection that reports every 10 ms, and table "demo" mapped on it (with its HBM tier).
  void ConnectAndMap(std::unique_ptr<ShmConnection>* conn, std::unique_ptr<MappedTable>* mapped) {
    ShmConnectOptions options;
    options.mapped_report_interval_ms = 10;
    auto c = ShmConnection::Connect(daemon_->socket(), options);
    ASSERT_TRUE(c.ok()) << c.status();
    auto table = (*c)->OpenTable("demo");
    ASSERT_TRUE(table.ok()) << table.status();
    auto m = (*c)->MapTable(*table);
    ASSERT_TRUE(m.ok()) << m.status();
    *conn = std::move(*c);
    *mapped = std::move(*m);
  }
  std::unique_ptr<ShmConnection> Connect() {
    auto c = ShmConnection::Connect(daemon_->socket());
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? std::move(*c) : nullptr;
  }
  static void CheckRows(int layer_id, const std::vector<uint32_t>& idx, const std::vector<uint8_t>& out) {
    const auto& m = *manifest_;
    const auto& layout = m.FindLayer(layer_id)->layout;
    const int heads = m.hash.heads_per_layer();
    std::vector<float> scratch(m.row.dim);
    std::vector<uint8_t> want(m.row.bytes);
    for (size_t i = 0; i < idx.size(); ++i) {
      SyntheticRow(*m.synthetic_seed, layer_id, layout.head_offset[i % heads] + idx[i], m.row.dim, m.row.dtype,
                   scratch.data(), want.data());
      ASSERT_EQ(0, std::memcmp(out.data() + i * m.row.bytes, want.data(), m.row.bytes)) << "position " << i;
    }
  }
  static std::vector<uint32_t> RandomIndices(int layer_id, uint32_t tokens, uint32_t seed) {
    const auto& layout = manifest_->FindLayer(layer_id)->layout;
    const int heads = manifest_->hash.heads_per_layer();
    std::mt19937 rng(seed);
    std::vector<uint32_t> idx(tokens * heads);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = rng() % layout.head_rows[i % heads];
    return idx;
  }

  static TempDir* dir_;
  static PackManifest* manifest_;
  std::unique_ptr<Daemon> daemon_;
};

// A session driven by hand: the handshake only (the arena fds are closed). Returns the socket.
int RawSession(const std::string& path, uint32_t version, int32_t* status, std::string* message) {
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof(addr.sun_path) - 1);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  shm::Hello hello{shm::kMagic, version, 8, 0, 1 << 20};
  EXPECT_TRUE(shm::SendFrame(fd, shm::FrameType::kHello, std::string(reinterpret_cast<char*>(&hello), sizeof(hello)), {}).ok());
  auto reply = shm::ReceiveFrame(fd, 5000);
  EXPECT_TRUE(reply.ok());
  if (reply.ok()) {
    for (int f : reply->fds) close(f);
    shm::HelloReply r{};
    std::memcpy(&r, reply->payload.data(), sizeof(r));
    *status = r.status;
    *message = reply->payload.substr(sizeof(r));
  }
  return fd;
}

TempDir* ShmTest::dir_ = nullptr;
PackManifest* ShmTest::manifest_ = nullptr;

TEST_F(ShmTest, RoundTripsFromOneTokenToTheBatchLimit) {
  StartDaemon();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok()) << table.status();
  EXPECT_EQ(table->heads, 16u);
  EXPECT_EQ(table->row_bytes, 128u);
  EXPECT_EQ(c->OpenTable("nope").status().code(), absl::StatusCode::kNotFound);
  for (uint32_t tokens : {1u, 7u, 256u, 1024u}) {  // 1024 tokens x 16 heads = the 16384-row limit
    for (int layer : {1, 15}) {
      const auto idx = RandomIndices(layer, tokens, tokens + layer);
      std::vector<uint8_t> out(idx.size() * 128);
      RemoteLookupStats stats;
      ASSERT_TRUE(c->Lookup(*table, layer, tokens, idx, absl::MakeSpan(out), &stats).ok()) << tokens;
      CheckRows(layer, idx, out);
      EXPECT_EQ(stats.dram_rows, stats.rows_read);
    }
  }
  // In place: the same bytes, read where the daemon gathered them.
  const auto in_place_idx = RandomIndices(15, 33, 77);
  auto in_place = c->LookupInPlace(*table, 15, 33, in_place_idx);
  ASSERT_TRUE(in_place.ok()) << in_place.status();
  CheckRows(15, in_place_idx, std::vector<uint8_t>(in_place->begin(), in_place->end()));
  // Above the limit: RESOURCE_EXHAUSTED, and the connection goes on working.
  const auto big = RandomIndices(1, 1025, 1);
  std::vector<uint8_t> out(big.size() * 128);
  EXPECT_EQ(c->Lookup(*table, 1, 1025, big, absl::MakeSpan(out)).code(), absl::StatusCode::kResourceExhausted);
  const auto idx = RandomIndices(1, 3, 9);
  std::vector<uint8_t> small(idx.size() * 128);
  ASSERT_TRUE(c->Lookup(*table, 1, 3, idx, absl::MakeSpan(small)).ok());
  CheckRows(1, idx, small);
  // Bad index: the status names it, as over gRPC.
  auto bad = idx;
  bad[5] = 4000000000u;
  const absl::Status s = c->Lookup(*table, 1, 3, bad, absl::MakeSpan(small));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("index 4000000000 for token 0, head 5"), absl::string_view::npos) << s;
}

TEST_F(ShmTest, ManyConcurrentClients) {
  StartDaemon();
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      auto c = ShmConnection::Connect(daemon_->socket());
      if (!c.ok()) {
        ++failures;
        return;
      }
      auto table = (*c)->OpenTable("demo");
      for (int i = 0; i < 30 && table.ok(); ++i) {
        const int layer = (i + t) % 2 ? 1 : 15;
        const auto idx = RandomIndices(layer, 1 + (i * 37 + t) % 200, t * 100 + i);
        std::vector<uint8_t> out(idx.size() * 128);
        if (!(*c)->Lookup(*table, layer, static_cast<uint32_t>(idx.size() / 16), idx, absl::MakeSpan(out)).ok()) {
          ++failures;
          continue;
        }
        CheckRows(layer, idx, out);
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_F(ShmTest, HostileDescriptorsGetErrorsAndTheDaemonKeepsServing) {
  StartDaemon();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  const uint64_t data = ShmConnectionTestPeer::data_bytes(*c);
  auto expect_error = [&](shm::RequestDescriptor d, absl::StatusCode code, const std::string& needle) {
    d.request_id = 99;
    ASSERT_TRUE(ShmConnectionTestPeer::Post(*c, d).ok());
    auto done = ShmConnectionTestPeer::WaitCompletion(*c);
    ASSERT_TRUE(done.ok()) << done.status();
    EXPECT_EQ(done->status, static_cast<int32_t>(code)) << done->message;
    EXPECT_NE(std::string(done->message).find(needle), std::string::npos) << done->message;
  };
  const uint32_t lookup = static_cast<uint32_t>(shm::Op::kLookup);
  expect_error({0, lookup, 77, 1, 1, 0, 64, 64, 2048}, absl::StatusCode::kNotFound, "table id 77");
  expect_error({0, lookup, table->id, 1, 1, data - 8, 64, 0, 2048}, absl::StatusCode::kInvalidArgument, "inside the data region");
  expect_error({0, lookup, table->id, 1, 1, ~0ull - 10, 64, 0, 2048}, absl::StatusCode::kInvalidArgument, "inside the data region");
  expect_error({0, lookup, table->id, 1, 1, 0, 64, data - 100, 2048}, absl::StatusCode::kInvalidArgument, "output");
  expect_error({0, lookup, table->id, 1, 1, 0, 64, 64, 4096}, absl::StatusCode::kInvalidArgument, "output buffer holds 4096");
  expect_error({0, lookup, table->id, 1, 2, 0, 64, 64, 2048}, absl::StatusCode::kInvalidArgument, "indices hold 64 bytes");
  expect_error({0, lookup, table->id, 3, 1, 0, 64, 64, 2048}, absl::StatusCode::kNotFound, "no layer 3");
  expect_error({0, 42, table->id, 1, 1, 0, 64, 64, 2048}, absl::StatusCode::kInvalidArgument, "unknown op 42");
  std::memset(ShmConnectionTestPeer::data(*c), 0xff, 64);  // indices all 0xffffffff
  expect_error({0, lookup, table->id, 1, 1, 0, 64, 64, 2048}, absl::StatusCode::kInvalidArgument, "out of range");
  // A valid request after all that: the right rows.
  const auto idx = RandomIndices(15, 4, 3);
  std::vector<uint8_t> out(idx.size() * 128);
  ASSERT_TRUE(c->Lookup(*table, 15, 4, idx, absl::MakeSpan(out)).ok());
  CheckRows(15, idx, out);
  // An impossible ring position: the daemon drops this client, and only this client.
  auto other = Connect();
  ShmConnectionTestPeer::header(*c)->request_tail.store(123456789);
  // The daemon may be asleep on its eventfd (it re-checks at least once a second): wait, bounded.
  EXPECT_TRUE(daemon_->WaitForLog("protocol violation")) << daemon_->log();
  EXPECT_EQ(c->Lookup(*table, 15, 4, idx, absl::MakeSpan(out)).code(), absl::StatusCode::kUnavailable);
  auto other_table = other->OpenTable("demo");
  ASSERT_TRUE(other_table.ok());
  ASSERT_TRUE(other->Lookup(*other_table, 15, 4, idx, absl::MakeSpan(out)).ok());
  CheckRows(15, idx, out);
  EXPECT_TRUE(daemon_->running());
}

using testing::MetricValue;

TEST_F(ShmTest, AResidentTableIsMappedReadOnlyAndItsLookupsAreCounted) {
  StartDaemon();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  auto mapped = c->MapTable(*table);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_TRUE(daemon_->WaitForLog("event=shm_table_mapped")) << daemon_->log();
  uint64_t lookups = 0, rows = 0;
  for (int layer : {1, 15}) {
    for (uint32_t tokens : {1u, 7u, 1024u}) {  // 1024 x 16 heads = the daemon's --max-batch-rows
      const auto idx = RandomIndices(layer, tokens, tokens + layer);
      std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
      ASSERT_TRUE((*mapped)->Lookup(layer, tokens, idx, absl::MakeSpan(out)).ok());
      CheckRows(layer, idx, out);
      ++lookups;
      rows += idx.size();
    }
  }
  // The same checks as the daemon's, before any byte is written: its row limit too.
  {
    const auto big = RandomIndices(1, 1025, 3);
    std::vector<uint8_t> out(big.size() * manifest_->row.bytes);
    const absl::Status over = (*mapped)->Lookup(1, 1025, big, absl::MakeSpan(out));
    EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted) << over;
    EXPECT_NE(over.message().find("exceeds the limit of 16384 rows per request"), std::string::npos) << over;
  }
  auto idx = RandomIndices(1, 4, 9);
  idx[manifest_->hash.heads_per_layer() + 5] = 0xffffffffu;  // token 1, head 5
  std::vector<uint8_t> out(idx.size() * manifest_->row.bytes, 0xab);
  absl::Status bad = (*mapped)->Lookup(1, 4, idx, absl::MakeSpan(out));
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("index 4294967295 for token 1, head 5 is out of range"), std::string::npos) << bad;
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](uint8_t b) { return b == 0xab; })) << "rows written on error";
  EXPECT_EQ((*mapped)->Lookup(1, 5, idx, absl::MakeSpan(out)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*mapped)->Lookup(1, 4, RandomIndices(1, 4, 9), absl::MakeSpan(out).subspan(1)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*mapped)->Lookup(3, 4, RandomIndices(1, 4, 9), absl::MakeSpan(out)).code(), absl::StatusCode::kNotFound);
  // Mapped read-only and shared: the kernel says so.
  const std::string maps = testing::ReadFile("/proc/self/maps");
  size_t mappings = 0;
  for (size_t at = maps.find("engram-rows:"); at != std::string::npos; at = maps.find("engram-rows:", at + 1)) {
    const size_t line = maps.rfind('\n', at) + 1;
    EXPECT_EQ(maps.substr(maps.find(' ', line) + 1, 4), "r--s") << maps.substr(line, at - line);
    ++mappings;
  }
  EXPECT_EQ(mappings, 2u) << maps;
  // Closing the table reports what it served; the daemon's metrics count it.
  mapped->reset();
  const std::string labels = "{table=\"demo\"}";
  // The final report reaches the daemon's counters a moment later (a series may exist before it,
  // from an earlier periodic report): wait, bounded, for the full count.
  for (int i = 0; i < 100 && MetricValue(daemon_->metrics_port(), "engram_mapped_rows_total" + labels) !=
                                 static_cast<double>(rows);
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_mapped_rows_total" + labels), static_cast<double>(rows));
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_mapped_lookups_total" + labels), static_cast<double>(lookups));
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_lookup_rows_total" + labels), static_cast<double>(rows));
  // Unmapped, the client's memory no longer holds the rows.
  EXPECT_EQ(testing::ReadFile("/proc/self/maps").find("engram-rows:"), std::string::npos);
}

// A mapped table may outlive its connection: lookups go on from the mapping, reports say the
// connection is gone, and destroying it afterwards is safe (checked under ASan in tests/run.sh).
TEST_F(ShmTest, AMappedTableOutlivesItsConnection) {
  StartDaemon();
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  auto mapped = c->MapTable(*table);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  c.reset();
  const auto idx = RandomIndices(1, 5, 4);
  std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
  ASSERT_TRUE((*mapped)->Lookup(1, 5, idx, absl::MakeSpan(out)).ok());
  CheckRows(1, idx, out);
  EXPECT_EQ((*mapped)->ReportCounters().code(), absl::StatusCode::kUnavailable);
  mapped->reset();
}

TEST_F(ShmTest, OnlySharedResidentTablesCanBeMapped) {
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--share-tables=false"}, std::vector<std::string>{"--dram-budget", "1M"}}) {
    StartDaemon(flags);
    auto c = Connect();
    ASSERT_NE(c, nullptr);
    auto table = c->OpenTable("demo");
    ASSERT_TRUE(table.ok());
    auto mapped = c->MapTable(*table);
    EXPECT_EQ(mapped.status().code(), absl::StatusCode::kFailedPrecondition) << flags[0];
    EXPECT_NE(mapped.status().message().find("only tables resident in DRAM with --share-tables"), std::string::npos)
        << mapped.status();
    // The connection still serves lookups through the ring.
    const auto idx = RandomIndices(15, 5, 1);
    std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
    ASSERT_TRUE(c->Lookup(*table, 15, 5, idx, absl::MakeSpan(out)).ok());
    CheckRows(15, idx, out);
    c.reset();
    daemon_.reset();
  }
}

// Control frames a client has no business sending, or sends wrong: refused, and only that client
// is dropped.
TEST_F(ShmTest, HostileControlFramesAreRefused) {
  StartDaemon();
  int32_t last_status = -1;
  std::string last_message;
  auto raw_session = [&](uint32_t version = shm::kVersion) {
    return RawSession(daemon_->socket(), version, &last_status, &last_message);
  };
  // Version 1 clients (no mapped tables) are still served; a version from the future is told
  // which ones this daemon speaks.
  close(raw_session(1));
  EXPECT_EQ(last_status, 0);
  close(raw_session(shm::kVersion + 1));
  EXPECT_EQ(last_status, static_cast<int32_t>(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(last_message.find(absl::StrCat("this engramd speaks ", shm::kMinVersion, " to ", shm::kVersion)),
            std::string::npos)
      << last_message;
  // Counts for a table this client never mapped, then impossible counts: ignored, logged.
  const int fd = raw_session();
  shm::CounterReport report{0, 1, 10, 160};
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kCounterReport,
                             std::string(reinterpret_cast<char*>(&report), sizeof(report)), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("was not mapped by this client")) << daemon_->log();
  const shm::MapTableRequest request{0};
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kMapTable, std::string(reinterpret_cast<const char*>(&request), sizeof(request)), {}).ok());
  auto map_reply = shm::ReceiveFrame(fd, 5000);
  ASSERT_TRUE(map_reply.ok()) << map_reply.status();
  EXPECT_EQ(map_reply->fds.size(), 2u);
  for (int f : map_reply->fds) close(f);
  report = {0, 1, 1000, 10};  // fewer rows than lookups
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kCounterReport,
                             std::string(reinterpret_cast<char*>(&report), sizeof(report)), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("is not a possible count")) << daemon_->log();
  report = {0, 99, 1, 16};  // no such layer
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kCounterReport,
                             std::string(reinterpret_cast<char*>(&report), sizeof(report)), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("has no layer 99")) << daemon_->log();
  // Nothing of the refused reports was counted (the series exists from the start, at zero).
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_mapped_rows_total{table=\"demo\"}"), 0);
  // A torn report and an unknown frame type: the client is dropped.
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kCounterReport, "short", {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("CounterReport frame of the wrong size")) << daemon_->log();
  close(fd);
  const int fd2 = raw_session();
  ASSERT_TRUE(shm::SendFrame(fd2, static_cast<shm::FrameType>(99), "", {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("unexpected frame type 99")) << daemon_->log();
  close(fd2);
  // Everyone else is served.
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  const auto idx = RandomIndices(1, 3, 2);
  std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
  ASSERT_TRUE(c->Lookup(*table, 1, 3, idx, absl::MakeSpan(out)).ok());
  CheckRows(1, idx, out);
}

TEST_F(ShmTest, ASecondDaemonDoesNotTakeALiveSocket) {
  StartDaemon();
  testing::TempDir other;
  const auto [code, out] = RunCommand(std::string(ENGRAMD_PATH) + " --pack " + dir_->path() +
                                      "/pack --listen 127.0.0.1:0 --metrics-listen off --socket " + daemon_->socket());
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("another engramd is serving"), std::string::npos) << out;
  auto c = Connect();  // the first daemon still answers on it
  ASSERT_NE(c, nullptr);
  EXPECT_TRUE(c->OpenTable("demo").ok());
}

TEST_F(ShmTest, AUidThatIsNotAllowedIsRefused) {
  StartDaemon({"--allow-uid", std::to_string(getuid() + 4242)});
  auto c = ShmConnection::Connect(daemon_->socket());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(c.status().message().find("may not use this engramd"), absl::string_view::npos) << c.status();
}

TEST_F(ShmTest, UsersAndGroupsCanBeNamed) {
  // "root" (uid 0) names a user that exists everywhere; a name that does not exist is a flag error.
  const auto [code, out] = RunCommand(std::string(ENGRAMD_PATH) + " --pack " + dir_->path() +
                                      "/pack --metrics-listen off --allow-uid no-such-user-here");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--allow-uid: no user 'no-such-user-here'"), std::string::npos) << out;
  StartDaemon({"--allow-uid", getuid() == 0 ? "root" : std::to_string(getuid())});
  auto c = ShmConnection::Connect(daemon_->socket());
  EXPECT_TRUE(c.ok()) << c.status();
}

// --allow-gid admits a peer whose primary or supplementary groups include it (SO_PEERGROUPS),
// and only those. Needs root, to give the peers other credentials.
TEST_F(ShmTest, AllowGidMatchesSupplementaryGroups) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to start peers with other uids and groups";
  StartDaemon({"--allow-gid", "4242"});
  ASSERT_EQ(chmod(daemon_->socket().c_str(), 0666), 0);       // anyone may connect; the daemon decides
  ASSERT_EQ(chmod(dir_->path().c_str(), 0755), 0);
  // A peer as uid/gid 65534 with the given supplementary groups: 0 admitted, 1 refused, 2 other.
  auto peer = [&](std::vector<gid_t> groups) {
    const pid_t pid = fork();
    if (pid == 0) {
      if (setgroups(groups.size(), groups.data()) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(3);
      auto c = ShmConnection::Connect(daemon_->socket());
      if (c.ok()) _exit(0);
      _exit(c.status().code() == absl::StatusCode::kPermissionDenied ? 1 : 2);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  EXPECT_EQ(peer({4242}), 0) << daemon_->log();        // a supplementary group
  EXPECT_EQ(peer({17, 4242, 99}), 0) << daemon_->log();
  EXPECT_EQ(peer({}), 1) << daemon_->log();            // neither primary nor supplementary
  EXPECT_EQ(peer({4243}), 1) << daemon_->log();
  EXPECT_NE(daemon_->log().find("event=shm_refused"), std::string::npos);
}

TEST_F(ShmTest, AClientKilledMidRequestLeavesTheDaemonServing) {
  StartDaemon();
  const pid_t child = fork();
  if (child == 0) {
    auto c = ShmConnection::Connect(daemon_->socket());
    if (!c.ok()) _exit(2);
    auto table = (*c)->OpenTable("demo");
    if (!table.ok()) _exit(3);
    const auto idx = RandomIndices(1, 1024, 5);
    std::memcpy(ShmConnectionTestPeer::data(**c), idx.data(), idx.size() * 4);
    (void)ShmConnectionTestPeer::Post(**c, {1, static_cast<uint32_t>(shm::Op::kLookup), table->id, 1, 1024, 0, idx.size() * 4, 65536,
                      idx.size() * 128});
    _exit(0);  // gone while its request is being served
  }
  int status = 0;
  waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_TRUE(daemon_->WaitForLog("event=shm_client_gone")) << daemon_->log();
  auto c = Connect();
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  const auto idx = RandomIndices(1, 10, 6);
  std::vector<uint8_t> out(idx.size() * 128);
  ASSERT_TRUE(c->Lookup(*table, 1, 10, idx, absl::MakeSpan(out)).ok());
  CheckRows(1, idx, out);
}

TEST_F(ShmTest, DaemonRestartGivesUnavailableThenANewConnectionWorks) {
  StartDaemon();
  auto c = Connect();
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  const auto idx = RandomIndices(1, 10, 6);
  std::vector<uint8_t> out(idx.size() * 128);
  ASSERT_TRUE(c->Lookup(*table, 1, 10, idx, absl::MakeSpan(out)).ok());
  ASSERT_EQ(daemon_->Stop(), 0);
  EXPECT_EQ(c->Lookup(*table, 1, 10, idx, absl::MakeSpan(out)).code(), absl::StatusCode::kUnavailable);
  StartDaemon();
  auto again = Connect();
  auto table2 = again->OpenTable("demo");
  ASSERT_TRUE(table2.ok());
  ASSERT_TRUE(again->Lookup(*table2, 1, 10, idx, absl::MakeSpan(out)).ok());
  CheckRows(1, idx, out);
}

}  // namespace
}  // namespace engram

namespace engram {
namespace {

// Indices drawn from a small hot set per head (`base` .. `base` + 63): what a Zipf head looks like
// to the promoter, and small enough for the HBM budget below.
std::vector<uint32_t> HotIndices(const PackManifest& m, int layer_id, uint32_t tokens, uint32_t base, uint32_t seed) {
  const auto& layout = m.FindLayer(layer_id)->layout;
  const int heads = m.hash.heads_per_layer();
  std::mt19937 rng(seed);
  std::vector<uint32_t> idx(tokens * heads);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = (base + rng() % 64) % layout.head_rows[i % heads];
  return idx;
}

// The HBM tier with its slots in host memory (--hbm-store host): the whole protocol a GPU client
// uses (mapping the published index, pins, gathering from slots while the promoter churns) runs
// here, and every row that comes back is checked against the formula.
TEST_F(ShmTest, HbmTierOnHostServesHitsThatAreExactWhileItChurns) {
  StartHbmDaemon();
  EXPECT_TRUE(daemon_->WaitForLog("event=tier_hbm_on")) << daemon_->log();
  std::unique_ptr<ShmConnection> c;
  std::unique_ptr<MappedTable> mapped;
  ConnectAndMap(&c, &mapped);
  if (HasFatalFailure()) return;
  ASSERT_EQ(mapped->hbm_access(), MappedTable::HbmAccess::kHost) << daemon_->log();
  EXPECT_TRUE(daemon_->WaitForLog("event=shm_hbm_mapped")) << daemon_->log();
  // Two phases with different hot sets (the second displaces the first), each until HBM served a
  // good share of its rows; bounded either way.
  uint64_t served_rows = 0;
  for (uint32_t phase = 0; phase < 2; ++phase) {
    const uint64_t hbm_before = mapped->hbm_rows_served(1);
    uint64_t rows_phase = 0;
    for (int i = 0; i < 3000; ++i) {
      const auto idx = HotIndices(*manifest_, 1, 64, 1000 + phase * 5000, i + phase * 7919);
      std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
      ASSERT_TRUE(mapped->Lookup(1, 64, idx, absl::MakeSpan(out)).ok());
      CheckRows(1, idx, out);
      rows_phase += idx.size();
      if (i >= 100 && mapped->hbm_rows_served(1) - hbm_before > rows_phase / 2) break;
      if (i % 50 == 49) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // let the promoter step
    }
    served_rows += rows_phase;
    EXPECT_GT(mapped->hbm_rows_served(1) - hbm_before, 0u) << "phase " << phase << "\n" << daemon_->log();
  }
  // Layer 15 saw no traffic: nothing of it came from HBM.
  EXPECT_EQ(mapped->hbm_rows_served(15), 0u);
  const uint64_t from_hbm = mapped->hbm_rows_served(1);
  mapped.reset();  // reports what is left
  const int port = daemon_->metrics_port();
  const std::string hbm_series = "engram_rows_served_total{table=\"demo\",tier=\"hbm\"}";
  for (int i = 0; i < 100 && MetricValue(port, hbm_series) < static_cast<double>(from_hbm); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(MetricValue(port, hbm_series), static_cast<double>(from_hbm));
  // The observed HBM hit ratio is what this client saw: rows from the slots over rows gathered.
  EXPECT_NEAR(MetricValue(port, "engram_hbm_hit_ratio{table=\"demo\",layer=\"1\"}"),
              static_cast<double>(from_hbm) / static_cast<double>(served_rows), 1e-6);
  EXPECT_EQ(MetricValue(port, "engram_lookup_rows_total{table=\"demo\"}"), static_cast<double>(served_rows));
  EXPECT_EQ(MetricValue(port, "engram_tier_enabled{tier=\"hbm\"}"), 1);
  EXPECT_GT(MetricValue(port, "engram_hbm_resident_rows{table=\"demo\",layer=\"1\"}"), 0);
  EXPECT_GT(MetricValue(port, "engram_hbm_demotions_total{table=\"demo\",layer=\"1\"}"), 0) << "phase 2 displaced phase 1";
  EXPECT_GT(MetricValue(port, "engram_table_resident_bytes{table=\"demo\",tier=\"hbm\"}"), 0);
  // With the tier on, the exposition (its HBM families included) still passes promtool's lint.
  const auto [code, body] = testing::HttpGet(port, "/metrics");
  ASSERT_EQ(code, 200);
  EXPECT_NE(body.find("engram_hbm_hit_ratio{"), std::string::npos);
  // Every HBM series the Grafana dashboard plots is exported by a daemon with the tier on (but
  // the prediction, which waits for enough counts to fit a Zipf exponent).
  const std::string dashboard = testing::ReadFile(std::string(ENGRAM_SOURCE_DIR) + "/deploy/grafana/engramd-dashboard.json");
  int hbm_plotted = 0;
  for (size_t at = dashboard.find("engram_hbm_"); at != std::string::npos; at = dashboard.find("engram_hbm_", at + 1)) {
    size_t end = at;
    while (end < dashboard.size() && (std::islower(dashboard[end]) || dashboard[end] == '_')) ++end;
    const std::string name = dashboard.substr(at, end - at);
    if (name == "engram_hbm_predicted_hit_ratio" || name == "engram_hbm_zipf_alpha") continue;
    ++hbm_plotted;
    EXPECT_NE(body.find("# TYPE " + name + " "), std::string::npos) << "the dashboard plots " << name;
  }
  EXPECT_GE(hbm_plotted, 4);
  const std::string file = dir_->path() + "/hbm_metrics.txt";
  std::ofstream(file) << body;
  const auto [lint_code, lint_out] = RunCommand("promtool check metrics < " + file);
  EXPECT_EQ(lint_code, 0) << lint_out;
}

// A reader that keeps gathering from the HBM slots (host store) while the promoter churns its hot
// set, the daemon shuts down under it, and a new daemon takes the socket: every row it gets is
// the formula's (a slot is never rewritten while a pin may cover it; a detached index is not read).
TEST_F(ShmTest, HbmReadersSeeNoTornRowThroughChurnShutdownAndRestart) {
  StartHbmDaemon();
  std::unique_ptr<ShmConnection> c;
  std::unique_ptr<MappedTable> mapped;
  ConnectAndMap(&c, &mapped);
  if (HasFatalFailure()) return;
  ASSERT_EQ(mapped->hbm_access(), MappedTable::HbmAccess::kHost) << daemon_->log();
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> wrong{0}, lookups{0}, failed{0};
  std::vector<std::thread> readers;
  for (int r = 0; r < 2; ++r) {
    readers.emplace_back([&, r] {
      const auto& m = *manifest_;
      const auto& layout = m.FindLayer(1)->layout;
      const int heads = m.hash.heads_per_layer();
      std::vector<float> scratch(m.row.dim);
      std::vector<uint8_t> want(m.row.bytes);
      for (int i = 0; i < 200000 && !stop.load(); ++i) {  // bounded
        // The hot set moves every 300 lookups, so the promoter keeps demoting and promoting.
        const auto idx = HotIndices(m, 1, 32, 100 + (i / 300 % 5) * 200, static_cast<uint32_t>(r * 104729 + i));
        std::vector<uint8_t> out(idx.size() * m.row.bytes);
        const absl::Status s = mapped->Lookup(1, 32, idx, absl::MakeSpan(out));
        // UNAVAILABLE once the daemon is gone: a report failed, the rows are still there to check.
        if (!s.ok() && s.code() != absl::StatusCode::kUnavailable) {
          ++failed;
          continue;
        }
        ++lookups;
        for (size_t k = 0; k < idx.size(); ++k) {
          SyntheticRow(*m.synthetic_seed, 1, layout.head_offset[k % heads] + idx[k], m.row.dim, m.row.dtype,
                       scratch.data(), want.data());
          if (std::memcmp(out.data() + k * m.row.bytes, want.data(), m.row.bytes) != 0) ++wrong;
        }
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // churn
  const uint64_t hbm_rows_before_stop = mapped->hbm_rows_served(1);
  EXPECT_EQ(daemon_->Stop(), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // no daemon at all
  StartHbmDaemon();                                             // a new one on the same socket
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  stop = true;
  for (auto& t : readers) t.join();
  EXPECT_EQ(wrong.load(), 0u) << "of " << lookups.load() << " lookups";
  EXPECT_EQ(failed.load(), 0u);
  EXPECT_GT(hbm_rows_before_stop, 0u) << "the readers never hit the HBM tier: nothing was tested";
  EXPECT_GT(lookups.load(), 100u);
}

// The daemon ends a session (here: the client broke the ring protocol) while that client may still
// be gathering from HBM slots under its pins: the pins stay watched until the client hangs up.
TEST_F(ShmTest, ADroppedClientsHbmPinsStayWatchedUntilItHangsUp) {
  StartHbmDaemon();
  std::unique_ptr<ShmConnection> c;
  std::unique_ptr<MappedTable> mapped;
  ConnectAndMap(&c, &mapped);
  if (HasFatalFailure()) return;
  ASSERT_EQ(mapped->hbm_access(), MappedTable::HbmAccess::kHost) << daemon_->log();
  const int port = daemon_->metrics_port();
  const std::string readers = "engram_hbm_readers{table=\"demo\",layer=\"1\"}";
  EXPECT_EQ(MetricValue(port, readers), shm::kPinsPerHbmLayer);
  ShmConnectionTestPeer::header(*c)->request_tail.store(123456789);  // a protocol violation: the daemon ends the session
  ASSERT_TRUE(daemon_->WaitForLog("protocol violation")) << daemon_->log();
  // Still reading, and still protected: rows exact, pins still watched.
  for (int i = 0; i < 400; ++i) {
    const auto idx = HotIndices(*manifest_, 1, 32, 100 + (i / 100 % 4) * 200, static_cast<uint32_t>(i));
    std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
    const absl::Status s = mapped->Lookup(1, 32, idx, absl::MakeSpan(out));
    ASSERT_TRUE(s.ok() || s.code() == absl::StatusCode::kUnavailable) << s;
    CheckRows(1, idx, out);
  }
  EXPECT_EQ(MetricValue(port, readers), shm::kPinsPerHbmLayer) << daemon_->log();
  mapped.reset();
  c.reset();  // the client hangs up: now its pins are let go
  double left = -1;
  for (int i = 0; i < 100; ++i) {
    left = MetricValue(port, readers);
    if (left == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(left, 0);
  EXPECT_TRUE(daemon_->running());
}

// The device path's host half (MappedTable::SplitForDevice, which the CUDA gather uses): with the
// host store, the device copy is replayed here through the same source rule the kernel uses, and
// must give the formula's rows. A row the request names more than once is staged once (what
// crosses PCIe is the distinct rows the tier lacks). Pins are a bounded resource: while all are
// held, SplitForDevice says so and Lookup still answers, from the DRAM mapping.
TEST_F(ShmTest, HbmDeviceSplitNamesTheRightSourceForEveryRow) {
  StartHbmDaemon();
  std::unique_ptr<ShmConnection> c;
  std::unique_ptr<MappedTable> mapped;
  ConnectAndMap(&c, &mapped);
  if (HasFatalFailure()) return;
  MappedTable& m = *mapped;
  const uint64_t row_bytes = manifest_->row.bytes;
  const uint8_t* slots = m.hbm_host_slots(15);
  ASSERT_NE(slots, nullptr);
  ASSERT_NE(m.hbm_layer(15), nullptr);
  EXPECT_EQ(m.hbm_layer(15)->kind, static_cast<uint32_t>(shm::HbmKind::kHost));
  const int heads = manifest_->hash.heads_per_layer();
  uint64_t from_slots = 0, repeated = 0;
  for (int i = 0; i < 2000 && from_slots < 5000; ++i) {
    const auto idx = HotIndices(*manifest_, 15, 32, 700, i);
    std::vector<uint32_t> sources(idx.size());
    std::vector<uint8_t> staged(idx.size() * row_bytes), out(idx.size() * row_bytes);
    auto pin = m.SplitForDevice(15, 32, idx, sources.data(), staged.data());
    ASSERT_TRUE(pin.ok()) << pin.status();
    std::set<std::pair<int, uint32_t>> missing;  // (head, head-local row): the distinct rows staged
    uint64_t staged_sources = 0;
    for (size_t r = 0; r < idx.size(); ++r) {
      std::memcpy(out.data() + r * row_bytes,
                  kernels::HbmRowSource(sources[r], slots, staged.data(), static_cast<int64_t>(row_bytes)), row_bytes);
      const bool from_staging = (sources[r] & kernels::kHbmFromStaging) != 0;
      from_slots += from_staging ? 0 : 1;
      if (from_staging) {
        ++staged_sources;
        missing.insert({static_cast<int>(r % heads), idx[r]});
        EXPECT_LT(sources[r] & ~kernels::kHbmFromStaging, pin->staged_rows) << "row " << r;
      }
    }
    m.ReleaseDevicePin(*pin);  // the "kernel" is done
    CheckRows(15, idx, out);
    EXPECT_EQ(pin->staged_rows, missing.size());
    EXPECT_EQ(pin->repeated_rows, staged_sources - missing.size());
    repeated += pin->repeated_rows;
    if (i % 50 == 49) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_GE(from_slots, 5000u) << "the hot rows should have been promoted";
  EXPECT_GT(repeated, 0u) << "32 tokens over 64 rows a head repeat rows before the tier holds them";
  // Bad input is refused before anything is pinned.
  std::vector<uint32_t> sources(16);
  std::vector<uint8_t> staged(16 * row_bytes);
  auto bad = HotIndices(*manifest_, 15, 1, 0, 1);
  bad[3] = 0xffffffffu;
  EXPECT_EQ(m.SplitForDevice(15, 1, bad, sources.data(), staged.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.SplitForDevice(99, 1, bad, sources.data(), staged.data()).status().code(), absl::StatusCode::kNotFound);
  // Every pin held (kernels still "running"): the next split is refused; Lookup still serves.
  std::vector<MappedTable::DevicePin> held;
  const auto idx = HotIndices(*manifest_, 15, 1, 700, 3);
  for (uint32_t k = 0; k < shm::kPinsPerHbmLayer; ++k) {
    auto pin = m.SplitForDevice(15, 1, idx, sources.data(), staged.data());
    ASSERT_TRUE(pin.ok()) << pin.status();
    held.push_back(*pin);
  }
  auto refused = m.SplitForDevice(15, 1, idx, sources.data(), staged.data());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("pin"), std::string::npos) << refused.status();
  std::vector<uint8_t> out(idx.size() * row_bytes);
  ASSERT_TRUE(m.Lookup(15, 1, idx, absl::MakeSpan(out)).ok());
  CheckRows(15, idx, out);
  for (const auto& pin : held) m.ReleaseDevicePin(pin);
  auto again = m.SplitForDevice(15, 1, idx, sources.data(), staged.data());
  ASSERT_TRUE(again.ok()) << again.status();
  m.ReleaseDevicePin(*again);  // a pin left held would stall the daemon's next publish until it times out
}

// The direct device path's host half (LookupToDevice gathering misses from the registered mapping
// itself): every row is named by its slot, by its row in the layer's mapping, or (a row the
// request already reads from the mapping) by the earlier position that reads it, and the two
// passes of the kernels, replayed by their twin, give the formula's bytes; each row of the mapping
// is read once per request. Without the tier, or with every pin busy, all rows come from the
// mapping and nothing is pinned.
TEST_F(ShmTest, HbmDirectDeviceSplitNamesASlotOrAMappedRowForEveryRow) {
  StartHbmDaemon();
  std::unique_ptr<ShmConnection> c;
  std::unique_ptr<MappedTable> mapped;
  ConnectAndMap(&c, &mapped);
  if (HasFatalFailure()) return;
  MappedTable& m = *mapped;
  const uint64_t row_bytes = manifest_->row.bytes;
  const uint8_t* slots = m.hbm_host_slots(15);
  const absl::Span<const uint8_t> host_rows = m.layer_rows(15);
  ASSERT_NE(slots, nullptr);
  ASSERT_EQ(host_rows.size(), manifest_->FindLayer(15)->layout.total_rows * row_bytes);
  EXPECT_TRUE(m.layer_rows(99).empty());
  // The kernels' twin, and what a request's sources must hold: a repeat names an earlier position
  // that reads the same row from the mapping, and no row of the mapping is read twice.
  auto gather = [&](const std::vector<uint64_t>& sources, std::vector<uint8_t>* out) {
    kernels::ReplayDirectGather(sources.data(), static_cast<int64_t>(sources.size()), slots, host_rows.data(),
                                static_cast<int64_t>(row_bytes), out->data());
    std::set<uint64_t> read;
    for (size_t r = 0; r < sources.size(); ++r) {
      if (kernels::IsDirectRepeat(sources[r])) {
        const int64_t first = kernels::DirectRepeatOf(sources[r]);
        ASSERT_LT(first, static_cast<int64_t>(r));
        EXPECT_NE(sources[first] & kernels::kDirectFromHost, 0u) << "row " << r << " repeats " << first;
      } else if ((sources[r] & kernels::kDirectFromHost) != 0) {
        EXPECT_TRUE(read.insert(sources[r]).second) << "row " << r << " reads its row from host memory again";
      }
    }
  };
  uint64_t from_slots = 0, from_host = 0, repeated = 0;
  for (int i = 0; i < 2000 && (from_slots < 5000 || from_host < 1000); ++i) {
    const auto idx = HotIndices(*manifest_, 15, 32, 700, i);
    std::vector<uint64_t> sources(idx.size());
    std::vector<uint8_t> out(idx.size() * row_bytes);
    auto pin = m.SplitForDeviceDirect(15, 32, idx, /*use_hbm=*/true, sources.data());
    ASSERT_TRUE(pin.ok()) << pin.status();
    gather(sources, &out);
    m.ReleaseDevicePin(*pin);
    CheckRows(15, idx, out);
    const auto host = static_cast<uint64_t>(
        std::count_if(sources.begin(), sources.end(), [](uint64_t s) { return (s & kernels::kDirectFromHost) != 0; }));
    const auto repeats = static_cast<uint64_t>(
        std::count_if(sources.begin(), sources.end(), [](uint64_t s) { return kernels::IsDirectRepeat(s); }));
    EXPECT_EQ(pin->staged_rows, host);
    EXPECT_EQ(pin->repeated_rows, repeats);
    repeated += repeats;
    from_host += host;
    from_slots += sources.size() - host - repeats;
    if (i % 50 == 49) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_GE(from_slots, 5000u) << "the hot rows should have been promoted";
  EXPECT_GE(from_host, 1000u) << "the cold rows should come from the mapping";
  EXPECT_GT(repeated, 0u) << "32 tokens over 64 rows a head repeat rows the tier lacks";
  // Without the tier: every row from the mapping, no pin.
  const auto idx = HotIndices(*manifest_, 15, 8, 700, 5);
  std::vector<uint64_t> sources(idx.size());
  std::vector<uint8_t> out(idx.size() * row_bytes);
  auto plain = m.SplitForDeviceDirect(15, 8, idx, /*use_hbm=*/false, sources.data());
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->pinned);
  EXPECT_TRUE(std::all_of(sources.begin(), sources.end(), [](uint64_t s) {
    return (s & kernels::kDirectFromHost) != 0 || kernels::IsDirectRepeat(s);
  }));
  EXPECT_EQ(plain->staged_rows + plain->repeated_rows, sources.size());
  gather(sources, &out);
  CheckRows(15, idx, out);
  // Every pin held: still served, from the mapping, and nothing more is pinned.
  std::vector<uint32_t> narrow(idx.size());
  std::vector<uint8_t> staged(idx.size() * row_bytes);
  std::vector<MappedTable::DevicePin> held;
  for (uint32_t k = 0; k < shm::kPinsPerHbmLayer; ++k) {
    auto pin = m.SplitForDevice(15, 8, idx, narrow.data(), staged.data());
    ASSERT_TRUE(pin.ok()) << pin.status();
    held.push_back(*pin);
  }
  auto busy = m.SplitForDeviceDirect(15, 8, idx, /*use_hbm=*/true, sources.data());
  ASSERT_TRUE(busy.ok()) << busy.status();
  EXPECT_FALSE(busy->pinned);
  std::fill(out.begin(), out.end(), 0);
  gather(sources, &out);
  CheckRows(15, idx, out);
  for (const auto& pin : held) m.ReleaseDevicePin(pin);
  // Bad input is refused.
  auto bad = HotIndices(*manifest_, 15, 1, 0, 1);
  bad[3] = 0xffffffffu;
  EXPECT_EQ(m.SplitForDeviceDirect(15, 1, bad, true, sources.data()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.SplitForDeviceDirect(99, 1, bad, true, sources.data()).status().code(), absl::StatusCode::kNotFound);
}

// Lookups the daemon serves itself (ring, gRPC) are sampled for the promoter too.
TEST_F(ShmTest, HbmTierPromotesRowsTheDaemonServes) {
  StartHbmDaemon();
  ShmConnectOptions options;
  auto c = ShmConnection::Connect(daemon_->socket(), options);
  ASSERT_TRUE(c.ok()) << c.status();
  auto table = (*c)->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  const std::string series = "engram_hbm_resident_rows{table=\"demo\",layer=\"15\"}";
  for (int i = 0; i < 2000 && MetricValue(daemon_->metrics_port(), series) <= 0; ++i) {
    const auto idx = HotIndices(*manifest_, 15, 256, 300, i);
    std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
    ASSERT_TRUE((*c)->Lookup(*table, 15, 256, idx, absl::MakeSpan(out)).ok());
    CheckRows(15, idx, out);
  }
  EXPECT_GT(MetricValue(daemon_->metrics_port(), series), 0) << daemon_->log();
  EXPECT_GT(MetricValue(daemon_->metrics_port(), "engram_hbm_samples_total{table=\"demo\",layer=\"15\"}"), 0);
}

// HBM control frames sent wrong: refused with a reason; only a torn frame costs the session.
// What MapTable and MapHbm hand out can be read, never written, by a client: not through the
// descriptors, and not by reopening them for writing through /proc (a memfd's file mode lets any
// opener ask for write access; the daemon's seals refuse every new writable mapping and write()).
TEST_F(ShmTest, SharedRowsIndexAndSlotsCannotBeWrittenByAClient) {
  StartDaemon({"--hbm-budget", "512K", "--hbm-store", "host"});
  int32_t status = -1;
  std::string message;
  const int fd = RawSession(daemon_->socket(), shm::kVersion, &status, &message);
  ASSERT_EQ(status, 0) << message;
  const shm::MapTableRequest request{0};
  const std::string req(reinterpret_cast<const char*>(&request), sizeof(request));
  std::vector<int> handed;
  for (shm::FrameType type : {shm::FrameType::kMapTable, shm::FrameType::kMapHbm}) {
    ASSERT_TRUE(shm::SendFrame(fd, type, req, {}).ok());
    auto reply = shm::ReceiveFrame(fd, 5000);
    ASSERT_TRUE(reply.ok()) << reply.status();
    shm::MapTableReply r{};
    std::memcpy(&r, reply->payload.data(), sizeof(r));
    ASSERT_EQ(r.status, 0) << reply->payload.substr(sizeof(r));
    handed.insert(handed.end(), reply->fds.begin(), reply->fds.end());
  }
  ASSERT_EQ(handed.size(), 2u + 2u * 2u);  // two layers' rows, then per layer its index and slots
  for (int h : handed) {
    struct stat st {};
    ASSERT_EQ(fstat(h, &st), 0);
    void* ro = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, h, 0);
    EXPECT_NE(ro, MAP_FAILED) << "a client can map it for reading";
    if (ro != MAP_FAILED) munmap(ro, static_cast<size_t>(st.st_size));
    EXPECT_EQ(mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, h, 0), MAP_FAILED);
    const int rw = open(absl::StrCat("/proc/self/fd/", h).c_str(), O_RDWR | O_CLOEXEC);
    if (rw >= 0) {  // opening may be allowed; writing through it is not
      void* w = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0);
      EXPECT_EQ(w, MAP_FAILED) << "a writable shared mapping of a handed-out memfd";
      if (w != MAP_FAILED) munmap(w, static_cast<size_t>(st.st_size));
      const char byte = 0x5a;
      EXPECT_LT(pwrite(rw, &byte, 1, 0), 0) << "write() into a handed-out memfd";
      close(rw);
    }
    close(h);
  }
  close(fd);
}

TEST_F(ShmTest, HostileHbmFramesAreRefused) {
  StartDaemon({"--hbm-budget", "512K", "--hbm-store", "host"});
  int32_t status = -1;
  std::string message;
  const int fd = RawSession(daemon_->socket(), shm::kVersion, &status, &message);
  ASSERT_EQ(status, 0) << message;
  const shm::MapTableRequest request{0};
  const std::string req(reinterpret_cast<const char*>(&request), sizeof(request));
  auto call = [&](shm::FrameType type, const std::string& payload) {
    EXPECT_TRUE(shm::SendFrame(fd, type, payload, {}).ok());
    auto reply = shm::ReceiveFrame(fd, 5000);
    EXPECT_TRUE(reply.ok()) << reply.status();
    shm::MapTableReply r{};
    if (reply.ok()) {
      for (int f : reply->fds) close(f);
      std::memcpy(&r, reply->payload.data(), sizeof(r));
      message = reply->payload.substr(sizeof(r));
    }
    return r.status;
  };
  // The HBM tier of a table this client did not map: refused, the session goes on.
  EXPECT_EQ(call(shm::FrameType::kMapHbm, req), static_cast<int32_t>(absl::StatusCode::kFailedPrecondition));
  EXPECT_NE(message.find("MapTable first"), std::string::npos) << message;
  EXPECT_EQ(call(shm::FrameType::kMapTable, req), 0) << message;
  EXPECT_EQ(call(shm::FrameType::kMapHbm, req), 0) << message;
  EXPECT_EQ(call(shm::FrameType::kMapHbm, req), static_cast<int32_t>(absl::StatusCode::kAlreadyExists));
  // Samples beyond the layer, and an impossible HBM count: logged and ignored.
  auto report = [&](int32_t layer, uint64_t hbm_rows, std::vector<uint64_t> rows) {
    shm::AccessReport r{0, layer, hbm_rows, static_cast<uint32_t>(rows.size()), 0};
    std::string payload(reinterpret_cast<const char*>(&r), sizeof(r));
    payload.append(reinterpret_cast<const char*>(rows.data()), rows.size() * 8);
    return payload;
  };
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kAccessReport, report(1, 0, {1, 2, 1ull << 40}), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("sampled row 1099511627776 is beyond")) << daemon_->log();
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kAccessReport, report(1, 1ull << 50, {}), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("rows from HBM is not a possible count")) << daemon_->log();
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kAccessReport, report(99, 0, {1}), {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("has no HBM layer 99")) << daemon_->log();
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_rows_served_total{table=\"demo\",tier=\"hbm\"}"), -1);
  // The session is still served.
  EXPECT_EQ(call(shm::FrameType::kOpenTable, "demo"), 0);
  // A report that claims more samples than it carries: the client is dropped.
  std::string torn = report(1, 0, {1, 2, 3});
  torn.resize(torn.size() - 8);
  ASSERT_TRUE(shm::SendFrame(fd, shm::FrameType::kAccessReport, torn, {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("AccessReport frame of the wrong size")) << daemon_->log();
  close(fd);
  // A protocol 2 client may not use HBM frames.
  const int old = RawSession(daemon_->socket(), 2, &status, &message);
  ASSERT_TRUE(shm::SendFrame(old, shm::FrameType::kMapHbm, req, {}).ok());
  EXPECT_TRUE(daemon_->WaitForLog("HBM frames need protocol 3")) << daemon_->log();
  close(old);
  // Everyone else is served, from HBM where it can.
  auto c = Connect();
  ASSERT_NE(c, nullptr);
  auto table = c->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  auto mapped = c->MapTable(*table);
  ASSERT_TRUE(mapped.ok());
  EXPECT_EQ((*mapped)->hbm_access(), MappedTable::HbmAccess::kHost);
  const auto idx = RandomIndices(1, 3, 2);
  std::vector<uint8_t> out(idx.size() * manifest_->row.bytes);
  ASSERT_TRUE((*mapped)->Lookup(1, 3, idx, absl::MakeSpan(out)).ok());
  CheckRows(1, idx, out);
}

// A bad --hbm-store or asking for the GPU store where there is none: engramd says so and stops.
TEST_F(ShmTest, HbmFlagsAreChecked) {
  auto [code, out] = RunCommand(std::string(ENGRAMD_PATH) + " --pack " + dir_->path() + "/pack --hbm-store gpu");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("--hbm-store: 'gpu' is not auto, cuda or host"), std::string::npos) << out;
  std::tie(code, out) = RunCommand(std::string(ENGRAMD_PATH) + " --pack " + dir_->path() + "/pack --hbm-store host");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("needs an --hbm-budget"), std::string::npos) << out;
  // The GPU store, asked for by name, on a machine or build without one: a clear failure, not a
  // daemon quietly serving without the tier.
  if (absl::StatusOr<GpuInfo> gpu = ProbeGpu(0); !gpu.ok()) {
    std::tie(code, out) = RunCommand(std::string(ENGRAMD_PATH) + " --pack " + dir_->path() +
                                     "/pack --socket off --listen 127.0.0.1:0 --metrics-listen off"
                                     " --hbm-budget 1M --hbm-store cuda");
    EXPECT_EQ(code, 1);
    EXPECT_NE(out.find("event=tier_hbm_failed"), std::string::npos) << out;
    EXPECT_NE(out.find(std::string(gpu.status().message())), std::string::npos) << out;
  }
}

}  // namespace
}  // namespace engram
