// engramd: serves Engram table packs to inference workers over gRPC, with a Prometheus endpoint.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/resource_quota.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/resource.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdio>
#include <fstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "service/cli_flags.h"
#include "service/hbm_setup.h"
#include "service/daemon_metrics.h"
#include "service/grpc_service.h"
#include "service/http_endpoint.h"
#include "service/log.h"
#include "service/shm_server.h"
#include "service/table_loader.h"
#include "service/state_keeper.h"
#include "service/warm_state.h"
#include "tiering/cache/policy.h"
#include "tiering/engine.h"
#include "tiering/table.h"

namespace engram {
namespace {

constexpr char kUsage[] =
    "engramd: serves Engram conditional-memory tables to inference workers.\n"
    "\n"
    "Usage: engramd --pack DIR [--pack DIR ...] [flags]\n"
    "\n"
    "Each --pack is a table pack (made by `engramctl pack create`); its table name is the\n"
    "manifest's name. Tables are loaded into host memory at start; /readyz turns ready once every\n"
    "table is loaded. SIGTERM or SIGINT drains: new requests get UNAVAILABLE, in-flight ones finish.";

struct DaemonFlags {
  std::vector<std::string> packs;
  std::string listen = "127.0.0.1:50051";
  std::string metrics_listen = "127.0.0.1:9464";
  int64_t max_batch_rows = 1 << 20;
  int64_t worker_threads = -1;
  std::string ports_file;
  double drain_seconds = 5;
  std::string dedup = "auto";
  TierFlags tier;
  std::string state_dir;
  std::vector<std::string> warm_from;
  double snapshot_interval_s = 300;
  std::string state_min_free_text = "64M";
  int64_t max_streams = 256, max_streams_per_client = 64, max_clients = 256, grpc_threads = 0;
  int64_t max_inflight = 256, max_inflight_per_client = 64;
  uint64_t state_min_free = 64ull << 20;
  std::string socket;
  std::vector<std::string> allow_uids, allow_gids;
  std::string max_client_arena = "1G";
  std::string hbm_budget = "0";
  int64_t gpu = 0;
  std::string hbm_store = "auto";
  int64_t hbm_step_ms = 20;
};

int Run(int argc, char** argv) {
  DaemonFlags f;
  FlagSet flags("engramd", kUsage);
  flags.StringList("pack", &f.packs, "table pack directory to serve");
  flags.String("listen", &f.listen, "gRPC address HOST:PORT (port 0 picks a free one)");
  flags.String("metrics-listen", &f.metrics_listen,
               "HTTP address for /metrics, /healthz, /readyz (HOST:PORT, or 'off')");
  flags.String("hbm-budget", &f.hbm_budget,
               "GPU memory for the hottest rows (e.g. 8G); 0: no HBM tier. Needs a CUDA device; without\n"
               "                              one engramd says so at start and serves DRAM and NVMe");
  flags.Int("gpu", &f.gpu, "CUDA device for the HBM tier");
  flags.String("hbm-store", &f.hbm_store,
               "auto|cuda|host: where the HBM tier's slots live. auto: the GPU when there is one, else\n"
               "                              no HBM tier; cuda: the GPU or fail; host: host memory, for\n"
               "                              testing the tier (promotion, published index, client pins)\n"
               "                              on machines without a GPU; no faster than DRAM");
  flags.Int("hbm-step-ms", &f.hbm_step_ms, "milliseconds between HBM promotion rounds");
  flags.Int("max-batch-rows", &f.max_batch_rows,
            "largest request in rows (tokens x heads); larger ones get RESOURCE_EXHAUSTED");
  flags.Int("worker-threads", &f.worker_threads,
            "gather helper threads beside each request's own thread (-1: one per core, minus one)");
  flags.String("dedup", &f.dedup,
               "auto|on|off: read each distinct row of a batch once (auto: where the tier's reads cost)");
  f.tier.Register(flags);
  flags.String("state-dir", &f.state_dir,
               "directory for the daemon's RocksDB: pack catalog and hot-set snapshots, so a restart\n"
               "                              comes back warm (empty: no state kept)");
  flags.Double("snapshot-interval-s", &f.snapshot_interval_s, "seconds between hot-set snapshots (also taken at shutdown)");
  flags.Int("max-streams", &f.max_streams,
            "open gRPC LookupStreams at most (each holds a server thread); beyond: RESOURCE_EXHAUSTED (0: no cap)");
  flags.Int("max-streams-per-client", &f.max_streams_per_client,
            "open gRPC LookupStreams from one client address at most (0: no cap)");
  flags.Int("max-inflight", &f.max_inflight,
            "unary gRPC Lookup/LookupTokens/Prefetch calls served at once at most; beyond: RESOURCE_EXHAUSTED\n"
            "                              (0: no cap)");
  flags.Int("max-inflight-per-client", &f.max_inflight_per_client,
            "such calls from one client address at most (0: no cap)");
  flags.Int("max-clients", &f.max_clients,
            "shared-memory sessions at most (each is a thread: the low-latency path); beyond: refused (0: no cap)");
  flags.Int("grpc-threads", &f.grpc_threads,
            "gRPC server threads at most, however many clients connect (0: --max-streams +\n"
            "                              --max-inflight + 16)");
  flags.String("state-min-free", &f.state_min_free_text,
               "the state dir must have this much free space (e.g. 64M) before the store is opened or\n"
               "                              written; below it the daemon runs cold / pauses snapshots");
  flags.String("socket", &f.socket,
               "Unix socket for the shared-memory transport (default /run/engram/engramd.sock, else\n"
               "                              $XDG_RUNTIME_DIR/engram/, else /tmp/engram-UID/; 'off' disables it)");
  flags.StringList("allow-uid", &f.allow_uids, "user (name or uid) allowed on the socket (default: the daemon's own)");
  flags.StringList("allow-gid", &f.allow_gids, "group (name or gid) whose members may use the socket");
  flags.String("max-client-arena", &f.max_client_arena, "largest shared-memory data region one client may ask for");
  flags.StringList("warm-from", &f.warm_from, "hot-set file from `engramctl profile` to warm a table's cache with at start");
  flags.String("ports-file", &f.ports_file,
               "write the bound ports as JSON here once ready (for scripts using port 0)");
  flags.Double("drain-seconds", &f.drain_seconds, "how long in-flight requests may finish on shutdown");
  ParseOrExit(flags, argc, argv, 1, nullptr);
  if (f.packs.empty()) {
    std::fprintf(stderr, "engramd needs at least one --pack DIR (see --help)\n");
    return 2;
  }
  if (absl::Status s = ParseBytes(f.state_min_free_text, &f.state_min_free); !s.ok()) {
    std::fprintf(stderr, "engramd: --state-min-free: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  uint64_t hbm_bytes = 0;
  if (absl::Status s = ParseBytes(f.hbm_budget, &hbm_bytes); !s.ok()) {
    std::fprintf(stderr, "engramd: --hbm-budget: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  HbmSetupOptions hbm_options;
  hbm_options.budget_bytes = hbm_bytes;
  hbm_options.gpu = static_cast<int>(f.gpu);
  hbm_options.store = f.hbm_store;
  hbm_options.step_ms = static_cast<int>(std::clamp<int64_t>(f.hbm_step_ms, 0, 1 << 30));
  if (absl::Status s = CheckHbmOptions(hbm_options); !s.ok()) {
    std::fprintf(stderr, "engramd: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (f.max_batch_rows < 1) {
    std::fprintf(stderr, "--max-batch-rows must be at least 1\n");
    return 2;
  }

  // Every shared-memory session and metrics connection is a descriptor: take the hard limit,
  // as daemons do (systemd's default soft limit is 1024).
  if (rlimit files{}; getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    const rlim_t was = files.rlim_cur;
    files.rlim_cur = files.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &files) == 0) {
      LogInfo("open_files_limit_raised", {{"from", absl::StrCat(was)}, {"to", absl::StrCat(files.rlim_cur)}});
    }
  }

  // Signals are taken by sigwait below; block them before any thread starts.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  MetricsRegistry registry;
  DaemonMetrics metrics(&registry);
  metrics.SetReady(false);
  // Scrapes refresh the cache and NVMe figures from the engine (set once tables are loaded).
  std::atomic<const Engine*> scraped_engine{nullptr};
  HttpEndpoint http(&registry, [&] {
    if (const Engine* e = scraped_engine.load()) metrics.RefreshTierGauges(*e);
  });
  int metrics_port = -1;
  if (f.metrics_listen != "off") {
    auto port = http.Start(f.metrics_listen);
    if (!port.ok()) {
      LogError("metrics_listen_failed", {{"address", f.metrics_listen}, {"error", std::string(port.status().message())}});
      return 1;
    }
    metrics_port = *port;
  }

  EngineOptions engine_options;
  engine_options.max_batch_rows = static_cast<uint64_t>(f.max_batch_rows);
  engine_options.worker_threads = static_cast<int>(f.worker_threads);
  auto dedup = ParseDedup(f.dedup);
  if (!dedup.ok()) {
    std::fprintf(stderr, "%s\n", std::string(dedup.status().message()).c_str());
    return 2;
  }
  engine_options.dedup = *dedup;
  Engine engine(engine_options);
  auto placement = f.tier.ToPlacement();
  if (!placement.ok()) {
    std::fprintf(stderr, "%s (see --help)\n", std::string(placement.status().message()).c_str());
    return 2;
  }
  // Every flag is checked before anything slow (loading tables) starts.
  ShmServerOptions shm_options;
  shm_options.socket_path = f.socket;
  shm_options.max_clients = static_cast<int>(std::clamp<int64_t>(f.max_clients, 0, 1 << 20));
  {
    absl::Status shm_flags = ParseBytes(f.max_client_arena, &shm_options.max_client_arena_bytes);
    for (const auto& u : f.allow_uids) {
      uint32_t id;
      if (absl::SimpleAtoi(u, &id)) {
        shm_options.allow_uids.push_back(id);
      } else if (const passwd* pw = getpwnam(u.c_str())) {
        shm_options.allow_uids.push_back(pw->pw_uid);
      } else {
        shm_flags = absl::InvalidArgumentError("--allow-uid: no user '" + u + "'");
      }
    }
    for (const auto& g : f.allow_gids) {
      uint32_t id;
      if (absl::SimpleAtoi(g, &id)) {
        shm_options.allow_gids.push_back(id);
      } else if (const group* gr = getgrnam(g.c_str())) {
        shm_options.allow_gids.push_back(gr->gr_gid);
      } else {
        shm_flags = absl::InvalidArgumentError("--allow-gid: no group '" + g + "'");
      }
    }
    if (!shm_flags.ok()) {
      std::fprintf(stderr, "%s (see --help)\n", std::string(shm_flags.message()).c_str());
      return 2;
    }
  }
  if (absl::Status s = LoadTables(f.packs, *placement, &engine); !s.ok()) {
    LogError("table_load_failed", {{"error", std::string(s.message())}});
    return 1;
  }
  // Optional state: whatever is wrong with it is logged and the daemon starts cold (state_keeper.h).
  std::unique_ptr<StateKeeper> state;
  if (!f.state_dir.empty()) {
    state = std::make_unique<StateKeeper>(f.state_dir, f.state_min_free);
    state->Start();
  }
  absl::Status store_failed;
  if (absl::Status s = WarmTables(engine, state ? state->store() : nullptr, f.warm_from, &store_failed); !s.ok()) {
    LogError("warm_failed", {{"error", std::string(s.message())}});
    return 1;
  }
  if (!store_failed.ok()) state->Failed(store_failed);
  auto hbm_enabled = SetUpHbm(hbm_options, &engine);
  if (!hbm_enabled.ok()) {
    LogError("tier_hbm_failed", {{"error", std::string(hbm_enabled.status().message())}});
    return 1;
  }
  metrics.RecordTables(engine, *hbm_enabled);
  HbmPromoter promoter(&engine, hbm_options.step_ms);
  metrics.RefreshTierGauges(engine);

  scraped_engine.store(&engine);
  std::unique_ptr<ShmServer> shm_server;
  if (f.socket != "off") {
    shm_server = std::make_unique<ShmServer>(&engine, &metrics, shm_options);
    if (absl::Status s = shm_server->Start(); !s.ok()) {
      LogError("shm_listen_failed", {{"error", std::string(s.message())}});
      return 1;
    }
    LogInfo("shm_listening", {{"socket", shm_server->socket_path()}});
  }
  EngramGrpcService service(&engine, &metrics);
  service.set_stream_limits(static_cast<int>(std::clamp<int64_t>(f.max_streams, 0, 1 << 20)),
                            static_cast<int>(std::clamp<int64_t>(f.max_streams_per_client, 0, 1 << 20)));
  service.set_inflight_limits(static_cast<int>(std::clamp<int64_t>(f.max_inflight, 0, 1 << 20)),
                              static_cast<int>(std::clamp<int64_t>(f.max_inflight_per_client, 0, 1 << 20)));
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int grpc_port = 0;
  builder.AddListeningPort(f.listen, grpc::InsecureServerCredentials(), &grpc_port);
  builder.RegisterService(&service);
  const uint64_t max_message = std::max<uint64_t>(64ull << 20, static_cast<uint64_t>(f.max_batch_rows) * 8 + (1 << 20));
  builder.SetMaxReceiveMessageSize(static_cast<int>(std::min<uint64_t>(max_message, INT32_MAX)));
  builder.SetMaxSendMessageSize(-1);
  // Server threads stay bounded whatever the clients do (open streams each hold one).
  grpc::ResourceQuota quota("engramd");
  quota.SetMaxThreads(static_cast<int>(
      std::clamp<int64_t>(f.grpc_threads > 0 ? f.grpc_threads : (f.max_streams > 0 && f.max_inflight > 0 ? f.max_streams + f.max_inflight + 16 : 4096), 8, 1 << 16)));
  builder.SetResourceQuota(quota);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || grpc_port == 0) {
    LogError("grpc_listen_failed", {{"address", f.listen}});
    return 1;
  }
  server->GetHealthCheckService()->SetServingStatus(true);
  http.set_ready(true);
  metrics.SetReady(true);
  if (!f.ports_file.empty()) {
    const std::string tmp = f.ports_file + ".tmp";
    std::ofstream(tmp) << "{\"grpc_port\": " << grpc_port << ", \"metrics_port\": " << metrics_port
                       << ", \"socket\": \"" << (shm_server ? shm_server->socket_path() : "") << "\"}\n";
    std::rename(tmp.c_str(), f.ports_file.c_str());
  }
  LogInfo("ready", {{"grpc_listen", f.listen}, {"grpc_port", absl::StrCat(grpc_port)},
                    {"metrics_port", absl::StrCat(metrics_port)}, {"tables", absl::StrCat(engine.tables().size())},
                    {"worker_threads", absl::StrCat(f.worker_threads)}});

  // Snapshots every --snapshot-interval-s, until shutdown.
  std::mutex snapshot_mu;
  std::condition_variable snapshot_cv;
  bool stopping = false;
  std::thread snapshotter([&] {
    std::unique_lock<std::mutex> lock(snapshot_mu);
    const auto interval = std::chrono::duration<double>(std::max(1.0, f.snapshot_interval_s));
    while (!snapshot_cv.wait_for(lock, interval, [&] { return stopping; })) {
      StateStore* store = state ? state->ForWrite() : nullptr;
      if (absl::Status s = SnapshotHotSets(engine, store); !s.ok()) {
        LogWarn("hot_set_save_failed", {{"error", std::string(s.message())}});
        state->Failed(s);
      }
    }
  });

  int sig = 0;
  sigwait(&signals, &sig);
  LogInfo("draining", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
  http.set_ready(false);
  metrics.SetReady(false);
  service.set_draining(true);
  if (shm_server) shm_server->set_draining(true);
  server->GetHealthCheckService()->SetServingStatus(false);
  server->Shutdown(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(f.drain_seconds * 1000)));
  server->Wait();
  // The promoter stops first: from then on no HBM slot is rewritten, so whatever a shared-memory
  // client still reads stays whole. Then the indexes are marked detached (clients that pin from
  // now on read from the table instead) and clients already pinned are given a moment to let go,
  // and only then do the sessions, whose arenas hold the pins, go away.
  promoter.Stop();
  for (Table* table : engine.mutable_tables()) {
    for (const auto& layer : table->layers()) {
      if (layer.hbm != nullptr) layer.hbm->MarkDetached();
    }
  }
  const auto unpin_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  for (Table* table : engine.mutable_tables()) {
    for (const auto& layer : table->layers()) {
      if (layer.hbm != nullptr && !layer.hbm->WaitUnpinned(unpin_deadline)) {
        LogWarn("hbm_detach_timeout", {{"table", table->name()}, {"layer", absl::StrCat(layer.pack_layer->id)},
                                       {"note", "a client stayed pinned for 1 s after the tiers were detached"}});
      }
    }
  }
  if (shm_server) shm_server->Stop();
  {
    std::lock_guard<std::mutex> lock(snapshot_mu);
    stopping = true;
  }
  snapshot_cv.notify_all();
  snapshotter.join();
  if (StateStore* store = state ? state->ForWrite() : nullptr) {
    if (absl::Status s = SnapshotHotSets(engine, store); !s.ok()) {
      LogWarn("hot_set_save_failed", {{"error", std::string(s.message())}});
      state->Failed(s);  // then Stop() leaves it open rather than closing after a failed write
    }
  }
  if (state) state->Stop();
  http.Stop();
  LogInfo("stopped");
  return 0;
}

}  // namespace
}  // namespace engram

int main(int argc, char** argv) { return engram::Run(argc, argv); }
