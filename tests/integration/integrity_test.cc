// Row integrity against the real engramd: no client and no disk can change what another client
// reads.
// - A shared-memory client that scribbles over its own data region while its lookups of cold rows
//   are in flight (resident table; NVMe-backed cached table with io_uring and with pread; alone and
//   beside honest clients): every row honest clients then read over gRPC, shared memory and a
//   mapped table equals the synthetic formula, and the scribbler's own requests all complete.
// - Bytes flipped in an NVMe-served pack file, before start and while serving: the rows in those
//   blocks fail with DATA_LOSS every time (never cached), every other row serves, the failures are
//   counted and logged once per block, and `engramctl pack verify` names the blocks.
// - A pack without block checksums is served with a warning and engram_table_verified 0,
//   --require-verified refuses it, and `engramctl pack checksum` makes it verified.
// - Thousands of sessions leave the daemon's descriptor count where it was; sessions that are
//   busy while the daemon stops let it exit cleanly.
// - Lookups over every transport while /metrics is scraped in a tight loop: same rows, no error.
#include <dirent.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "client/shm_testing.h"
#include "engram/client.h"
#include "engram/shm_client.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/test_util.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

using testing::Daemon;
using testing::MetricValue;
using testing::RunCommand;
using testing::TempDir;

constexpr char kMaxBatchRows[] = "65536";

std::string CreatePack(const std::string& dir) {
  const std::string pack = dir + "/pack";
  const auto [rc, out] = RunCommand(std::string(ENGRAMCTL_PATH) +
                                    " pack create --preset demo-v1 --scale 0.002 --dtype f16 --quiet --out " + pack);
  EXPECT_EQ(rc, 0) << out;
  return pack;
}

// Indices [tokens][heads] that name every row of every head of a layer: token t asks for row
// t % head_rows[h] of head h, for t in [0, max head rows).
std::vector<uint32_t> EveryRow(const PackManifest& m, int layer_id, uint32_t* tokens) {
  const auto& layout = m.FindLayer(layer_id)->layout;
  const int heads = m.hash.heads_per_layer();
  int64_t most = 0;
  for (int64_t r : layout.head_rows) most = std::max(most, r);
  *tokens = static_cast<uint32_t>(most);
  std::vector<uint32_t> idx(static_cast<size_t>(most) * heads);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<uint32_t>((i / heads) % layout.head_rows[i % heads]);
  return idx;
}

// How many rows of `out` differ from the formula.
uint64_t WrongRows(const PackManifest& m, int layer_id, const std::vector<uint32_t>& idx, const uint8_t* out) {
  const auto& layout = m.FindLayer(layer_id)->layout;
  const int heads = m.hash.heads_per_layer();
  std::vector<float> scratch(m.row.dim);
  std::vector<uint8_t> want(m.row.bytes);
  uint64_t wrong = 0;
  for (size_t i = 0; i < idx.size(); ++i) {
    SyntheticRow(*m.synthetic_seed, layer_id, layout.head_offset[i % heads] + idx[i], m.row.dim, m.row.dtype,
                 scratch.data(), want.data());
    wrong += std::memcmp(out + i * m.row.bytes, want.data(), m.row.bytes) != 0 ? 1 : 0;
  }
  return wrong;
}

// An honest reader of every row of both layers through one libengram_client URI; returns the
// wrong rows it saw (lookup errors count every row of the request as wrong).
uint64_t CheckEveryRow(const PackManifest& m, const std::string& uri, bool map_tables, uint64_t* rows_checked) {
  ClientOptions options;
  options.map_tables = map_tables;
  auto client = Client::Connect(uri, options);
  EXPECT_TRUE(client.ok()) << client.status();
  if (!client.ok()) return 1;
  auto table = (*client)->OpenTable("demo");
  EXPECT_TRUE(table.ok()) << table.status();
  if (!table.ok()) return 1;
  uint64_t wrong = 0;
  for (const auto& layer : m.layers) {
    uint32_t tokens = 0;
    const auto idx = EveryRow(m, layer.id, &tokens);
    std::vector<uint8_t> out(idx.size() * m.row.bytes, 0);
    const absl::Status s = (*client)->Lookup(**table, layer.id, tokens, idx, absl::MakeSpan(out));
    EXPECT_TRUE(s.ok()) << uri << ": " << s;
    wrong += s.ok() ? WrongRows(m, layer.id, idx, out.data()) : idx.size();
    *rows_checked += idx.size();
  }
  return wrong;
}

