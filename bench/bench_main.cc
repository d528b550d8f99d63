// engram-bench: load generator for engramd. Drives a target (in-process engine or a daemon over
// gRPC) with a workload for a fixed time from C threads, and prints rows/s, bytes/s and per-batch
// latency percentiles with the conditions beside them (--json: one line for scripts).
#include <grpcpp/grpcpp.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "bench/health.h"
#include "bench/percentile.h"
#include "bench/rocksdb_baseline.h"
#include "engram/client.h"
#include "engram/shm_client.h"
#include "bench/simulate.h"
#include "bench/socket_ceiling.h"
#include "engram/kernels/cpu_twin.h"
#include "bench/workload.h"
#include "engram/v1/engram.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "service/cli_flags.h"
#include "service/table_loader.h"
#include "tiering/cache/policy.h"
#include "tiering/cached_tier.h"
#include "tiering/dram_tier.h"
#include "tiering/engine.h"
#include "tiering/table.h"

namespace engram {
namespace {

constexpr char kUsage[] =
    "engram-bench: load tests for engramd.\n"
    "\n"
    "Usage:\n"
    "  engram-bench --target grpc://HOST:PORT --table NAME [workload flags]\n"
    "  engram-bench --target inproc --pack DIR [workload flags]\n"
    "  engram-bench compare --pack DIR --socket PATH --grpc HOST:PORT [workload flags]\n"
    "  engram-bench simulate --pack DIR --tokens FILE.i32 [--policy P ...] [--capacity 1%|10%|BYTES]\n"
    "  engram-bench module [--batch B --seq-len T --branches G --hidden D --embed M --threads N]\n"
    "  engram-bench health --metrics HOST:PORT [--idle N --path /readyz]\n"
    "  engram-bench socket [--bytes N --duration S]   (loopback TCP: the ceiling for gRPC replies)\n"
    "\n"
    "Each request is one batch: --batch-tokens tokens of one layer (layers taken in turn). The\n"
    "batches are generated before timing. With --target inproc the same engine engramd runs is\n"
    "called directly (no transport), and a plain memcpy gather of uniformly random rows over the\n"
    "same table, same threads and batch size, is measured right after as the DRAM ceiling.";

using Clock = std::chrono::steady_clock;

// What the bench drives. Lookup must be callable from `thread` concurrently with other threads.
class Target {
 public:
  virtual ~Target() = default;
  virtual absl::Status Lookup(int thread, const Batch& batch, std::vector<uint8_t>* out) = 0;
  virtual absl::Status Prefetch(int thread, const Batch& batch) = 0;
};

class InprocTarget final : public Target {
 public:
  InprocTarget(Engine* engine, const Table* table) : engine_(engine), table_(table) {}
  absl::Status Lookup(int, const Batch& batch, std::vector<uint8_t>* out) override {
    out->resize(batch.indices.size() * table_->row_bytes());
    return engine_->Lookup(*table_, batch.layer_id, batch.num_tokens, batch.indices, absl::MakeSpan(*out), nullptr);
  }
  absl::Status Prefetch(int, const Batch& batch) override {
    return engine_->Prefetch(*table_, batch.layer_id, batch.num_tokens, batch.indices).status();
  }

 private:
  Engine* engine_;
  const Table* table_;
};

// engramd over gRPC through libengram_client, as an engine would call it: one Client per thread.
class ClientTarget final : public Target {
 public:
  static absl::StatusOr<std::unique_ptr<ClientTarget>> Connect(const std::string& uri, const std::string& table,
                                                               int threads) {
    std::unique_ptr<ClientTarget> target(new ClientTarget());
    for (int i = 0; i < threads; ++i) {
      auto client = Client::Connect(uri);
      if (!client.ok()) return client.status();
      auto handle = (*client)->OpenTable(table);
      if (!handle.ok()) return handle.status();
      target->table_ = *handle;
      target->clients_.push_back(std::move(*client));
    }
    return target;
  }
  const TableHandle& table() const { return *table_; }
  absl::Status Lookup(int thread, const Batch& batch, std::vector<uint8_t>* out) override {
    out->resize(batch.indices.size() * table_->row_bytes());
    return clients_[thread]->Lookup(*table_, batch.layer_id, batch.num_tokens, batch.indices, absl::MakeSpan(*out));
  }
  absl::Status Prefetch(int thread, const Batch& batch) override {
    return clients_[thread]->Prefetch(*table_, batch.layer_id, batch.num_tokens, batch.indices);
  }

 private:
  std::vector<std::unique_ptr<Client>> clients_;
  std::shared_ptr<const TableHandle> table_;
};

// engramd over the shared-memory transport: one connection per thread.
class ShmTarget final : public Target {
 public:
  // With `mapped`, each thread maps the (resident) table and gathers from it itself.
  static absl::StatusOr<std::unique_ptr<ShmTarget>> Connect(const std::string& path, const std::string& table,
                                                            int threads, uint64_t data_bytes, bool mapped) {
    std::unique_ptr<ShmTarget> target(new ShmTarget());
    ShmConnectOptions options;
    options.data_bytes = data_bytes;
    for (int i = 0; i < threads; ++i) {
      auto c = ShmConnection::Connect(path, options);
      if (!c.ok()) return c.status();
      auto t = (*c)->OpenTable(table);
      if (!t.ok()) return t.status();
      if (mapped) {
        auto m = (*c)->MapTable(*t);
        if (!m.ok()) return m.status();
        target->mapped_.push_back(std::move(*m));
      }
      target->tables_.push_back(*t);
      target->connections_.push_back(std::move(*c));
    }
    return target;
  }
  ~ShmTarget() override { mapped_.clear(); }  // they report through their connections
  const RemoteTable& table() const { return tables_[0]; }
  // Rows are read where the daemon gathered them (LookupInPlace), as an engine would; mapped,
  // gathered here into the thread's buffer.
  absl::Status Lookup(int thread, const Batch& batch, std::vector<uint8_t>* out) override {
    if (!mapped_.empty()) {
      out->resize(batch.indices.size() * tables_[thread].row_bytes);
      return mapped_[thread]->Lookup(batch.layer_id, batch.num_tokens, batch.indices, absl::MakeSpan(*out));
    }
    return connections_[thread]->LookupInPlace(tables_[thread], batch.layer_id, batch.num_tokens, batch.indices).status();
  }
  absl::Status Prefetch(int thread, const Batch& batch) override {
    return connections_[thread]->Prefetch(tables_[thread], batch.layer_id, batch.num_tokens, batch.indices);
  }
  // Mapped: where the HBM tier is mapped ("none", "host", "cuda"), and the rows taken from its
  // slots so far, all threads and `layers` together.
  std::string HbmAccess() const {
    if (mapped_.empty()) return "none";
    switch (mapped_[0]->hbm_access()) {
      case MappedTable::HbmAccess::kHost: return "host";
      case MappedTable::HbmAccess::kCuda: return "cuda";
      default: return "none";
    }
  }
  uint64_t HbmRows(const std::vector<int>& layers) const {
    uint64_t rows = 0;
    for (const auto& m : mapped_) {
      for (int layer : layers) rows += m->hbm_rows_served(layer);
    }
    return rows;
  }

