// ShmServer: engramd's shared-memory transport (the wire protocol is engram_shm's:
// engram/shm_protocol.h). The listener and admission: one Unix socket (mode 0660), each accepted
// peer's credentials checked (shm_admission.h), and per admitted client a ShmSession
// (shm_session.h) on its own thread until the client goes away or breaks the protocol.
// Start/Stop from one thread.
#ifndef ENGRAM_SERVICE_SHM_SERVER_H_
#define ENGRAM_SERVICE_SHM_SERVER_H_

#include <sys/types.h>

#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "service/daemon_metrics.h"
#include "service/shm_session.h"
#include "tiering/engine.h"

namespace engram {

struct ShmServerOptions {
  std::string socket_path;        // empty: the default (see DefaultSocketPath)
  std::vector<uid_t> allow_uids;  // empty: only the daemon's own uid
  std::vector<gid_t> allow_gids;
  uint64_t max_client_arena_bytes = 1ull << 30;
  int spin_us = 50;       // busy-poll this long before sleeping on the eventfd
  int max_clients = 256;  // sessions at once (each is a thread); 0: no limit
};

// /run/engram/engramd.sock when /run/engram can be used, else $XDG_RUNTIME_DIR/engram/engramd.sock,
// else /tmp/engram-<uid>/engramd.sock.
std::string DefaultSocketPath();

class ShmServer {
 public:
  ShmServer(Engine* engine, DaemonMetrics* metrics, ShmServerOptions options);
  ~ShmServer();

  absl::Status Start();
  // Closes the listener and every session; joins their threads. At shutdown, stop the HBM
  // promoter (and detach the HBM tiers) first: sessions hold the clients' pins.
  void Stop();
  void set_draining(bool draining) { draining_.store(draining); }
  const std::string& socket_path() const { return path_; }
  size_t sessions() const;

 private:
  void AcceptLoop();

  ShmServerOptions options_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  const ShmSessionContext context_;  // what every session shares; points into this object
  std::string path_;
  int listen_fd_ = -1;
  bool bound_ = false;
  std::thread acceptor_;
  mutable std::mutex mu_;
  std::list<std::unique_ptr<ShmSession>> sessions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_SERVER_H_