// A shared-memory client that looks up every row of both layers (all cold on a fresh daemon) in
// requests of `tokens_per_request` tokens while a thread of its own overwrites the requests'
// output region with 0x5A without pause. Returns how many of its requests completed (any status).
uint64_t Scribble(const PackManifest& m, const std::string& socket, int passes) {
  ShmConnectOptions options;
  options.data_bytes = 8 << 20;
  auto conn = ShmConnection::Connect(socket, options);
  EXPECT_TRUE(conn.ok()) << conn.status();
  if (!conn.ok()) return 0;
  auto table = (*conn)->OpenTable("demo");
  EXPECT_TRUE(table.ok()) << table.status();
  if (!table.ok()) return 0;
  const int heads = m.hash.heads_per_layer();
  constexpr uint32_t kTokens = 64;
  const uint64_t out_offset = 1 << 20, out_bytes = uint64_t{kTokens} * heads * m.row.bytes;
  uint8_t* data = ShmConnectionTestPeer::data(**conn);
  std::atomic<bool> stop{false};
  std::thread scribbler([&] {
    while (!stop.load(std::memory_order_relaxed)) std::memset(data + out_offset, 0x5a, out_bytes);
  });
  uint64_t completed = 0, posted = 0;
  for (int pass = 0; pass < passes; ++pass) {
    for (const auto& layer : m.layers) {
      uint32_t tokens = 0;
      const auto idx = EveryRow(m, layer.id, &tokens);
      for (uint32_t first = 0; first < tokens; first += kTokens) {
        const uint32_t n = std::min(kTokens, tokens - first);
        std::memcpy(data, idx.data() + size_t{first} * heads, size_t{n} * heads * 4);
        shm::RequestDescriptor d{};
        d.request_id = ++posted;
        d.op = static_cast<uint32_t>(shm::Op::kLookup);
        d.table_id = table->id;
        d.layer = static_cast<uint32_t>(layer.id);
        d.num_tokens = n;
        d.indices_offset = 0;
        d.indices_bytes = uint64_t{n} * heads * 4;
        d.out_offset = out_offset;
        d.out_bytes = uint64_t{n} * heads * m.row.bytes;
        EXPECT_TRUE(ShmConnectionTestPeer::Post(**conn, d).ok());
        auto c = ShmConnectionTestPeer::WaitCompletion(**conn);
        EXPECT_TRUE(c.ok()) << c.status();
        if (c.ok() && c->request_id == d.request_id) ++completed;
      }
    }
  }
  stop = true;
  scribbler.join();
  EXPECT_EQ(completed, posted);
  return completed;
}

struct ScribbleCase {
  const char* name;
  std::vector<std::string> flags;  // besides --pack; "BUDGET" becomes a fifth of the pack
  bool resident;
};

void PrintTo(const ScribbleCase& c, std::ostream* os) { *os << c.name; }

class ScribblerTest : public ::testing::TestWithParam<ScribbleCase> {
 protected:
  void SetUp() override {
    pack_ = CreatePack(dir_.path());
    manifest_ = *LoadPackManifest(pack_);
    std::vector<std::string> args = {"--pack", pack_, "--max-batch-rows", kMaxBatchRows};
    for (const std::string& f : GetParam().flags) {
      args.push_back(f == "BUDGET" ? std::to_string(manifest_.total_bytes() / 5) : f);
    }
    daemon_ = std::make_unique<Daemon>(args, dir_.path());
    ASSERT_TRUE(daemon_->running()) << daemon_->log();
    EXPECT_EQ(daemon_->log().find("tier=dram-cache+nvme") == std::string::npos, GetParam().resident) << daemon_->log();
  }
  // Every row of both layers over gRPC, the shared-memory ring and (resident) a mapped table.
  void ExpectEveryRowRight() {
    uint64_t checked = 0;
    const std::string grpc = "grpc://127.0.0.1:" + std::to_string(daemon_->grpc_port());
    const std::string unix_uri = "unix://" + daemon_->socket();
    EXPECT_EQ(CheckEveryRow(manifest_, grpc, false, &checked), 0u) << "wrong rows over gRPC";
    EXPECT_EQ(CheckEveryRow(manifest_, unix_uri, false, &checked), 0u) << "wrong rows over shared memory";
    if (GetParam().resident) {
      EXPECT_EQ(CheckEveryRow(manifest_, unix_uri, true, &checked), 0u) << "wrong rows from the mapped table";
    }
    EXPECT_GT(checked, 40000u);
  }

