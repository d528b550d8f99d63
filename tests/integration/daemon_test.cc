// The real engramd binary on loopback, driven by a C++ gRPC client: rows equal the synthetic
// formula, every bad input gets its status and the daemon keeps serving, /metrics passes
// promtool, SIGTERM drains and exits cleanly, and engram-bench runs against it.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <random>
#include <sstream>
#include <set>
#include <thread>

#include "engram/client.h"
#include "engram/v1/engram.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/integration/daemon_process.h"
#include "tests/test_util.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

using testing::TempDir;

using testing::Daemon;
using testing::HttpGet;
using testing::ReadFile;
using testing::RunCommand;

class DaemonTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    const auto [code, out] = RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --quiet --out " +
                                 pack_dir());
    ASSERT_EQ(code, 0) << out;
    manifest_ = new PackManifest(*LoadPackManifest(pack_dir()));
    daemon_ = new Daemon({"--pack", pack_dir(), "--max-batch-rows", "4096"}, dir_->path());
    ASSERT_TRUE(daemon_->running()) << daemon_->log();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    stub_ = v1::Engram::NewStub(grpc::CreateCustomChannel(
                                    "127.0.0.1:" + std::to_string(daemon_->grpc_port()),
                                    grpc::InsecureChannelCredentials(), args))
                .release();
  }
  static void TearDownTestSuite() {
    delete stub_;
    delete daemon_;
    delete manifest_;
    delete dir_;
  }
  static std::string pack_dir() { return dir_->path() + "/pack"; }

  static std::vector<uint8_t> ExpectedRow(int layer_id, int h, uint32_t idx) {
    return testing::FormulaRow(*manifest_, layer_id, h, idx);
  }

  static grpc::Status Lookup(int layer, uint32_t tokens, const std::vector<uint32_t>& indices,
                             v1::LookupResponse* response, const std::string& table = "demo") {
    v1::LookupRequest request;
    request.set_table(table);
    request.set_layer(static_cast<uint32_t>(layer));
    request.set_num_tokens(tokens);
    request.set_request_id(77);
    request.set_indices(reinterpret_cast<const char*>(indices.data()), indices.size() * 4);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
    return stub_->Lookup(&context, request, response);
  }

  static TempDir* dir_;
  static PackManifest* manifest_;
  static Daemon* daemon_;
  static v1::Engram::Stub* stub_;
};

TempDir* DaemonTest::dir_ = nullptr;
PackManifest* DaemonTest::manifest_ = nullptr;
Daemon* DaemonTest::daemon_ = nullptr;
v1::Engram::Stub* DaemonTest::stub_ = nullptr;

TEST_F(DaemonTest, StartupLogNamesEachTableLayerAndTier) {
  const std::string log = daemon_->log();
  EXPECT_NE(log.find("event=table_loaded table=demo layer=1 "), std::string::npos) << log;
  EXPECT_NE(log.find("event=table_loaded table=demo layer=15 "), std::string::npos) << log;
  EXPECT_NE(log.find("tier=dram-resident"), std::string::npos) << log;
  EXPECT_NE(log.find("event=tier_hbm_off"), std::string::npos) << log;
}

