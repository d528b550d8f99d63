// ShmServer: engramd's shared-memory transport (protocol in client/include/engram/shm_protocol.h).
// One listening Unix socket; per connected client, a session thread that owns the client's arena
// and serves its request ring until the client goes away (socket closed) or breaks the protocol.
// Start/Stop from one thread; sessions run on their own threads.
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

#include "absl/status/status.h"
#include "engram/shm_socket.h"
#include "service/daemon_metrics.h"
#include "tiering/engine.h"

namespace engram {

struct ShmServerOptions {
  std::string socket_path;              // empty: the default (see DefaultSocketPath)
  std::vector<uid_t> allow_uids;        // empty: only the daemon's own uid
  std::vector<gid_t> allow_gids;
  uint64_t max_client_arena_bytes = 1ull << 30;
  int spin_us = 50;                     // busy-poll this long before sleeping on the eventfd
};

// /run/engram/engramd.sock when /run/engram can be used, else $XDG_RUNTIME_DIR/engram/engramd.sock,
// else /tmp/engram-<uid>/engramd.sock.
std::string DefaultSocketPath();

class ShmServer {
 public:
  ShmServer(Engine* engine, DaemonMetrics* metrics, ShmServerOptions options);
  ~ShmServer();

  absl::Status Start();
  // Closes the listener and every session; joins their threads.
  void Stop();
  void set_draining(bool draining) { draining_.store(draining); }
  const std::string& socket_path() const { return path_; }
  size_t sessions() const;

 private:
  struct Session;
  struct ClientState;
  void AcceptLoop();
  void Serve(Session* session);
  // Returns once the peer has closed its end of `sock` (or the server stops).
  void WaitForHangUp(int sock);
  // A frame on a session's socket (OpenTable, MapTable, CounterReport, MapHbm, AccessReport). An
  // error ends the session.
  absl::Status HandleControlFrame(const shm::Frame& frame, int sock, const std::vector<const Table*>& tables,
                                  ClientState* client, const std::string& who);
  absl::Status HandleMapHbm(const shm::Frame& frame, int sock, const std::vector<const Table*>& tables,
                            ClientState* client, const std::string& who);
  absl::Status HandleAccessReport(const shm::Frame& frame, const std::vector<const Table*>& tables,
                                  ClientState* client, const std::string& who);

  Engine* engine_;
  DaemonMetrics* metrics_;
  ShmServerOptions options_;
  std::string path_;
  int listen_fd_ = -1;
  bool bound_ = false;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> draining_{false};
  std::thread acceptor_;
  mutable std::mutex mu_;
  std::list<std::unique_ptr<Session>> sessions_;
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_SERVER_H_