  TempDir dir_;
  std::string pack_;
  PackManifest manifest_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_P(ScribblerTest, AScribblingClientChangesNoRowAnyoneElseReads) {
  EXPECT_GT(Scribble(manifest_, daemon_->socket(), 1), 0u);  // every row read cold under the scribbling
  ExpectEveryRowRight();
  EXPECT_TRUE(daemon_->running());
}

TEST_P(ScribblerTest, HonestClientsBesideAScribblerReadOnlyRightRows) {
  std::atomic<uint64_t> wrong{0}, checked{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> honest;
  const std::string uris[] = {"grpc://127.0.0.1:" + std::to_string(daemon_->grpc_port()),
                              "unix://" + daemon_->socket()};
  for (const std::string& uri : uris) {
    honest.emplace_back([&, uri] {
      for (int round = 0; round < 50 && !done.load(); ++round) {  // bounded
        uint64_t n = 0;
        wrong += CheckEveryRow(manifest_, uri, false, &n);
        checked += n;
      }
    });
  }
  Scribble(manifest_, daemon_->socket(), 3);
  done = true;
  for (auto& t : honest) t.join();
  EXPECT_EQ(wrong.load(), 0u) << "of " << checked.load() << " rows read beside the scribbler";
  EXPECT_GT(checked.load(), 0u);
  ExpectEveryRowRight();  // and nothing wrong was left behind in a cache
}

INSTANTIATE_TEST_SUITE_P(
    Tiers, ScribblerTest,
    ::testing::Values(ScribbleCase{"resident", {}, true},
                      ScribbleCase{"nvme_io_uring", {"--dram-budget", "BUDGET", "--nvme-io", "io_uring"}, false},
                      ScribbleCase{"nvme_pread", {"--dram-budget", "BUDGET", "--nvme-io", "pread"}, false}),
    [](const ::testing::TestParamInfo<ScribbleCase>& info) { return std::string(info.param.name); });

// Flips one byte of a file in place.
void FlipByte(const std::string& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  const char c = static_cast<char>(f.get() ^ 0x01);
  f.seekp(static_cast<std::streamoff>(offset));
  f.put(c);
}

class CorruptPackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pack_ = CreatePack(dir_.path());
    manifest_ = *LoadPackManifest(pack_);
  }
  void Start(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"--pack",      pack_,           "--max-batch-rows",
                                     kMaxBatchRows, "--dram-budget", std::to_string(manifest_.total_bytes() / 5)};
    args.insert(args.end(), extra.begin(), extra.end());
    daemon_ = std::make_unique<Daemon>(args, dir_.path());
  }
  // The row (head h = 0) a token index names, and its byte offset in layer 1's file.
  uint64_t RowOffset(uint64_t row) const { return row * manifest_.row.bytes + 5; }
  // One lookup of layer 1, head 0 row `row` (other heads row 0); the status.
  absl::Status LookupRow(Client& client, const TableHandle& table, uint32_t row) {
    std::vector<uint32_t> idx(manifest_.hash.heads_per_layer(), 0);
    idx[0] = row;
    std::vector<uint8_t> out(idx.size() * manifest_.row.bytes);
    absl::Status s = client.Lookup(table, 1, 1, idx, absl::MakeSpan(out));
    if (s.ok() && WrongRows(manifest_, 1, idx, out.data()) != 0) return absl::InternalError("wrong bytes returned");
    return s;
  }

  TempDir dir_;
  std::string pack_;
  PackManifest manifest_;
  std::unique_ptr<Daemon> daemon_;
};

