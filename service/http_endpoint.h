// The metrics HTTP endpoint: GET /metrics (Prometheus text), /healthz (the process answers),
// /readyz (200 once tables are loaded and serving, 503 before and while draining).
//
// Health must answer whatever other connections on the port do: a kubelet probe that times out
// gets engramd killed. civetweb gives each connection one of a few worker threads for its whole
// life, so a handful of idle connections starves it. The public port is therefore held by a
// guard of our own: one epoll thread owns every connection, reads request headers under a short
// deadline without tying up a thread, and answers /healthz and /readyz itself. Complete requests
// for anything else are passed to civetweb, listening on an internal loopback port, by a small
// pool of proxy threads; a slow reader of a reply holds only its own buffer. When one client
// address holds too many connections, or the guard too many in all, a new connection is always
// accepted and the oldest connection still sending its headers (or draining) is closed instead:
// a probe is never refused for an abuser's sake.
//
// Start/Stop from one thread; ready/set_ready from any.
#ifndef ENGRAM_SERVICE_HTTP_ENDPOINT_H_
#define ENGRAM_SERVICE_HTTP_ENDPOINT_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "service/metrics.h"

struct mg_context;
struct mg_connection;

namespace engram {

struct HttpGuardOptions {
  // A request's headers must arrive within this, from the connection's accept.
  int header_timeout_ms = 2000;
  // A reply must be taken by the peer within this; a slow reader is closed after it.
  int write_timeout_ms = 10000;
  // Connections one client address may hold before its oldest unfinished one is closed.
  int max_connections_per_address = 32;
  // Connections in all before the oldest unfinished one is closed; 0 = from RLIMIT_NOFILE
  // (a quarter of it, 64..4096).
  int max_connections = 0;
  // Longest request head (request line and headers) taken.
  size_t max_header_bytes = 8192;
  // Threads passing requests to civetweb, and the most such requests waiting at once.
  int proxy_threads = 2;
  int max_pending_proxy = 64;
};

class HttpEndpoint {
 public:
  // `before_render` runs before each /metrics scrape (to refresh gauges). The guard's own
  // counters are registered in `registry`.
  HttpEndpoint(MetricsRegistry* registry, std::function<void()> before_render, HttpGuardOptions options = {});
  ~HttpEndpoint();

  // Listens on HOST:PORT (IPv4, or [v6]:port); port 0 picks a free one. Returns the bound port.
  absl::StatusOr<int> Start(const std::string& listen);
  void Stop();
  void set_ready(bool ready) { ready_.store(ready); }
  bool ready() const { return ready_.load(); }

 private:
  class Guard;

  static int HandleMetrics(::mg_connection* conn, void* self);
  static int HandleNotFound(::mg_connection* conn, void* self);

  MetricsRegistry* registry_;
  std::function<void()> before_render_;
  HttpGuardOptions options_;
  std::atomic<bool> ready_{false};
  mg_context* ctx_ = nullptr;
  std::unique_ptr<Guard> guard_;
};

// Splits HOST:PORT ("127.0.0.1:50051", "[::1]:0", "localhost:9000"). Errors name the text.
absl::Status SplitHostPort(const std::string& text, std::string* host, int* port);

}  // namespace engram

#endif  // ENGRAM_SERVICE_HTTP_ENDPOINT_H_
