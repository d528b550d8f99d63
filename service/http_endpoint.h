// The metrics HTTP endpoint (civetweb): GET /metrics (Prometheus text), /healthz (the process
// answers), /readyz (200 once tables are loaded and serving, 503 before and while draining).
// Start/Stop from one thread; handlers run on civetweb's threads and only read atomics and the
// registry (which is thread-safe).
#ifndef ENGRAM_SERVICE_HTTP_ENDPOINT_H_
#define ENGRAM_SERVICE_HTTP_ENDPOINT_H_

#include <atomic>
#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "service/metrics.h"

struct mg_context;
struct mg_connection;

namespace engram {

class HttpEndpoint {
 public:
  // `before_render` runs before each /metrics scrape (to refresh gauges).
  HttpEndpoint(MetricsRegistry* registry, std::function<void()> before_render);
  ~HttpEndpoint();

  // Listens on HOST:PORT (IPv4, or [v6]:port); port 0 picks a free one. Returns the bound port.
  absl::StatusOr<int> Start(const std::string& listen);
  void Stop();
  void set_ready(bool ready) { ready_.store(ready); }
  bool ready() const { return ready_.load(); }

 private:
  static int HandleMetrics(::mg_connection* conn, void* self);
  static int HandleNotFound(::mg_connection* conn, void* self);
  static int HandleHealth(::mg_connection* conn, void* self);
  static int HandleReady(::mg_connection* conn, void* self);

  MetricsRegistry* registry_;
  std::function<void()> before_render_;
  std::atomic<bool> ready_{false};
  mg_context* ctx_ = nullptr;
};

// Splits HOST:PORT ("127.0.0.1:50051", "[::1]:0", "localhost:9000"). Errors name the text.
absl::Status SplitHostPort(const std::string& text, std::string* host, int* port);

}  // namespace engram

#endif  // ENGRAM_SERVICE_HTTP_ENDPOINT_H_