TEST_F(CorruptPackTest, FlippedBytesFailWithDataLossEveryTimeAndTheRestServes) {
  const std::string rows_file = pack_ + "/" + manifest_.FindLayer(1)->file;
  // Ten rows of head 0 of layer 1, 40 rows apart (each in a block of its own).
  std::vector<uint32_t> bad_rows;
  for (uint32_t i = 0; i < 10; ++i) bad_rows.push_back(100 + 40 * i);
  for (int i = 0; i < 5; ++i) FlipByte(rows_file, RowOffset(bad_rows[i]));  // before start
  Start();
  ASSERT_TRUE(daemon_->running()) << daemon_->log();
  EXPECT_NE(daemon_->log().find("block_checksums=verified-on-read"), std::string::npos) << daemon_->log();
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_table_verified{table=\"demo\"}"), 1);
  for (int i = 5; i < 10; ++i) FlipByte(rows_file, RowOffset(bad_rows[i]));  // while serving, rows not read yet
  for (const std::string& uri :
       {"grpc://127.0.0.1:" + std::to_string(daemon_->grpc_port()), "unix://" + daemon_->socket()}) {
    auto client = Client::Connect(uri);
    ASSERT_TRUE(client.ok()) << client.status();
    auto table = (*client)->OpenTable("demo");
    ASSERT_TRUE(table.ok()) << table.status();
    for (uint32_t row : bad_rows) {
      for (int attempt = 0; attempt < 2; ++attempt) {  // twice: a corrupt block is never cached
        const absl::Status s = LookupRow(**client, **table, row);
        EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << uri << " row " << row << ": " << s;
        EXPECT_NE(s.message().find("table 'demo' layer 1 row " + std::to_string(row)), absl::string_view::npos) << s;
        EXPECT_NE(s.message().find("layer-1.rows"), absl::string_view::npos) << s;
      }
    }
    // Every other row of head 0 serves, right (rows sharing a block with a bad one excepted).
    for (uint32_t row = 0; row < 600; row += 3) {
      bool shares = false;
      for (uint32_t bad : bad_rows) shares |= RowOffset(row) / 4096 == RowOffset(bad) / 4096;
      if (shares) continue;
      ASSERT_TRUE(LookupRow(**client, **table, row).ok()) << uri << " row " << row;
    }
  }
  // Counted (each failing read of a block), logged once per block.
  EXPECT_GE(MetricValue(daemon_->metrics_port(), "engram_nvme_checksum_failures_total{table=\"demo\",layer=\"1\"}"),
            40);
  const std::string log = daemon_->log();
  size_t logged = 0;
  for (size_t at = log.find("nvme_block_corrupt"); at != std::string::npos;
       at = log.find("nvme_block_corrupt", at + 1)) {
    ++logged;
  }
  EXPECT_EQ(logged, 10u) << log;
  EXPECT_TRUE(daemon_->running());
  // pack verify names each block.
  const auto [rc, out] = RunCommand(std::string(ENGRAMCTL_PATH) + " pack verify " + pack_);
  EXPECT_EQ(rc, 1) << out;
  for (uint32_t row : bad_rows) {
    EXPECT_NE(out.find("layer 1: block " + std::to_string(RowOffset(row) / 4096) + " of "), std::string::npos) << out;
  }
}

TEST_F(CorruptPackTest, APackWithoutBlockChecksumsIsServedUnverifiedOrRefused) {
  // As packs were written before block checksums.
  PackManifest old = manifest_;
  for (auto& l : old.layers) {
    std::filesystem::remove(pack_ + "/" + l.block_checksums_file);
    l.block_checksums_file.clear();
    l.block_checksums_xxh3_64.clear();
  }
  std::ofstream(pack_ + "/manifest.json") << ManifestToJson(old);
  Start();
  ASSERT_TRUE(daemon_->running()) << daemon_->log();
  EXPECT_NE(daemon_->log().find("table_unverified"), std::string::npos) << daemon_->log();
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_table_verified{table=\"demo\"}"), 0);
  daemon_->Stop();

  Start({"--require-verified"});
  EXPECT_FALSE(daemon_->running());
  EXPECT_NE(daemon_->exit_code(), 0);
  EXPECT_NE(daemon_->log().find("engramctl pack checksum"), std::string::npos) << daemon_->log();

  const auto [rc, out] = RunCommand(std::string(ENGRAMCTL_PATH) + " pack checksum " + pack_);
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("block checksums added to 2 layers"), std::string::npos) << out;
  EXPECT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack verify " + pack_).first, 0);
  Start({"--require-verified"});
  ASSERT_TRUE(daemon_->running()) << daemon_->log();
  EXPECT_EQ(MetricValue(daemon_->metrics_port(), "engram_table_verified{table=\"demo\"}"), 1);
}

TEST_F(CorruptPackTest, PackChecksumRefusesAFileThatAlreadyFailsItsHash) {
  PackManifest old = manifest_;
  for (auto& l : old.layers) l.block_checksums_file.clear();
  std::ofstream(pack_ + "/manifest.json") << ManifestToJson(old);
  FlipByte(pack_ + "/layer-1.rows", 777);
  const auto [rc, out] = RunCommand(std::string(ENGRAMCTL_PATH) + " pack checksum " + pack_);
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("not checksumming a corrupt file"), std::string::npos) << out;
}

int OpenFds(pid_t pid) {
  int n = 0;
  DIR* d = opendir(("/proc/" + std::to_string(pid) + "/fd").c_str());
  if (d == nullptr) return -1;
  while (readdir(d) != nullptr) ++n;
  closedir(d);
  return n;
}

