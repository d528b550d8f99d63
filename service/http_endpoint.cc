#include "service/http_endpoint.h"

#include <civetweb.h>

#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace engram {
namespace {

void Reply(mg_connection* conn, int code, const char* reason, const char* content_type,
           const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n",
            code, reason, content_type, body.size());
  mg_write(conn, body.data(), body.size());
}

}  // namespace

absl::Status SplitHostPort(const std::string& text, std::string* host, int* port) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos || colon + 1 == text.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not HOST:PORT"));
  }
  *host = text.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (!absl::SimpleAtoi(text.substr(colon + 1), port) || *port < 0 || *port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' has no valid port (0-65535)"));
  }
  if (host->empty()) return absl::InvalidArgumentError(absl::StrCat("'", text, "' has no host"));
  return absl::OkStatus();
}

HttpEndpoint::HttpEndpoint(MetricsRegistry* registry, std::function<void()> before_render)
    : registry_(registry), before_render_(std::move(before_render)) {}

HttpEndpoint::~HttpEndpoint() { Stop(); }

absl::StatusOr<int> HttpEndpoint::Start(const std::string& listen) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(listen, &host, &port); !s.ok()) return s;
  if (host == "localhost") host = "127.0.0.1";
  const bool v6 = host.find(':') != std::string::npos;
  // civetweb wants "ADDR:PORT" for IPv4 and "[ADDR]:PORT" with a '+'-free form for IPv6.
  const std::string ports = v6 ? absl::StrCat("[", host, "]:", port) : absl::StrCat(host, ":", port);
  mg_init_library(0);
  const char* options[] = {"listening_ports", ports.c_str(), "num_threads", "4",
                           "request_timeout_ms", "10000", nullptr};
  mg_callbacks callbacks{};
  ctx_ = mg_start(&callbacks, this, options);
  if (ctx_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", listen,
                                               " (address in use or not local?)"));
  }
  mg_set_request_handler(ctx_, "/metrics$", &HttpEndpoint::HandleMetrics, this);
  mg_set_request_handler(ctx_, "/healthz$", &HttpEndpoint::HandleHealth, this);
  mg_set_request_handler(ctx_, "/readyz$", &HttpEndpoint::HandleReady, this);
  // Everything else, registered last (civetweb takes the first match): our own short 404, which
  // also says where to look (civetweb's error page needs more stack than its workers have under
  // AddressSanitizer).
  mg_set_request_handler(ctx_, "**", &HttpEndpoint::HandleNotFound, this);
  mg_server_port bound[4];
  std::memset(bound, 0, sizeof(bound));
  const int n = mg_get_server_ports(ctx_, 4, bound);
  return n > 0 ? bound[0].port : port;
}

void HttpEndpoint::Stop() {
  if (ctx_ != nullptr) {
    mg_stop(ctx_);
    ctx_ = nullptr;
  }
}

int HttpEndpoint::HandleMetrics(mg_connection* conn, void* self) {
  auto* endpoint = static_cast<HttpEndpoint*>(self);
  if (endpoint->before_render_) endpoint->before_render_();
  Reply(conn, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", endpoint->registry_->Render());
  return 200;
}

int HttpEndpoint::HandleNotFound(mg_connection* conn, void*) {
  Reply(conn, 404, "Not Found", "text/plain", "not found: engramd serves /metrics, /healthz and /readyz\n");
  return 404;
}

int HttpEndpoint::HandleHealth(mg_connection* conn, void*) {
  Reply(conn, 200, "OK", "text/plain", "ok\n");
  return 200;
}

int HttpEndpoint::HandleReady(mg_connection* conn, void* self) {
  if (static_cast<HttpEndpoint*>(self)->ready()) {
    Reply(conn, 200, "OK", "text/plain", "ready\n");
    return 200;
  }
  Reply(conn, 503, "Service Unavailable", "text/plain", "not ready\n");
  return 503;
}

}  // namespace engram