TEST_F(DaemonTest, TablesDescribeTheLayout) {
  grpc::ClientContext c1;
  v1::ListTablesResponse list;
  ASSERT_TRUE(stub_->ListTables(&c1, v1::ListTablesRequest(), &list).ok());
  ASSERT_EQ(list.tables_size(), 1);
  EXPECT_EQ(list.tables(0).name(), "demo");
  grpc::ClientContext c2;
  v1::GetTableRequest req;
  req.set_table("demo");
  v1::TableInfo info;
  ASSERT_TRUE(stub_->GetTable(&c2, req, &info).ok());
  EXPECT_EQ(info.dtype(), "bf16");
  EXPECT_EQ(info.row_bytes(), 128u);
  EXPECT_EQ(info.heads(), 16u);
  EXPECT_EQ(info.hash().compress_lut().size(), 129280u * 4);
  ASSERT_EQ(info.layers_size(), 2);
  for (int l = 0; l < 2; ++l) {
    const auto& layout = manifest_->layers[l].layout;
    EXPECT_EQ(info.layers(l).id(), static_cast<uint32_t>(manifest_->layers[l].id));
    ASSERT_EQ(info.layers(l).head_rows_size(), 16);
    for (int h = 0; h < 16; ++h) EXPECT_EQ(info.layers(l).head_rows(h), static_cast<uint64_t>(layout.head_rows[h]));
    for (int k = 0; k < 3; ++k) EXPECT_EQ(info.layers(l).multipliers(k), layout.multipliers[k]);
  }
  grpc::ClientContext c3;
  req.set_table("missing");
  EXPECT_EQ(stub_->GetTable(&c3, req, &info).error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(DaemonTest, LookupReturnsTheFormulasRows) {
  const int heads = 16;
  const uint32_t tokens = 200;
  std::vector<uint32_t> indices(tokens * heads);
  std::mt19937 rng(5);
  const auto& layout = manifest_->FindLayer(15)->layout;
  for (size_t i = 0; i < indices.size(); ++i) indices[i] = rng() % layout.head_rows[i % heads];
  for (int h = 0; h < heads; ++h) indices[h] = static_cast<uint32_t>(layout.head_rows[h] - 1);  // last rows
  for (int h = 0; h < heads; ++h) indices[heads + h] = indices[h];                             // a repeat
  v1::LookupResponse response;
  const grpc::Status s = Lookup(15, tokens, indices, &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response.request_id(), 77u);
  ASSERT_EQ(response.rows().size(), indices.size() * 128);
  for (size_t i = 0; i < indices.size(); ++i) {
    const auto want = ExpectedRow(15, static_cast<int>(i % heads), indices[i]);
    ASSERT_EQ(0, std::memcmp(response.rows().data() + i * 128, want.data(), 128)) << i;
  }
  EXPECT_EQ(response.stats().rows_requested(), indices.size());
  // --dedup auto over a resident table reads every row (repeats are cache hits).
  EXPECT_EQ(response.stats().rows_read(), indices.size());
  EXPECT_EQ(response.stats().dram_rows(), response.stats().rows_read());
}

TEST_F(DaemonTest, LookupStreamAnswersInOrder) {
  grpc::ClientContext context;
  auto stream = stub_->LookupStream(&context);
  std::vector<std::vector<uint32_t>> sent;
  for (uint32_t r = 0; r < 5; ++r) {
    v1::LookupRequest request;
    request.set_table("demo");
    request.set_layer(1);
    request.set_num_tokens(r + 1);
    request.set_request_id(100 + r);
    std::vector<uint32_t> idx((r + 1) * 16);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<uint32_t>(r * 31 + i);
    request.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
    ASSERT_TRUE(stream->Write(request));
    sent.push_back(idx);
  }
  stream->WritesDone();
  v1::LookupResponse response;
  for (uint32_t r = 0; r < 5; ++r) {
    ASSERT_TRUE(stream->Read(&response));
    EXPECT_EQ(response.request_id(), 100 + r);
    ASSERT_EQ(response.rows().size(), sent[r].size() * 128);
    for (size_t i = 0; i < sent[r].size(); ++i) {
      ASSERT_EQ(0, std::memcmp(response.rows().data() + i * 128, ExpectedRow(1, static_cast<int>(i % 16), sent[r][i]).data(), 128));
    }
  }
  EXPECT_FALSE(stream->Read(&response));
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(DaemonTest, LookupTokensHashesLikeTheClient) {
  const auto trace = *ReadInt32File(testing::TestDataPath("fortunes.deepseek_v3.i32"));
  const uint32_t batch = 2, seq_len = 40;
  std::vector<int32_t> tokens(trace.begin() + 1000, trace.begin() + 1000 + batch * seq_len);
  v1::LookupTokensRequest request;
  request.set_table("demo");
  request.set_batch(batch);
  request.set_seq_len(seq_len);
  request.set_token_ids(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 4);
  grpc::ClientContext context;
  v1::LookupTokensResponse response;
  ASSERT_TRUE(stub_->LookupTokens(&context, request, &response).ok());
  ASSERT_EQ(response.rows_size(), 2);
  std::vector<LayerHashLayout> layouts;
  for (const auto& l : manifest_->layers) layouts.push_back(l.layout);
  auto hasher = *NgramHasher::Create(manifest_->hash, layouts);
  std::vector<int64_t> hashes;
  ASSERT_TRUE(hasher->HashAllLayers(tokens, batch, seq_len, &hashes).ok());
  for (int l = 0; l < 2; ++l) {
    EXPECT_EQ(response.layers(l), static_cast<uint32_t>(manifest_->layers[l].id));
    const std::string& rows = response.rows(l);
    ASSERT_EQ(rows.size(), batch * seq_len * 16 * 128u);
    for (uint32_t t = 0; t < batch * seq_len; ++t) {
      for (int h = 0; h < 16; ++h) {
        const auto idx = static_cast<uint32_t>(hashes[(t * 2 + l) * 16 + h]);
        ASSERT_EQ(0, std::memcmp(rows.data() + (t * 16 + h) * 128, ExpectedRow(manifest_->layers[l].id, h, idx).data(), 128));
      }
    }
  }
  // A raw id outside the tokenizer is refused, naming it.
  tokens[3] = 200000;
  request.set_token_ids(reinterpret_cast<const char*>(tokens.data()), tokens.size() * 4);
  grpc::ClientContext c2;
  const grpc::Status s = stub_->LookupTokens(&c2, request, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("token id 200000 at position 3"), std::string::npos) << s.error_message();
  // batch x seq_len x heads beyond 64 bits (2^30 x 2^30 x 16 wrapped to 0 once): refused by the
  // row limit, naming it, whatever the ids.
  request.set_batch(1u << 30);
  request.set_seq_len(1u << 30);
  grpc::ClientContext c3;
  const grpc::Status huge = stub_->LookupTokens(&c3, request, &response);
  EXPECT_EQ(huge.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << huge.error_message();
  EXPECT_NE(huge.error_message().find("exceeds --max-batch-rows"), std::string::npos) << huge.error_message();
}

TEST_F(DaemonTest, BadInputGetsItsStatusAndServingContinues) {
  v1::LookupResponse response;
  std::vector<uint32_t> two_tokens(32, 1);
  EXPECT_EQ(Lookup(1, 2, two_tokens, &response, "nope").error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Lookup(2, 2, two_tokens, &response).error_code(), grpc::StatusCode::NOT_FOUND);
  grpc::Status s = Lookup(1, 3, two_tokens, &response);  // 3 tokens need 192 bytes, got 128
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("indices hold 128 bytes"), std::string::npos) << s.error_message();
  std::vector<uint32_t> bad = two_tokens;
  bad[16 + 4] = 99999999;
  s = Lookup(1, 2, bad, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("index 99999999 for token 1, head 4"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find(std::to_string(manifest_->layers[0].layout.head_rows[4]) + " rows"),
            std::string::npos) << s.error_message();
  std::vector<uint32_t> too_many(257 * 16, 0);  // 4112 rows > --max-batch-rows 4096
  s = Lookup(1, 257, too_many, &response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(s.error_message().find("max-batch-rows"), std::string::npos) << s.error_message();
  // Indices that are not a whole number of uint32 values.
  v1::LookupRequest odd;
  odd.set_table("demo");
  odd.set_layer(1);
  odd.set_num_tokens(1);
  odd.set_indices(std::string(63, '\0'));
  grpc::ClientContext context;
  EXPECT_EQ(stub_->Lookup(&context, odd, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // Still serving, with the right bytes.
  ASSERT_TRUE(Lookup(1, 2, two_tokens, &response).ok());
  EXPECT_EQ(0, std::memcmp(response.rows().data(), ExpectedRow(1, 0, 1).data(), 128));
  EXPECT_TRUE(daemon_->running());
}

TEST_F(DaemonTest, MetricsPassPromtoolAndCountRequests) {
  v1::LookupResponse response;
  std::vector<uint32_t> idx(16, 3);
  ASSERT_TRUE(Lookup(1, 1, idx, &response).ok());
  EXPECT_EQ(Lookup(1, 1, std::vector<uint32_t>(16, 4000000000u), &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const auto [code, body] = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_EQ(code, 200);
  EXPECT_NE(body.find("engram_requests_total{transport=\"grpc\",method=\"Lookup\",code=\"OK\"}"), std::string::npos);
  EXPECT_NE(body.find("engram_requests_total{transport=\"grpc\",method=\"Lookup\",code=\"INVALID_ARGUMENT\"}"),
            std::string::npos) << body;
  EXPECT_NE(body.find("engram_request_duration_seconds_bucket{transport=\"grpc\",method=\"Lookup\",le=\"+Inf\"}"),
            std::string::npos);
  EXPECT_NE(body.find("engram_rows_served_total{table=\"demo\",tier=\"dram\"}"), std::string::npos);
  EXPECT_NE(body.find("engram_tier_enabled{tier=\"hbm\"} 0"), std::string::npos);
  EXPECT_NE(body.find("engram_table_bytes{table=\"demo\"} " + std::to_string(manifest_->total_bytes())), std::string::npos);
  const std::string file = dir_->path() + "/metrics.txt";
  std::ofstream(file) << body;
  const auto [lint_code, lint_out] = RunCommand("promtool check metrics < " + file);
  EXPECT_EQ(lint_code, 0) << lint_out;
  EXPECT_EQ(HttpGet(daemon_->metrics_port(), "/healthz").first, 200);
  EXPECT_EQ(HttpGet(daemon_->metrics_port(), "/readyz").first, 200);
  EXPECT_EQ(HttpGet(daemon_->metrics_port(), "/nothing").first, 404);
}

TEST_F(DaemonTest, BenchDrivesTheDaemon) {
  const std::string target = "grpc://127.0.0.1:" + std::to_string(daemon_->grpc_port());
  for (const std::string& workload : std::vector<std::string>{"zipf:1.0", "trace:" + testing::TestDataPath("fortunes.deepseek_v3.i32")}) {
    const auto [code, out] = RunCommand(std::string(ENGRAM_BENCH_PATH) + " --target " + target +
                                 " --table demo --batch-tokens 256 --duration 0.5 --json --workload " + workload,
                                 /*with_stderr=*/false);
    ASSERT_EQ(code, 0) << out;
    const auto j = nlohmann::json::parse(out);
    EXPECT_EQ(j["errors"], 0);
    EXPECT_GT(j["requests"].get<int>(), 0);
    EXPECT_GT(j["rows_per_s"].get<double>(), 0);
    EXPECT_LE(j["p50_us"].get<double>(), j["p99_us"].get<double>());
    EXPECT_EQ(j["workload"], workload);
  }
  const auto [code, out] = RunCommand(std::string(ENGRAM_BENCH_PATH) + " --target inproc --pack " + pack_dir() +
                               " --batch-tokens 256 --duration 0.3 --json --workload zipf:0", /*with_stderr=*/false);
  ASSERT_EQ(code, 0) << out;
  const auto j = nlohmann::json::parse(out);
  EXPECT_GT(j["ceiling_rows_per_s"].get<double>(), 0);
  // compare: the same workload in-process, over shared memory and over gRPC.
  const auto [ccode, cout] = RunCommand(std::string(ENGRAM_BENCH_PATH) + " compare --json --pack " + pack_dir() +
                                        " --socket " + daemon_->socket() + " --grpc 127.0.0.1:" +
                                        std::to_string(daemon_->grpc_port()) + " --batch-tokens 64 --duration 0.3",
                                        /*with_stderr=*/false);
  ASSERT_EQ(ccode, 0) << cout;
  const auto c = nlohmann::json::parse(cout);
  for (const char* target : {"inproc", "shm", "grpc"}) {
    EXPECT_GT(c[target]["requests"].get<int>(), 0) << target;
    EXPECT_EQ(c[target]["errors"], 0) << target;
    EXPECT_EQ(c[target]["batch_tokens"], 64) << target;
  }
}

// A pack five times the DRAM budget: rows come from NVMe (io_uring, O_DIRECT) through the cache.
TEST(DaemonNvmeTest, ServesAPackLargerThanItsDramBudgetRowByRow) {
  TempDir dir;
  const std::string pack = dir.path() + "/p";
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --dtype fp8_e4m3_ue8m0x32 "
                       "--quiet --out " + pack).first, 0);
  const PackManifest m = *LoadPackManifest(pack);
  Daemon daemon({"--pack", pack, "--dram-budget", std::to_string(m.total_bytes() / 5), "--nvme-queue-depth", "16"},
                dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  EXPECT_NE(daemon.log().find("tier=dram-cache+nvme"), std::string::npos) << daemon.log();
  EXPECT_NE(daemon.log().find("nvme_io=io_uring"), std::string::npos) << daemon.log();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto stub = v1::Engram::NewStub(grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(daemon.grpc_port()),
                                                            grpc::InsecureChannelCredentials(), args));
  const int heads = m.hash.heads_per_layer();
  std::mt19937 rng(4);
  std::vector<float> scratch(m.row.dim);
  std::vector<uint8_t> want(m.row.bytes);
  uint64_t nvme_rows = 0, dram_rows = 0;
  for (int round = 0; round < 6; ++round) {
    const PackLayer& layer = m.layers[round % 2];
    std::vector<uint32_t> idx(512 * heads);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = rng() % (round < 3 ? layer.layout.head_rows[i % heads] : 64);
    v1::LookupRequest request;
    request.set_table("demo");
    request.set_layer(static_cast<uint32_t>(layer.id));
    request.set_num_tokens(512);
    request.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
    v1::LookupResponse response;
    grpc::ClientContext context;
    ASSERT_TRUE(stub->Lookup(&context, request, &response).ok());
    ASSERT_EQ(response.rows().size(), idx.size() * m.row.bytes);
    for (size_t i = 0; i < idx.size(); ++i) {
      SyntheticRow(*m.synthetic_seed, layer.id, layer.layout.head_offset[i % heads] + idx[i], m.row.dim, m.row.dtype,
                   scratch.data(), want.data());
      ASSERT_EQ(0, std::memcmp(response.rows().data() + i * m.row.bytes, want.data(), m.row.bytes)) << i;
    }
    nvme_rows += response.stats().nvme_rows();
    dram_rows += response.stats().dram_rows();
  }
  EXPECT_GT(nvme_rows, 0u);
  EXPECT_GT(dram_rows, 0u);  // the later rounds use a small hot range that the cache holds
  // Prefetch over gRPC, then the same rows looked up: they come from DRAM, counted as useful.
  {
    const PackLayer& layer = m.layers[1];
    std::vector<uint32_t> idx(8 * heads);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<uint32_t>(layer.layout.head_rows[i % heads] - 1 - i / heads);
    v1::PrefetchRequest prefetch;
    prefetch.set_table("demo");
    prefetch.set_layer(static_cast<uint32_t>(layer.id));
    prefetch.set_num_tokens(8);
    prefetch.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
    v1::PrefetchResponse queued;
    grpc::ClientContext pc;
    ASSERT_TRUE(stub->Prefetch(&pc, prefetch, &queued).ok());
    EXPECT_EQ(queued.rows_queued() + queued.rows_skipped(), idx.size());
    v1::LookupResponse response;
    for (int attempt = 0; attempt < 100; ++attempt) {  // bounded wait for the background reads
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      v1::LookupRequest request;
      request.set_table("demo");
      request.set_layer(static_cast<uint32_t>(layer.id));
      request.set_num_tokens(8);
      request.set_indices(prefetch.indices());
      grpc::ClientContext lc;
      ASSERT_TRUE(stub->Lookup(&lc, request, &response).ok());
      if (response.stats().nvme_rows() == 0) break;
    }
    EXPECT_EQ(response.stats().nvme_rows(), 0u);
  }
  const auto [code, body] = HttpGet(daemon.metrics_port(), "/metrics");
  ASSERT_EQ(code, 200);
  EXPECT_NE(body.find("engram_tier_enabled{tier=\"nvme\"} 1"), std::string::npos);
  EXPECT_NE(body.find("engram_nvme_io_engine{table=\"demo\",layer=\"1\",engine=\"io_uring\"} 1"), std::string::npos);
  EXPECT_NE(body.find("engram_cache_hit_ratio{table=\"demo\",layer=\"1\"}"), std::string::npos);
  EXPECT_NE(body.find("engram_prefetch_rows_total{table=\"demo\",layer=\"15\",outcome=\"useful\"}"), std::string::npos);
  // Every series the Grafana dashboard plots is one this daemon exports (those that need an event
  // first, a mapped client's report or enough lookups to fit a Zipf exponent, excepted, and the
  // HBM tier's, which shm_test checks against a daemon with the tier on).
  const std::string dashboard = testing::ReadFile(std::string(ENGRAM_SOURCE_DIR) + "/deploy/grafana/engramd-dashboard.json");
  ASSERT_TRUE(nlohmann::json::parse(dashboard, nullptr, false).is_object()) << "dashboard is not valid JSON";
  const std::set<std::string> after_events = {"engram_mapped_rows_total", "engram_cache_zipf_alpha",
                                              "engram_cache_predicted_hit_ratio"};
  int plotted = 0;
  for (size_t at = dashboard.find("engram_"); at != std::string::npos; at = dashboard.find("engram_", at + 1)) {
    size_t end = at;
    while (end < dashboard.size() && (std::islower(dashboard[end]) || dashboard[end] == '_')) ++end;
    std::string name = dashboard.substr(at, end - at);
    if (name.size() > 7 && name.compare(name.size() - 7, 7, "_bucket") == 0) name.resize(name.size() - 7);
    if (name == "engram_" || after_events.count(name) > 0 || name.rfind("engram_hbm_", 0) == 0) continue;
    ++plotted;
    EXPECT_NE(body.find("# TYPE " + name + " "), std::string::npos) << "the dashboard plots " << name;
  }
  EXPECT_GT(plotted, 5);
  std::ofstream(dir.path() + "/m.txt") << body;
  const auto [lint, lint_out] = RunCommand("promtool check metrics < " + dir.path() + "/m.txt");
  EXPECT_EQ(lint, 0) << lint_out;
  EXPECT_EQ(daemon.Stop(), 0);
}

// Looks up tokens whose head-local indices are all below `hot_range` in layer 1; returns the stats.
v1::LookupStats LookupHotRange(v1::Engram::Stub* stub, int heads, uint32_t hot_range) {
  std::vector<uint32_t> idx(256 * heads);
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<uint32_t>((i / heads) % hot_range);
  v1::LookupRequest request;
  request.set_table("demo");
  request.set_layer(1);
  request.set_num_tokens(256);
  request.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
  v1::LookupResponse response;
  grpc::ClientContext context;
  EXPECT_TRUE(stub->Lookup(&context, request, &response).ok());
  return response.stats();
}

std::unique_ptr<v1::Engram::Stub> StubFor(const Daemon& daemon) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  return v1::Engram::NewStub(grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(daemon.grpc_port()),
                                                       grpc::InsecureChannelCredentials(), args));
}

TEST(DaemonStateTest, HotSetIsBackBeforeReadyAfterRestart) {
  TempDir dir;
  const std::string pack = dir.path() + "/p";
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --quiet --out " + pack).first, 0);
  const PackManifest m = *LoadPackManifest(pack);
  const std::vector<std::string> args = {"--pack", pack, "--dram-budget", std::to_string(m.total_bytes() / 5),
                                         "--state-dir", dir.path() + "/state"};
  {
    Daemon daemon(args, dir.path());
    ASSERT_TRUE(daemon.running()) << daemon.log();
    auto stub = StubFor(daemon);
    const auto cold = LookupHotRange(stub.get(), 16, 40);
    EXPECT_GT(cold.nvme_rows(), 0u);
    LookupHotRange(stub.get(), 16, 40);
    ASSERT_EQ(daemon.Stop(), 0);
    EXPECT_NE(daemon.log().find("event=hot_set_saved table=demo"), std::string::npos) << daemon.log();
  }
  Daemon restarted(args, dir.path());
  ASSERT_TRUE(restarted.running()) << restarted.log();
  const std::string log = restarted.log();
  const size_t warmed = log.find("event=cache_warmed table=demo layer=1");
  ASSERT_NE(warmed, std::string::npos) << log;
  EXPECT_NE(log.find("source=state", warmed), std::string::npos) << log;
  EXPECT_LT(warmed, log.find("event=ready"));  // warm before ready
  auto stub = StubFor(restarted);
  const auto warm = LookupHotRange(stub.get(), 16, 40);
  EXPECT_EQ(warm.nvme_rows(), 0u);  // the whole hot range came back from the snapshot
  EXPECT_EQ(warm.dram_rows(), warm.rows_read());
}

TEST(DaemonStateTest, WarmFromAProfileAndRefuseAStaleOne) {
  TempDir dir;
  const std::string pack = dir.path() + "/p", other = dir.path() + "/other";
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --quiet --out " + pack).first, 0);
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --seed 5 --quiet --out " + other).first, 0);
  const std::string tokens = testing::TestDataPath("fortunes.deepseek_v3.i32");
  auto [code, out] = RunCommand(std::string(ENGRAMCTL_PATH) + " profile --pack " + pack + " --tokens " + tokens +
                                " --fraction 0.05 --out " + dir.path() + "/hot");
  ASSERT_EQ(code, 0) << out;
  EXPECT_NE(out.find("layer 1: "), std::string::npos) << out;
  const PackManifest m = *LoadPackManifest(pack);
  {
    Daemon daemon({"--pack", pack, "--dram-budget", std::to_string(m.total_bytes() / 5), "--warm-from", dir.path() + "/hot"},
                  dir.path());
    ASSERT_TRUE(daemon.running()) << daemon.log();
    EXPECT_NE(daemon.log().find("source=profile:"), std::string::npos) << daemon.log();
  }
  // The same profile against a pack with other contents (another seed) is skipped, not applied.
  Daemon daemon({"--pack", other, "--dram-budget", std::to_string(m.total_bytes() / 5), "--warm-from", dir.path() + "/hot"},
                dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  EXPECT_NE(daemon.log().find("event=hot_set_skipped table=demo"), std::string::npos) << daemon.log();
  EXPECT_EQ(daemon.log().find("event=cache_warmed"), std::string::npos) << daemon.log();
}

TEST(DaemonLifecycleTest, SigtermDrainsAndExitsCleanly) {
  TempDir dir;
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.001 --quiet --out " + dir.path() + "/p").first, 0);
  Daemon daemon({"--pack", dir.path() + "/p"}, dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  EXPECT_EQ(daemon.Stop(), 0);
  const std::string log = daemon.log();
  EXPECT_NE(log.find("event=draining signal=SIGTERM"), std::string::npos) << log;
  EXPECT_NE(log.find("event=stopped"), std::string::npos) << log;
}

// Asking for an HBM tier the daemon cannot give (no GPU here, or not built with CUDA): it says why
// in a warning, reports the tier off in /metrics, and serves from DRAM.
TEST(DaemonLifecycleTest, HbmBudgetWithoutAUsableGpuIsReportedAndServingGoesOn) {
  TempDir dir;
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.001 --quiet --out " + dir.path() + "/p").first, 0);
  Daemon daemon({"--pack", dir.path() + "/p", "--hbm-budget", "1G", "--gpu", "0"}, dir.path());
  ASSERT_TRUE(daemon.running()) << daemon.log();
  const std::string log = daemon.log();
  const size_t at = log.find("event=tier_hbm_off reason=");
  ASSERT_NE(at, std::string::npos) << log;
  EXPECT_NE(log.substr(log.rfind('\n', at) + 1, at - log.rfind('\n', at)).find("WARN"), std::string::npos) << log;
  const auto [code, body] = HttpGet(daemon.metrics_port(), "/metrics");
  ASSERT_EQ(code, 200);
  EXPECT_NE(body.find("engram_tier_enabled{tier=\"hbm\"} 0"), std::string::npos) << body;
  EXPECT_NE(body.find("engram_tier_enabled{tier=\"dram\"} 1"), std::string::npos) << body;
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(daemon.grpc_port()), grpc::InsecureChannelCredentials());
  auto stub = v1::Engram::NewStub(channel);
  grpc::ClientContext context;
  v1::ListTablesResponse tables;
  ASSERT_TRUE(stub->ListTables(&context, v1::ListTablesRequest(), &tables).ok());
  EXPECT_EQ(tables.tables_size(), 1);
  EXPECT_EQ(daemon.Stop(), 0);
}

TEST(DaemonLifecycleTest, CorruptPackIsRefusedAtStart) {
  TempDir dir;
  const std::string pack = dir.path() + "/p";
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.001 --quiet --out " + pack).first, 0);
  {
    std::fstream f(pack + "/layer-15.rows", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(77);
    f.put('\x01');
  }
  EXPECT_NE(RunCommand(std::string(ENGRAMCTL_PATH) + " pack verify " + pack).first, 0);
  Daemon daemon({"--pack", pack}, dir.path());
  EXPECT_FALSE(daemon.running());
  EXPECT_EQ(daemon.exit_code(), 1);
  EXPECT_NE(daemon.log().find("layer-15.rows is corrupt"), std::string::npos) << daemon.log();
}

TEST(DaemonLifecycleTest, MissingPackAndBadFlagsSayWhatIsWrong) {
  auto [code, out] = RunCommand(std::string(ENGRAMD_PATH) + " --pack /nonexistent/pack --metrics-listen off --listen 127.0.0.1:0");
  EXPECT_EQ(code, 1);
  EXPECT_NE(out.find("no pack at /nonexistent/pack"), std::string::npos) << out;
  std::tie(code, out) = RunCommand(std::string(ENGRAMD_PATH) + " --bogus");
  EXPECT_EQ(code, 2);
  EXPECT_NE(out.find("unknown flag --bogus"), std::string::npos) << out;
  std::tie(code, out) = RunCommand(std::string(ENGRAMD_PATH) + " --help");
  EXPECT_EQ(code, 0);
  EXPECT_NE(out.find("--max-batch-rows"), std::string::npos) << out;
}

}  // namespace
}  // namespace engram

namespace engram {
namespace {

// Per-client resources are bounded: streams beyond --max-streams-per-client (one client) and
// --max-streams (all) get RESOURCE_EXHAUSTED naming the limit while earlier streams keep working;
// shared-memory clients beyond --max-clients are refused with the limit in the message; a freed
// slot is usable again.
TEST(DaemonLimitsTest, StreamsAndSharedMemoryClientsBeyondTheirCapsAreRefusedNamingTheLimit) {
  testing::TempDir dir;
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.001 --quiet --out " +
                       dir.path() + "/p")
                .first,
            0);
  Daemon daemon({"--pack", dir.path() + "/p", "--max-streams-per-client", "2", "--max-streams", "3",
                 "--max-clients", "2"},
                dir.path());
  ASSERT_TRUE(daemon.running());
  auto stub = v1::Engram::NewStub(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(daemon.grpc_port()), grpc::InsecureChannelCredentials()));
  v1::LookupRequest request;
  request.set_table("demo");
  request.set_layer(1);
  request.set_num_tokens(1);
  const std::vector<uint32_t> idx(16, 1);
  request.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
  struct Open {
    std::unique_ptr<grpc::ClientContext> context = std::make_unique<grpc::ClientContext>();
    std::unique_ptr<grpc::ClientReaderWriter<v1::LookupRequest, v1::LookupResponse>> stream;
  };
  auto open_stream = [&](Open* s) {
    s->stream = stub->LookupStream(s->context.get());
    v1::LookupResponse response;
    return s->stream->Write(request) && s->stream->Read(&response) && response.rows().size() == 16 * 128;
  };
  Open a, b, c;
  ASSERT_TRUE(open_stream(&a));
  ASSERT_TRUE(open_stream(&b));
  EXPECT_FALSE(open_stream(&c));  // a third from the same address
  c.stream->WritesDone();
  const grpc::Status refused = c.stream->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_NE(refused.error_message().find("--max-streams-per-client 2"), std::string::npos) << refused.error_message();
  v1::LookupResponse response;  // the first two still serve
  ASSERT_TRUE(a.stream->Write(request) && a.stream->Read(&response));
  a.stream->WritesDone();
  EXPECT_TRUE(a.stream->Finish().ok());
  Open d;
  EXPECT_TRUE(open_stream(&d));  // a's slot is free again
  for (Open* s : {&b, &d}) {
    s->stream->WritesDone();
    EXPECT_TRUE(s->stream->Finish().ok());
  }

  ClientOptions options;
  options.map_tables = false;
  auto one = Client::Connect("unix://" + daemon.socket(), options);
  auto two = Client::Connect("unix://" + daemon.socket(), options);
  ASSERT_TRUE(one.ok() && two.ok());
  auto three = Client::Connect("unix://" + daemon.socket(), options);
  ASSERT_FALSE(three.ok());
  EXPECT_EQ(three.status().code(), absl::StatusCode::kResourceExhausted) << three.status();
  EXPECT_NE(three.status().message().find("--max-clients 2"), std::string::npos) << three.status();
  auto table = (*one)->OpenTable("demo");
  ASSERT_TRUE(table.ok());
  std::vector<uint8_t> out(16 * 128);
  EXPECT_TRUE((*one)->Lookup(**table, 1, 1, idx, absl::MakeSpan(out)).ok());
  two->reset();  // its session ends; the slot is reaped at the next accept
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(Client::Connect("unix://" + daemon.socket(), options).ok());
}

// One client's unary calls in flight are capped: a burst beyond it is refused with the limit named,
// what was admitted is answered with the formula's rows, and the slots come back.
TEST(DaemonLimitsTest, UnaryCallsInFlightBeyondThePerClientCapAreRefusedNamingTheLimit) {
  testing::TempDir dir;
  ASSERT_EQ(RunCommand(std::string(ENGRAMCTL_PATH) + " pack create --preset demo-v1 --scale 0.002 --quiet --out " +
                       dir.path() + "/p")
                .first,
            0);
  const PackManifest m = *LoadPackManifest(dir.path() + "/p");
  Daemon daemon({"--pack", dir.path() + "/p", "--max-inflight-per-client", "2", "--max-batch-rows", "65536"},
                dir.path());
  ASSERT_TRUE(daemon.running());
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  auto stub = v1::Engram::NewStub(grpc::CreateCustomChannel("127.0.0.1:" + std::to_string(daemon.grpc_port()),
                                                            grpc::InsecureChannelCredentials(), args));
  const int tokens = 4096, heads = 16;
  std::vector<uint32_t> idx(tokens * heads);
  const auto& layout = m.FindLayer(1)->layout;
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<uint32_t>((i * 7919) % layout.head_rows[i % heads]);
  v1::LookupRequest request;
  request.set_table("demo");
  request.set_layer(1);
  request.set_num_tokens(tokens);
  request.set_indices(reinterpret_cast<const char*>(idx.data()), idx.size() * 4);
  std::vector<float> scratch(m.row.dim);
  std::vector<uint8_t> want(m.row.bytes);
  SyntheticRow(*m.synthetic_seed, 1, layout.head_offset[heads - 1] + idx.back(), m.row.dim, m.row.dtype,
               scratch.data(), want.data());
  int refused = 0, answered = 0;
  std::string message;
  for (int burst = 0; burst < 20 && refused == 0; ++burst) {  // 32 at once: the daemon serves 2 of them at a time
    grpc::CompletionQueue cq;
    struct Call {
      grpc::ClientContext context;
      v1::LookupResponse response;
      grpc::Status status;
      std::unique_ptr<grpc::ClientAsyncResponseReader<v1::LookupResponse>> reader;
    };
    std::vector<std::unique_ptr<Call>> calls;
    for (int i = 0; i < 32; ++i) {
      calls.push_back(std::make_unique<Call>());
      Call* c = calls.back().get();
      c->reader = stub->AsyncLookup(&c->context, request, &cq);
      c->reader->Finish(&c->response, &c->status, c);
    }
    for (size_t i = 0; i < calls.size(); ++i) {
      void* tag;
      bool ok;
      ASSERT_TRUE(cq.Next(&tag, &ok));
    }
    for (const auto& c : calls) {
      if (c->status.ok()) {
        ++answered;
        ASSERT_EQ(c->response.rows().size(), idx.size() * m.row.bytes);
        EXPECT_EQ(0, std::memcmp(c->response.rows().data() + (idx.size() - 1) * m.row.bytes, want.data(),
                                 m.row.bytes));
      } else {
        ASSERT_EQ(c->status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << c->status.error_message();
        ++refused;
        message = c->status.error_message();
      }
    }
  }
  EXPECT_GT(refused, 0) << "32 calls at once never met the cap of 2";
  EXPECT_GT(answered, 0);
  EXPECT_NE(message.find("--max-inflight-per-client 2"), std::string::npos) << message;
  v1::LookupResponse response;  // the slots are free again
  grpc::ClientContext context;
  EXPECT_TRUE(stub->Lookup(&context, request, &response).ok());
}

}  // namespace
}  // namespace engram