TEST(SessionTest, ThousandsOfSessionsLeaveTheDescriptorCountSteady) {
  TempDir dir;
  const std::string pack = CreatePack(dir.path());
  const PackManifest m = *LoadPackManifest(pack);
  Daemon daemon({"--pack", pack}, dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  const int heads = m.hash.heads_per_layer();
  std::vector<uint32_t> idx(heads, 3);
  std::vector<uint8_t> out(idx.size() * m.row.bytes);
  auto session = [&] {
    ShmConnectOptions options;
    options.data_bytes = 1 << 20;
    auto conn = ShmConnection::Connect(daemon.socket(), options);
    ASSERT_TRUE(conn.ok()) << conn.status();
    auto table = (*conn)->OpenTable("demo");
    ASSERT_TRUE(table.ok()) << table.status();
    ASSERT_TRUE((*conn)->Lookup(*table, 1, 1, idx, absl::MakeSpan(out)).ok());
  };
  for (int i = 0; i < 50; ++i) session();  // warm: thread pools, lazily opened files
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int before = OpenFds(daemon.pid());
  ASSERT_GT(before, 0);
  for (int i = 0; i < 2000 && !::testing::Test::HasFatalFailure(); ++i) session();
  // The last sessions' sockets may not be reaped yet (that happens at the next accept): one more,
  // then count.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  session();
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const int after = OpenFds(daemon.pid());
  EXPECT_LE(after, before + 4) << "descriptors before " << before << ", after 2000 sessions " << after;
  EXPECT_EQ(WrongRows(m, 1, idx, out.data()), 0u);
}

TEST(SessionTest, SessionsBusyWhileTheDaemonStopsLetItExitCleanly) {
  TempDir dir;
  const std::string pack = CreatePack(dir.path());
  const PackManifest m = *LoadPackManifest(pack);
  for (int round = 0; round < 3; ++round) {
    Daemon daemon({"--pack", pack}, dir.path());
    ASSERT_TRUE(daemon.running()) << daemon.log();
    std::atomic<bool> stop{false};
    std::vector<std::thread> clients;
    for (int c = 0; c < 6; ++c) {
      clients.emplace_back([&, c] {
        // Connect, look up, hang up, again: sessions begin and end while the daemon stops.
        for (int i = 0; i < 400 && !stop.load(); ++i) {
          ShmConnectOptions options;
          options.data_bytes = 1 << 20;
          options.timeout_ms = 2000;
          auto conn = ShmConnection::Connect(daemon.socket(), options);
          if (!conn.ok()) continue;
          auto table = (*conn)->OpenTable("demo");
          if (!table.ok()) continue;
          std::vector<uint32_t> idx(m.hash.heads_per_layer(), static_cast<uint32_t>(c + i % 7));
          std::vector<uint8_t> out(idx.size() * m.row.bytes);
          if ((*conn)->Lookup(*table, 15, 1, idx, absl::MakeSpan(out)).ok()) {
            EXPECT_EQ(WrongRows(m, 15, idx, out.data()), 0u);
          }
        }
      });
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200 + 100 * round));
    EXPECT_EQ(daemon.Stop(), 0) << daemon.log();
    stop = true;
    for (auto& t : clients) t.join();
  }
}

TEST(MetricsUnderLoadTest, ScrapingInATightLoopChangesNoRowAndFailsNoRequest) {
  TempDir dir;
  const std::string pack = CreatePack(dir.path());
  const PackManifest m = *LoadPackManifest(pack);
  Daemon daemon({"--pack", pack, "--max-batch-rows", kMaxBatchRows}, dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  std::atomic<bool> done{false};
  std::atomic<int> scrapes{0}, failed_scrapes{0};
  std::thread scraper([&] {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);  // bounded
    while (!done.load() && std::chrono::steady_clock::now() < until) {
      const auto [code, body] = testing::HttpGet(daemon.metrics_port(), "/metrics");
      ++scrapes;
      if (code != 200) ++failed_scrapes;
    }
  });
  uint64_t checked = 0, wrong = 0;
  for (int round = 0; round < 3; ++round) {
    wrong += CheckEveryRow(m, "grpc://127.0.0.1:" + std::to_string(daemon.grpc_port()), false, &checked);
    wrong += CheckEveryRow(m, "unix://" + daemon.socket(), false, &checked);
    wrong += CheckEveryRow(m, "unix://" + daemon.socket(), true, &checked);
  }
  done = true;
  scraper.join();
  EXPECT_EQ(wrong, 0u) << "of " << checked;
  EXPECT_GT(scrapes.load(), 3);
  EXPECT_EQ(failed_scrapes.load(), 0);
}

}  // namespace
}  // namespace engram