 private:
  std::vector<std::unique_ptr<ShmConnection>> connections_;
  std::vector<RemoteTable> tables_;
  std::vector<std::unique_ptr<MappedTable>> mapped_;
};

// The same rows from RocksDB (the baseline a user might pick instead).
class RocksDbTarget final : public Target {
 public:
  RocksDbTarget(std::unique_ptr<RocksDbRows> db, const Table* table) : db_(std::move(db)), table_(table) {}
  absl::Status Lookup(int, const Batch& batch, std::vector<uint8_t>* out) override {
    const int layer_index = table_->hasher().LayerIndex(batch.layer_id);
    const auto& layout = table_->hasher().layers()[layer_index];
    const int heads = table_->heads();
    std::vector<uint64_t> rows(batch.indices.size());
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = layout.head_offset[i % heads] + batch.indices[i];
    out->resize(rows.size() * table_->row_bytes());
    return db_->Read(layer_index, rows, out->data());
  }
  absl::Status Prefetch(int, const Batch&) override { return absl::OkStatus(); }

 private:
  std::unique_ptr<RocksDbRows> db_;
  const Table* table_;
};

struct RunResult {
  uint64_t requests = 0, rows = 0, errors = 0;
  double seconds = 0;
  std::vector<double> latencies_us;
  std::string first_error;
};

// Runs `fn(thread, i)` from `threads` threads for `duration_s`; each call is one timed batch.
RunResult RunTimed(int threads, double duration_s, uint64_t rows_per_request,
                   const std::function<absl::Status(int, uint64_t)>& fn) {
  RunResult result;
  std::vector<std::vector<double>> lat(threads);
  std::atomic<uint64_t> errors{0};
  std::mutex error_mu;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(duration_s));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      for (uint64_t i = t; Clock::now() < end; i += threads) {
        const auto t0 = Clock::now();
        const absl::Status s = fn(t, i);
        const auto t1 = Clock::now();
        if (!s.ok()) {
          if (errors.fetch_add(1) == 0) {
            std::lock_guard<std::mutex> lock(error_mu);
            result.first_error = std::string(s.message());
          }
          continue;
        }
        lat[t].push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      }
    });
  }
  for (auto& th : pool) th.join();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (auto& v : lat) result.latencies_us.insert(result.latencies_us.end(), v.begin(), v.end());
  std::sort(result.latencies_us.begin(), result.latencies_us.end());
  result.requests = result.latencies_us.size();
  result.rows = result.requests * rows_per_request;
  result.errors = errors.load();
  return result;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (absl::StartsWith(line, "model name")) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

