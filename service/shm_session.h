// One client of engramd's shared-memory transport, from the accepted socket on: the handshake
// (protocol version, ring size, data region within --max-client-arena), the client's arena (a
// sealed memfd and two eventfds passed with SCM_RIGHTS), the request ring served on this
// session's own thread, control frames (shm_control.h, shm_hbm_export.h), and the client's HBM
// pins, which stay watched until its socket hangs up even when the daemon ends the session.
// A session owns its socket: it is closed only when the ShmSession is destroyed, after its thread
// has been joined, so ShmServer's shutdown() never reaches a descriptor closed and reused.
#ifndef ENGRAM_SERVICE_SHM_SESSION_H_
#define ENGRAM_SERVICE_SHM_SESSION_H_

#include <sys/types.h>

#include <atomic>
#include <thread>

#include "service/daemon_metrics.h"
#include "tiering/engine.h"

namespace engram {

struct ShmServerOptions;

// What every session of one server shares; owned by the ShmServer, which outlives its sessions.
struct ShmSessionContext {
  Engine* engine = nullptr;
  DaemonMetrics* metrics = nullptr;
  const ShmServerOptions* options = nullptr;
  const std::atomic<bool>* stopping = nullptr;
  const std::atomic<bool>* draining = nullptr;
};

class ShmSession {
 public:
  // Takes ownership of `sock`.
  ShmSession(int sock, pid_t pid, uid_t uid, const ShmSessionContext& ctx)
      : sock_(sock), pid_(pid), uid_(uid), ctx_(ctx) {}
  ~ShmSession();  // joins the thread, then closes the socket
  ShmSession(const ShmSession&) = delete;
  ShmSession& operator=(const ShmSession&) = delete;

  void Start() {
    thread_ = std::thread([this] { Serve(); });
  }
  // Wakes a session blocked on its socket (ShmServer::Stop); the descriptor stays open.
  void ShutDownSocket() const;
  bool done() const { return done_.load(); }

 private:
  void Serve();
  // Returns once the peer has closed its end of the socket (or the server stops).
  void WaitForHangUp();

  const int sock_;
  const pid_t pid_;
  const uid_t uid_;
  const ShmSessionContext ctx_;
  std::thread thread_;
  std::atomic<bool> done_{false};
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_SHM_SESSION_H_