int Simulate(int argc, char** argv) {
  std::string pack, tokens_path, capacity = "10%", warm_path;
  std::vector<std::string> policies;
  int64_t seq_len = 4096, shards = 16, replays = 1;
  bool json = false, reuse = false;
  FlagSet flags("engram-bench simulate",
                "engram-bench simulate: replays a token trace through the table's hashing and the daemon's own\n"
                "cache code, and prints each policy's hit ratio (share of row accesses served from the cache)\n"
                "beside hindsight references: static-topk (the most used rows of this very trace) and belady\n"
                "(optimal replacement with bypass). Policies: lru, s3fifo (the daemon's default), tinylfu\n"
                "(TinyLFU admission in front of S3-FIFO), hbm (the HBM tier's residency planner: decayed\n"
                "counts, a batch of promotions between requests of 65,536 accesses; its hits are accesses\n"
                "that do not cross PCIe: resident rows, or rows the same request already brings over),\n"
                "hbm-1inN (the same, counting about one access in N, as engramd does above its sample\n"
                "budget), static-topk, belady, oracle-admission\n"
                "(the default policy, but rows never used again are not admitted: what perfect admission is\n"
                "worth); 'all' runs every one (hbm-1in64 for the sampled planner). --reuse adds where the\n"
                "trace's reuse comes from: per n-gram order, reuses within a sequence and reuses of a row by a\n"
                "different n-gram (hash collisions, which only hindsight can foresee). --warm-trace fills the DRAM\n"
                "policies' caches (not hbm, not the hindsight references) from another corpus first.");
  flags.String("pack", &pack, "pack directory (its manifest gives the layout; rows are not read)");
  flags.String("tokens", &tokens_path, "raw token ids, little-endian int32");
  flags.StringList("policy", &policies, "policy to simulate (default: the daemon's, s3fifo)");
  flags.String("capacity", &capacity, "cache size: N% of each layer's rows, or bytes for the table (e.g. 512M)");
  flags.Int("seq-len", &seq_len, "the trace is hashed as sequences of this many tokens");
  flags.Int("shards", &shards, "cache shards, as in the daemon");
  flags.Int("replays", &replays,
            "play the hashed trace this many times in a row, as one long trace (1..64); the last pass's hit "
            "ratio is printed too");
  flags.Bool("reuse", &reuse, "also print the trace's reuse breakdown per n-gram order");
  flags.String("warm-trace", &warm_path,
               "first warm each DRAM cache with this other trace's most used rows (as engramd --warm-from its profile)");
  flags.Bool("json", &json, "print one JSON object on one line");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  auto fail = [](const absl::Status& st) {
    std::fprintf(stderr, "engram-bench simulate: %s\n", std::string(st.message()).c_str());
    return 1;
  };
  if (pack.empty() || tokens_path.empty()) return fail(absl::InvalidArgumentError("--pack and --tokens are required"));
  if (policies.empty()) policies = {std::string(kDefaultPolicy)};
  if (policies.size() == 1 && policies[0] == "all") {
    policies = {"lru", "s3fifo", "tinylfu", "hbm", "hbm-1in64", "static-topk", "oracle-admission", "belady"};
  }
  auto manifest = LoadPackManifest(pack);
  if (!manifest.ok()) return fail(manifest.status());
  auto tokens = ReadInt32File(tokens_path);
  if (!tokens.ok()) return fail(tokens.status());
  SimulationOptions options;
  options.policies = policies;
  options.capacity = capacity;
  options.seq_len = static_cast<uint32_t>(std::max<int64_t>(1, seq_len));
  options.shards = static_cast<int>(shards);
  options.replays = static_cast<int>(replays);
  options.reuse_breakdown = reuse;
  if (!warm_path.empty()) {
    auto warm_tokens = ReadInt32File(warm_path);
    if (!warm_tokens.ok()) {
      return fail(absl::Status(warm_tokens.status().code(), absl::StrCat("--warm-trace: ", warm_tokens.status().message())));
    }
    options.warm_tokens = std::move(*warm_tokens);
  }
  auto report = SimulateCache(*manifest, *tokens, options);
  if (!report.ok()) return fail(report.status());
  nlohmann::json out = {{"tool", "engram-bench"}, {"mode", "simulate"}, {"table", manifest->name},
                        {"trace", tokens_path}, {"tokens", tokens->size()}, {"capacity", capacity},
                        {"capacity_rows", report->capacity_rows}, {"table_rows", report->table_rows},
                        {"accesses", report->accesses}, {"shards", shards}, {"seq_len", seq_len},
                        {"replays", replays}};
  if (!warm_path.empty()) out["warm_trace"] = warm_path;
  if (report->results.size() == 1) {
    out["policy"] = report->results[0].policy;
    out["hit_ratio"] = report->results[0].hit_ratio();
  } else {
    for (const auto& r : report->results) out["hit_ratio"][r.policy] = r.hit_ratio();
  }
  for (const auto& r : report->results) {  // replays: each policy once it has settled, shaped as hit_ratio
    if (r.last_pass_accesses == 0) continue;
    if (report->results.size() == 1) {
      out["last_pass_hit_ratio"] = r.last_pass_hit_ratio();
    } else {
      out["last_pass_hit_ratio"][r.policy] = r.last_pass_hit_ratio();
    }
  }
  for (const ReuseBreakdown& r : report->reuse) {
    out["reuse"].push_back({{"order", r.order}, {"accesses", r.accesses}, {"reuses", r.reuses},
                            {"in_sequence", r.in_sequence}, {"other_ngram", r.other_ngram},
                            {"first_reuses", r.first_reuses}, {"first_other_ngram", r.first_other_ngram}});
  }
  if (json) {
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("engram-bench simulate  table=%s trace=%s tokens=%zu capacity=%s (%llu of %llu rows, %.2f%%)\n",
              manifest->name.c_str(), tokens_path.c_str(), tokens->size(), capacity.c_str(),
              static_cast<unsigned long long>(report->capacity_rows), static_cast<unsigned long long>(report->table_rows),
              100.0 * report->capacity_rows / report->table_rows);
  if (replays > 1) std::printf("  the hashed trace played %lld times in a row\n", static_cast<long long>(replays));
  if (!warm_path.empty()) std::printf("  DRAM caches warmed first from the most used rows of %s\n", warm_path.c_str());
  std::printf("  %-16s %s\n", "policy", replays > 1 ? "hit ratio (of row accesses), all passes / the last pass"
                                                      : "hit ratio (of row accesses)");
  for (const auto& r : report->results) {
    if (r.last_pass_accesses > 0) {
      std::printf("  %-16s %.4f / %.4f\n", r.policy.c_str(), r.hit_ratio(), r.last_pass_hit_ratio());
    } else {
      std::printf("  %-16s %.4f\n", r.policy.c_str(), r.hit_ratio());
    }
  }
  if (!report->reuse.empty()) {
    std::printf("  reuse (one pass): an access is a reuse when its row was accessed before\n");
    std::printf("  %-6s %10s %10s %22s %18s %s\n", "order", "accesses", "reuses", "in the same sequence",
                "by another n-gram", "second accesses (by another n-gram)");
    auto share = [](uint64_t part, uint64_t whole) { return whole ? 100.0 * part / whole : 0.0; };
    for (const ReuseBreakdown& r : report->reuse) {
      std::printf("  %-6d %10llu %10llu %21.1f%% %17.1f%% %llu (%.1f%%)\n", r.order,
                  static_cast<unsigned long long>(r.accesses), static_cast<unsigned long long>(r.reuses),
                  share(r.in_sequence, r.reuses), share(r.other_ngram, r.reuses),
                  static_cast<unsigned long long>(r.first_reuses), share(r.first_other_ngram, r.first_reuses));
    }
  }
  return 0;
}

// `engram-bench module`: the Engram module on the CPU twin (GEMMs, gates, ShortConv), timed on
// random weights and inputs of a given shape; bench/torch_module.py times PyTorch the same way.
int Module(int argc, char** argv) {
  int64_t batch = 1, seq_len = 512, branches = 4, hidden = 0, embed = 0, dilation = 3, threads = 2;
  double duration = 5;
  bool json = false;
  std::string variant = "demo";
  FlagSet flags("engram-bench module",
                "engram-bench module: times an Engram module on the CPU twin with random weights and inputs:\n"
                "  demo   Y = V + ShortConv(V) from embeddings E and hidden states H (defaults: the reference\n"
                "         demo's sizes, D=1024, M=1024)\n"
                "  dsv41  DeepSeek-V4.1's: h_k += g_k * v with one fused projection (defaults: V4.1-Flash's\n"
                "         sizes, 4 streams, D=5120, M=6144 = 24 heads x 256)\n"
                "Compare with bench/torch_module.py (PyTorch, same shapes and threads): bench/run_module.sh.");
  flags.String("variant", &variant, "demo or dsv41");
  flags.Int("batch", &batch, "B");
  flags.Int("seq-len", &seq_len, "T");
  flags.Int("branches", &branches, "G (hyper-connection branches)");
  flags.Int("hidden", &hidden, "D");
  flags.Int("embed", &embed, "M (heads x per-head dim)");
  flags.Int("dilation", &dilation, "ShortConv dilation (max_ngram)");
  flags.Int("threads", &threads, "CPU threads (OpenBLAS and the twin's loops)");
  flags.Double("duration", &duration, "seconds to run");
  flags.Bool("json", &json, "print one JSON object on one line");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (variant != "demo" && variant != "dsv41") {
    std::fprintf(stderr, "engram-bench module: --variant '%s' is not demo or dsv41\n", variant.c_str());
    return 2;
  }
  if (hidden == 0) hidden = variant == "dsv41" ? 5120 : 1024;
  if (embed == 0) embed = variant == "dsv41" ? 6144 : 1024;
  if (batch < 1 || seq_len < 1 || branches < 1 || hidden < 1 || embed < 1 || dilation < 1 || threads < 1) {
    std::fprintf(stderr, "engram-bench module: every size and --threads must be at least 1\n");
    return 2;
  }
  const int G = static_cast<int>(branches), D = static_cast<int>(hidden), M = static_cast<int>(embed);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto random = [&](size_t n, float scale, float mean) {
    std::vector<float> v(n);
    for (float& x : v) x = mean + scale * normal(rng);
    return v;
  };
  const int64_t tokens = batch * seq_len;
  // Times `call` once untimed (allocations, thread start-up), then as often as fits the duration.
  auto time_calls = [&](auto call) -> absl::StatusOr<std::vector<double>> {
    if (absl::Status s = call(); !s.ok()) return s;
    std::vector<double> seconds;
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < duration ||
           seconds.size() < 3) {
      const auto t0 = std::chrono::steady_clock::now();
      (void)call();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(seconds.begin(), seconds.end());
    return seconds;
  };
  if (variant == "dsv41") {
    kernels::Dsv41Weights w;
    w.streams = G;
    w.hidden = D;
    w.embed = M;
    w.eps = 1e-20f;
    w.wkv = random(static_cast<size_t>(G + 1) * D * M, 1.0f / std::sqrt(static_cast<float>(M)), 0.0f);
    w.q_weight = random(static_cast<size_t>(G) * D, 0.1f, 1.0f);
    w.k_weight = random(static_cast<size_t>(G) * D, 0.1f, 1.0f);
    const auto E = random(static_cast<size_t>(tokens * M), 1.0f, 0.0f);
    const auto H = random(static_cast<size_t>(tokens * G * D), 1.0f, 0.0f);
    std::vector<float> Y(H.size());
    const std::vector<uint8_t> dead(static_cast<size_t>(tokens), 0);
    auto seconds = time_calls([&] {
      return kernels::Dsv41ForwardCpu(w, tokens, E, dead, H, absl::MakeSpan(Y), static_cast<int>(threads));
    });
    if (!seconds.ok()) {
      std::fprintf(stderr, "engram-bench module: %s\n", std::string(seconds.status().message()).c_str());
      return 1;
    }
    const double median = (*seconds)[seconds->size() / 2];
    nlohmann::json out = {{"tool", "engram-bench"}, {"mode", "module"}, {"variant", "dsv41"},
                          {"impl", "cpu-twin"},     {"batch", batch},   {"seq_len", seq_len},
                          {"streams", G},           {"hidden", D},      {"embed", M},
                          {"threads", threads},     {"calls", seconds->size()}, {"median_ms", median * 1e3},
                          {"tokens_per_s", static_cast<double>(tokens) / median}};
    if (json) {
      std::printf("%s\n", out.dump().c_str());
    } else {
      std::printf("engram-bench module  dsv41 cpu-twin B=%lld T=%lld K=%d D=%d M=%d threads=%lld: %.3f ms per call "
                  "(median of %zu), %.4g tokens/s\n",
                  static_cast<long long>(batch), static_cast<long long>(seq_len), G, D, M,
                  static_cast<long long>(threads), median * 1e3, seconds->size(),
                  static_cast<double>(tokens) / median);
    }
    return 0;
  }
  kernels::EngramWeights w;
  w.branches = G;
  w.hidden = D;
  w.embed = M;
  w.projection = random(static_cast<size_t>(G + 1) * D * M, 1.0f / std::sqrt(static_cast<float>(M)), 0.0f);
  w.projection_bias = random(static_cast<size_t>(G + 1) * D, 0.1f, 0.0f);
  w.key_norm = random(static_cast<size_t>(G) * D, 0.1f, 1.0f);
  w.query_norm = random(static_cast<size_t>(G) * D, 0.1f, 1.0f);
  w.conv_norm = random(static_cast<size_t>(G) * D, 0.1f, 1.0f);
  w.conv_taps = random(static_cast<size_t>(G) * D * kernels::kShortConvTaps, 0.5f, 0.0f);
  const auto E = random(static_cast<size_t>(tokens * M), 1.0f, 0.0f);
  const auto H = random(static_cast<size_t>(tokens * G * D), 1.0f, 0.0f);
  std::vector<float> Y(H.size());
  const kernels::ForwardShape shape{static_cast<int>(batch), static_cast<int>(seq_len), static_cast<int>(dilation)};
  // One untimed call (allocations, thread start-up), then as many as fit the duration.
  if (absl::Status s = kernels::EngramForwardCpu(w, shape, E, H, absl::MakeSpan(Y), static_cast<int>(threads)); !s.ok()) {
    std::fprintf(stderr, "engram-bench module: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  std::vector<double> seconds;
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < duration ||
         seconds.size() < 3) {
    const auto t0 = std::chrono::steady_clock::now();
    (void)kernels::EngramForwardCpu(w, shape, E, H, absl::MakeSpan(Y), static_cast<int>(threads));
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];
  nlohmann::json out = {{"tool", "engram-bench"}, {"mode", "module"}, {"impl", "cpu-twin"},
                        {"batch", batch}, {"seq_len", seq_len}, {"branches", G}, {"hidden", D}, {"embed", M},
                        {"dilation", dilation}, {"threads", threads}, {"calls", seconds.size()},
                        {"median_ms", median * 1e3}, {"tokens_per_s", static_cast<double>(tokens) / median}};
  if (json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("engram-bench module  cpu-twin B=%lld T=%lld G=%d D=%d M=%d threads=%lld: %.3f ms per call (median of "
                "%zu), %.4g tokens/s\n",
                static_cast<long long>(batch), static_cast<long long>(seq_len), G, D, M,
                static_cast<long long>(threads), median * 1e3, seconds.size(), static_cast<double>(tokens) / median);
  }
  return 0;
}

// Runs this binary with `args` and returns its standard output (exit status in *status).
std::string RunSelf(const std::vector<std::string>& args, int* status) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) {
    *status = -1;
    return "";
  }
  const pid_t child = fork();
  if (child == 0) {
    dup2(pipe_fds[1], 1);
    close(pipe_fds[0]);
    close(pipe_fds[1]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  close(pipe_fds[1]);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(pipe_fds[0], buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
  close(pipe_fds[0]);
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  *status = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : -1;
  return out;
}

// `engram-bench compare`: the same workload in-process, over shared memory and over gRPC, side by side.
int Compare(int argc, char** argv) {
  std::string pack, socket, grpc_address, table;
  bool json = false;
  std::vector<std::string> passthrough;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](std::string* out) {
      if (i + 1 >= argc) return false;
      *out = argv[++i];
      return true;
    };
    if (a == "--help" || a == "-h") {
      std::puts("engram-bench compare --pack DIR --socket PATH --grpc HOST:PORT [--table NAME] [bench flags]\n\n"
                "Runs the same workload (every other flag is passed on: --workload, --batch-tokens, --duration,\n"
                "...) in-process on DIR, then against a running engramd serving it over shared memory (--socket),\n"
                "gathering from the table mapped read-only (--socket, --mapped) and over gRPC (--grpc), and\n"
                "prints them side by side (--json: one object).");
      return 0;
    }
    if (a == "--pack" ? !value(&pack) : a == "--socket" ? !value(&socket) : a == "--grpc" ? !value(&grpc_address)
        : a == "--table" ? !value(&table) : false) {
      std::fprintf(stderr, "engram-bench compare: %s needs a value\n", a.c_str());
      return 2;
    }
    if (a == "--pack" || a == "--socket" || a == "--grpc" || a == "--table") continue;
    if (a == "--json") {
      json = true;
      continue;
    }
    passthrough.push_back(a);
  }
  if (pack.empty() || socket.empty() || grpc_address.empty()) {
    std::fprintf(stderr, "engram-bench compare needs --pack, --socket and --grpc (see --help)\n");
    return 2;
  }
  if (table.empty()) {
    auto m = LoadPackManifest(pack);
    if (!m.ok()) {
      std::fprintf(stderr, "engram-bench compare: %s\n", std::string(m.status().message()).c_str());
      return 1;
    }
    table = m->name;
  }
  const std::vector<std::pair<std::string, std::vector<std::string>>> runs = {
      {"inproc", {"--target", "inproc", "--pack", pack, "--no-ceiling"}},
      {"shm", {"--target", "unix://" + socket, "--table", table}},
      {"mapped", {"--target", "unix://" + socket, "--table", table, "--mapped"}},
      {"grpc", {"--target", "grpc://" + grpc_address, "--table", table}}};
  nlohmann::json all = nlohmann::json::object();
  for (const auto& [name, target_args] : runs) {
    std::vector<std::string> args = {"engram-bench", "--json"};
    args.insert(args.end(), target_args.begin(), target_args.end());
    args.insert(args.end(), passthrough.begin(), passthrough.end());
    int status = 0;
    const std::string out = RunSelf(args, &status);
    if (status != 0) {
      std::fprintf(stderr, "engram-bench compare: the %s run failed (exit %d)\n", name.c_str(), status);
      return 1;
    }
    all[name] = nlohmann::json::parse(out);
  }
  if (json) {
    std::printf("%s\n", all.dump().c_str());
    return 0;
  }
  const double base = all["inproc"]["rows_per_s"].get<double>();
  std::printf("engram-bench compare  table=%s workload=%s batch_tokens=%lld\n", table.c_str(),
              all["inproc"]["workload"].get<std::string>().c_str(),
              static_cast<long long>(all["inproc"]["batch_tokens"].get<int64_t>()));
  std::printf("  %-8s %14s %12s %12s %12s\n", "target", "rows/s", "p50 us", "p99 us", "vs inproc");
  for (const char* name : {"inproc", "shm", "mapped", "grpc"}) {
    const auto& r = all[name];
    std::printf("  %-8s %14.4g %12.1f %12.1f %11.0f%%\n", name, r["rows_per_s"].get<double>(), r["p50_us"].get<double>(),
                r["p99_us"].get<double>(), 100 * r["rows_per_s"].get<double>() / base);
  }
  return 0;
}

int Main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "simulate") return Simulate(argc, argv);
  if (argc > 1 && std::string(argv[1]) == "module") return Module(argc, argv);
  if (argc > 1 && std::string(argv[1]) == "compare") return Compare(argc, argv);
  if (argc > 1 && std::string(argv[1]) == "health") return HealthBench(argc, argv);
  if (argc > 1 && std::string(argv[1]) == "socket") return SocketCeiling(argc, argv);
  std::string target = "inproc", table_name, pack, workload_text = "zipf:1.0";
  int64_t batch_tokens = 4096, concurrency = 1, worker_threads = -1, seed = 1, max_batches = 64;
  double duration = 5;
  double warmup = 0;
  bool json = false, ceiling = true, mapped = false;
  std::string dedup = "auto";
  FlagSet flags("engram-bench", kUsage);
  flags.String("target", &target,
               "grpc://HOST:PORT, unix:///SOCKET (shared memory), inproc, or rocksdb (the same rows in RocksDB via MultiGet, block cache\n"
               "                              of --dram-budget, direct reads: the baseline)");
  flags.String("table", &table_name, "table name (gRPC; inproc uses the pack's)");
  flags.String("pack", &pack, "pack directory (inproc, rocksdb)");
  std::string rocksdb_dir = "/tmp/engram-bench-rocksdb";
  flags.String("rocksdb-dir", &rocksdb_dir,
               "--target rocksdb: where the baseline database lives (loaded from the pack on first use)");
  flags.String("workload", &workload_text,
               "zipf:ALPHA (per-head Zipf over rows; zipf:0 is uniform) or trace:FILE.i32 (raw token ids)");
  flags.Int("batch-tokens", &batch_tokens, "tokens per request");
  flags.Int("concurrency", &concurrency, "client threads, each with one request in flight");
  flags.Double("duration", &duration, "seconds to run each measurement");
  flags.Double("warmup", &warmup,
               "seconds of the same requests before measuring, not timed (a fresh mapping's first-touch page\n"
               "faults, a cold cache or HBM tier)");
  flags.Int("worker-threads", &worker_threads, "inproc engine's gather helpers (-1: cores - 1)");
  flags.Int("batches", &max_batches, "distinct batches generated before timing (cycled)");
  flags.Int("seed", &seed, "workload seed");
  flags.String("dedup", &dedup, "inproc: auto (the tier decides), on or off: dedup each batch piece before reading");
  flags.Bool("ceiling", &ceiling, "inproc: also measure the plain memcpy gather ceiling");
  flags.Bool("mapped", &mapped,
             "unix://: map the (resident) table read-only and gather in this process, no round trip");
  flags.Bool("json", &json, "print one JSON object on one line instead of text");
  double compute_window_us = 0;
  bool prefetch_layers = false;
  flags.Double("compute-window-us", &compute_window_us,
               "step mode: each step looks up every layer in turn with this many microseconds of simulated\n"
               "                              model compute after each layer, and reports the stall fraction (time\n"
               "                              waiting for rows / step time)");
  flags.Bool("prefetch-layers", &prefetch_layers, "step mode: prefetch every later layer's rows when a step starts");
  TierFlags tier_flags;
  tier_flags.Register(flags);  // inproc: the daemon's own tier flags
  ParseOrExit(flags, argc, argv, 1, nullptr);
  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "engram-bench: %s\n", std::string(s.message()).c_str());
    return 1;
  };
  if (batch_tokens < 1 || concurrency < 1 || duration <= 0 || max_batches < 1) {
    return fail(absl::InvalidArgumentError("--batch-tokens, --concurrency, --duration, --batches must be positive"));
  }
  if (duration > 3600) return fail(absl::InvalidArgumentError("--duration is capped at 3600 seconds"));
  auto spec = ParseWorkload(workload_text);
  if (!spec.ok()) return fail(spec.status());

  std::unique_ptr<Engine> engine;
  const Table* table = nullptr;
  std::unique_ptr<Target> driver;
  const ShmTarget* shm_driver = nullptr;  // when the target is unix://
  std::shared_ptr<const TableHandle> remote_table;
  const NgramHasher* hasher = nullptr;
  int64_t row_bytes = 0;
  if (target == "inproc" || target == "rocksdb") {
    if (pack.empty()) return fail(absl::InvalidArgumentError("--target inproc needs --pack DIR"));
    EngineOptions options;
    options.worker_threads = static_cast<int>(worker_threads);
    auto parsed_dedup = ParseDedup(dedup);
    if (!parsed_dedup.ok()) return fail(parsed_dedup.status());
    options.dedup = *parsed_dedup;
    engine = std::make_unique<Engine>(options);
    auto placement = tier_flags.ToPlacement();
    if (!placement.ok()) return fail(placement.status());
    if (absl::Status s = LoadTables({pack}, *placement, engine.get()); !s.ok()) return fail(s);
    table = engine->tables()[0];
    table_name = table->name();
    hasher = &table->hasher();
    row_bytes = table->row_bytes();
    if (target == "rocksdb") {
      uint64_t cache_bytes = 0;
      if (tier_flags.dram_budget != "all") {
        if (absl::Status s = ParseBytes(tier_flags.dram_budget, &cache_bytes); !s.ok()) return fail(s);
      } else {
        cache_bytes = table->manifest().total_bytes();
      }
      auto db = RocksDbRows::OpenOrLoad(table->manifest(), pack, rocksdb_dir, cache_bytes);
      if (!db.ok()) return fail(db.status());
      driver = std::make_unique<RocksDbTarget>(std::move(*db), table);
    } else {
      driver = std::make_unique<InprocTarget>(engine.get(), table);
    }
  } else if (absl::StartsWith(target, "unix://")) {
    if (table_name.empty()) return fail(absl::InvalidArgumentError("--target unix://... needs --table NAME"));
    const uint64_t data_bytes = static_cast<uint64_t>(batch_tokens) * 64 * 300 + (1 << 20);  // generous
    auto shm_target = ShmTarget::Connect(target.substr(7), table_name, static_cast<int>(concurrency), data_bytes, mapped);
    if (!shm_target.ok()) return fail(shm_target.status());
    auto handle = TableHandle::FromTableInfo((*shm_target)->table().table_info);
    if (!handle.ok()) return fail(handle.status());
    remote_table = std::move(*handle);
    hasher = &remote_table->hasher();
    row_bytes = remote_table->row_bytes();
    shm_driver = shm_target->get();
    driver = std::move(*shm_target);
  } else if (absl::StartsWith(target, "grpc://")) {
    if (table_name.empty()) return fail(absl::InvalidArgumentError("--target grpc://... needs --table NAME"));
    auto client_target = ClientTarget::Connect(target, table_name, static_cast<int>(concurrency));
    if (!client_target.ok()) {
      return fail(absl::UnavailableError(absl::StrCat(target, ": ", client_target.status().message())));
    }
    hasher = &(*client_target)->table().hasher();
    row_bytes = (*client_target)->table().row_bytes();
    driver = std::move(*client_target);
  } else {
    return fail(absl::InvalidArgumentError(absl::StrCat("--target '", target, "' is not inproc or grpc://HOST:PORT")));
  }

  auto batches = MakeBatches(*spec, *hasher, static_cast<uint32_t>(batch_tokens), static_cast<int>(max_batches),
                             static_cast<uint64_t>(seed));
  if (!batches.ok()) return fail(batches.status());
  const int heads = hasher->heads_per_layer();
  const uint64_t rows_per_request = static_cast<uint64_t>(batch_tokens) * heads;
  const int num_layers = static_cast<int>(hasher->layers().size());
  const bool step_mode = compute_window_us > 0 || prefetch_layers;
  if (step_mode && batches->size() % num_layers != 0) batches->resize(batches->size() / num_layers * num_layers);
  if (batches->empty()) return fail(absl::InvalidArgumentError("too few batches for one step over every layer"));
  std::vector<std::vector<uint8_t>> outs(concurrency);
  // One untimed request per thread: connections up, buffers sized.
  for (int t = 0; t < concurrency; ++t) {
    if (absl::Status s = driver->Lookup(t, (*batches)[t % batches->size()], &outs[t]); !s.ok()) return fail(s);
  }
  // Device reads during the timed run (inproc, NVMe-backed tables).
  auto nvme_reads = [&]() -> uint64_t {
    uint64_t n = 0;
    if (table == nullptr) return 0;
    for (const auto& layer : table->layers()) {
      if (const NvmeReader* nvme = layer.tier->nvme()) n += nvme->stats().reads.load();
    }
    return n;
  };
  // Step mode: one timed call is a whole step; the time spent inside lookups is the stall.
  std::vector<double> stall_us(concurrency, 0), compute_us(concurrency, 0);
  std::vector<std::vector<double>> layer_stall_us(concurrency, std::vector<double>(num_layers, 0.0));
  const size_t steps = batches->size() / num_layers;
  auto run_step = [&](int t, uint64_t i) -> absl::Status {
    const size_t first = (i % steps) * num_layers;
    if (prefetch_layers) {
      for (int l = 1; l < num_layers; ++l) {
        if (absl::Status s = driver->Prefetch(t, (*batches)[first + l]); !s.ok()) return s;
      }
    }
    for (int l = 0; l < num_layers; ++l) {
      const auto t0 = Clock::now();
      if (absl::Status s = driver->Lookup(t, (*batches)[first + l], &outs[t]); !s.ok()) return s;
      const double waited = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      stall_us[t] += waited;
      layer_stall_us[t][l] += waited;
      const auto c0 = Clock::now();
      std::this_thread::sleep_for(std::chrono::duration<double, std::micro>(compute_window_us));
      compute_us[t] += std::chrono::duration<double, std::micro>(Clock::now() - c0).count();
    }
    return absl::OkStatus();
  };
  if (warmup > 0) {
    RunResult warm;
    if (step_mode) {
      warm = RunTimed(static_cast<int>(concurrency), warmup, rows_per_request * num_layers, run_step);
      std::fill(stall_us.begin(), stall_us.end(), 0.0);
      for (auto& per_layer : layer_stall_us) std::fill(per_layer.begin(), per_layer.end(), 0.0);
      std::fill(compute_us.begin(), compute_us.end(), 0.0);
    } else {
      warm = RunTimed(static_cast<int>(concurrency), warmup, rows_per_request,
                      [&](int t, uint64_t i) { return driver->Lookup(t, (*batches)[i % batches->size()], &outs[t]); });
    }
    if (warm.errors > 0) {
      std::fprintf(stderr, "engram-bench: %llu errors during the warm-up, the first: %s\n",
                   static_cast<unsigned long long>(warm.errors), warm.first_error.c_str());
    }
  }
  const uint64_t nvme_reads_before = nvme_reads();
  const uint64_t hbm_rows_before =
      shm_driver != nullptr && mapped ? shm_driver->HbmRows(remote_table->layer_ids()) : 0;
  const RunResult run = step_mode
      ? RunTimed(static_cast<int>(concurrency), duration, rows_per_request * num_layers, run_step)
      : RunTimed(static_cast<int>(concurrency), duration, rows_per_request, [&](int t, uint64_t i) {
          return driver->Lookup(t, (*batches)[i % batches->size()], &outs[t]);
        });

  // The ceiling: plain gathers of uniformly random rows of the same layers, same threads and
  // batch size (the memory system's limit for this table), and of the workload's own rows.
  RunResult ceiling_run, same_rows_run;
  const bool measure_ceiling = ceiling && target == "inproc" && table != nullptr && table->resident();
  if (measure_ceiling) {
    std::vector<const RowTier*> tiers;
    std::vector<std::vector<uint64_t>> uniform_rows, workload_rows;
    std::mt19937_64 rng(static_cast<uint64_t>(seed) + 99);
    for (const auto& b : *batches) {
      const Table::Layer* layer = table->FindLayer(b.layer_id);
      tiers.push_back(layer->tier.get());
      std::uniform_int_distribution<uint64_t> any_row(0, layer->tier->total_rows() - 1);
      std::vector<uint64_t> u(rows_per_request), w(rows_per_request);
      const auto& layout = layer->pack_layer->layout;
      for (uint64_t i = 0; i < rows_per_request; ++i) {
        u[i] = any_row(rng);
        w[i] = layout.head_offset[i % heads] + b.indices[i];
      }
      uniform_rows.push_back(std::move(u));
      workload_rows.push_back(std::move(w));
    }
    // Like an engine lookup, each request's rows are split over the same number of threads.
    WorkerPool pool(engine->options().worker_threads >= 0
                        ? engine->options().worker_threads
                        : std::max(0, static_cast<int>(std::thread::hardware_concurrency()) - 1));
    auto gather = [&](const std::vector<std::vector<uint64_t>>& rows_of, int t, uint64_t i) {
      const size_t k = i % rows_of.size();
      const std::vector<uint64_t>& rows = rows_of[k];
      const uint8_t* base = tiers[k]->resident_rows();
      uint8_t* out = outs[t].data();
      const size_t piece = engine->options().rows_per_piece;
      const int pieces = static_cast<int>((rows.size() + piece - 1) / piece);
      pool.ParallelFor(pieces, [&](int p) {
        const size_t begin = p * piece, end = std::min(rows.size(), begin + piece);
        for (size_t r = begin; r < end; ++r) {
          std::memcpy(out + r * row_bytes, base + rows[r] * row_bytes, static_cast<size_t>(row_bytes));
        }
      });
      return absl::OkStatus();
    };
    ceiling_run = RunTimed(static_cast<int>(concurrency), duration, rows_per_request,
                           [&](int t, uint64_t i) { return gather(uniform_rows, t, i); });
    same_rows_run = RunTimed(static_cast<int>(concurrency), duration, rows_per_request,
                             [&](int t, uint64_t i) { return gather(workload_rows, t, i); });
  }

  const double rows_per_s = run.rows / run.seconds;
  nlohmann::json out = {
      {"tool", "engram-bench"},
      {"target", target.substr(0, target.find("://") == std::string::npos ? target.size() : target.find("://"))},
      {"table", table_name},
      {"mapped", mapped},
      {"workload", spec->text},
      {"batch_tokens", batch_tokens},
      {"heads", heads},
      {"rows_per_batch", rows_per_request},
      {"row_bytes", row_bytes},
      {"concurrency", concurrency},
      {"worker_threads", worker_threads},
      {"dedup", dedup},
      {"dram_budget", tier_flags.dram_budget},
      {"cache_policy", tier_flags.cache_policy},
      {"nvme_queue_depth", tier_flags.nvme_queue_depth},
      {"duration_s", run.seconds},
      {"warmup_s", warmup},
      {"requests", run.requests},
      {"errors", run.errors},
      {"rows_per_s", rows_per_s},
      {"bytes_per_s", rows_per_s * row_bytes},
      {"tokens_per_s", rows_per_s / heads},
      {"p50_us", PercentileOfSorted(run.latencies_us, 0.50)},
      {"p90_us", PercentileOfSorted(run.latencies_us, 0.90)},
      {"p99_us", PercentileOfSorted(run.latencies_us, 0.99)},
      {"p999_us", PercentileOfSorted(run.latencies_us, 0.999)},
      {"cpus", std::thread::hardware_concurrency()},
      {"cpu_model", CpuModel()},
  };
  if (shm_driver != nullptr && mapped) {
    // The mapped gather's HBM share: rows it took from the tier's slots during the timed run.
    out["hbm"] = shm_driver->HbmAccess();
    out["hbm_rows_share"] =
        run.rows > 0 ? static_cast<double>(shm_driver->HbmRows(remote_table->layer_ids()) - hbm_rows_before) / run.rows
                     : 0.0;
  }
  if (measure_ceiling) {
    out["ceiling_rows_per_s"] = ceiling_run.rows / ceiling_run.seconds;
    out["ceiling_p99_us"] = PercentileOfSorted(ceiling_run.latencies_us, 0.99);
    out["ratio_to_ceiling"] = rows_per_s / (ceiling_run.rows / ceiling_run.seconds);
    out["memcpy_same_rows_per_s"] = same_rows_run.rows / same_rows_run.seconds;
    out["ratio_to_memcpy_same_rows"] = rows_per_s / (same_rows_run.rows / same_rows_run.seconds);
  }
  if (target == "inproc" && table != nullptr && !table->resident()) {
    out["nvme_reads_per_s"] = static_cast<double>(nvme_reads() - nvme_reads_before) / run.seconds;
  }
  if (step_mode) {
    double stall = 0, compute = 0;
    for (int t = 0; t < concurrency; ++t) {
      stall += stall_us[t];
      compute += compute_us[t];
    }
    out["mode"] = "steps";
    out["steps"] = run.requests;
    out["compute_window_us"] = compute_window_us;
    out["prefetch_layers"] = prefetch_layers;
    out["stall_fraction"] = stall + compute > 0 ? stall / (stall + compute) : 0;
    out["stall_us_per_step"] = run.requests ? stall / run.requests : 0;
    // Which layer stalls: each step's position l is batch (first + l)'s layer.
    nlohmann::json by_layer = nlohmann::json::object();
    for (int l = 0; l < num_layers; ++l) {
      double sum = 0;
      for (int t = 0; t < concurrency; ++t) sum += layer_stall_us[t][l];
      by_layer[std::to_string((*batches)[l].layer_id)] = run.requests ? sum / run.requests : 0;
    }
    out["stall_us_per_step_by_layer"] = by_layer;
  }
  if (!run.first_error.empty()) out["first_error"] = run.first_error;
  if (json) {
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::printf("engram-bench  target=%s table=%s workload=%s batch_tokens=%lld concurrency=%lld duration=%.1fs\n",
                target.c_str(), table_name.c_str(), spec->text.c_str(), static_cast<long long>(batch_tokens),
                static_cast<long long>(concurrency), run.seconds);
    std::printf("  requests %llu (errors %llu), %d heads x %lld-byte rows per token\n",
                static_cast<unsigned long long>(run.requests), static_cast<unsigned long long>(run.errors), heads,
                static_cast<long long>(row_bytes));
    std::printf("  rows/s   %.4g    bytes/s %.4g    tokens/s %.4g\n", rows_per_s, rows_per_s * row_bytes,
                rows_per_s / heads);
    std::printf("  latency per batch (us): p50 %.1f  p90 %.1f  p99 %.1f  p999 %.1f\n",
                PercentileOfSorted(run.latencies_us, 0.5), PercentileOfSorted(run.latencies_us, 0.9),
                PercentileOfSorted(run.latencies_us, 0.99), PercentileOfSorted(run.latencies_us, 0.999));
    if (measure_ceiling) {
      std::printf("  memcpy ceiling (uniform random rows): rows/s %.4g  -> engine at %.0f%% of it\n",
                  out["ceiling_rows_per_s"].get<double>(), 100 * out["ratio_to_ceiling"].get<double>());
      std::printf("  memcpy of the workload's own rows:    rows/s %.4g  -> engine at %.0f%% of it\n",
                  out["memcpy_same_rows_per_s"].get<double>(), 100 * out["ratio_to_memcpy_same_rows"].get<double>());
    }
    if (step_mode) {
      std::printf("  steps %llu of %d layers, compute window %.0f us per layer, prefetch %s\n",
                  static_cast<unsigned long long>(run.requests), num_layers, compute_window_us,
                  prefetch_layers ? "on" : "off");
      std::printf("  stall fraction %.3f (waiting for rows %.0f us per step; latencies above are per step)\n",
                  out["stall_fraction"].get<double>(), out["stall_us_per_step"].get<double>());
      for (const auto& [layer, us] : out["stall_us_per_step_by_layer"].items()) {
        std::printf("    layer %s waits %.0f us per step\n", layer.c_str(), us.get<double>());
      }
    }
    if (out.contains("hbm")) {
      std::printf("  HBM tier mapped: %s; rows taken from its slots: %.1f%%\n", out["hbm"].get<std::string>().c_str(),
                  100 * out["hbm_rows_share"].get<double>());
    }
    if (!run.first_error.empty()) std::printf("  first error: %s\n", run.first_error.c_str());
  }
  return run.errors == 0 ? 0 : 1;
}

}  // namespace
}  // namespace engram

int main(int argc, char** argv) { return engram::Main(argc, argv); }
