#include "service/http_endpoint.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "service/log.h"

namespace engram {
namespace {

using Clock = std::chrono::steady_clock;

// civetweb's side: the handlers behind the guard.
void Reply(mg_connection* conn, int code, const char* reason, const char* content_type, const std::string& body) {
  mg_printf(conn,
            "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n",
            code, reason, content_type, body.size());
  mg_write(conn, body.data(), body.size());
}

// The guard's own replies (health, and requests it refuses).
std::string Response(int code, absl::string_view reason, absl::string_view body, bool head) {
  std::string r =
      absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: text/plain\r\nContent-Length: ", body.size(),
                   "\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n");
  if (!head) absl::StrAppend(&r, body);
  return r;
}

std::string PeerAddress(const sockaddr_storage& ss) {
  char text[INET6_ADDRSTRLEN] = "?";
  if (ss.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in&>(ss).sin_addr, text, sizeof(text));
  } else if (ss.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6&>(ss).sin6_addr, text, sizeof(text));
  }
  return text;
}

int DefaultMaxConnections() {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) return 4096;
  return static_cast<int>(std::clamp<rlim_t>(limit.rlim_cur / 4, 64, 4096));
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

// One epoll thread for every public connection, and proxy threads for what civetweb answers.
class HttpEndpoint::Guard {
 public:
  Guard(HttpEndpoint* owner, int listen_fd, int backend_port)
      : owner_(owner), options_(owner->options_), listen_fd_(listen_fd), backend_port_(backend_port) {
    if (options_.max_connections <= 0) options_.max_connections = DefaultMaxConnections();
    options_.max_connections_per_address = std::max(1, options_.max_connections_per_address);
    MetricsRegistry* r = owner->registry_;
    const std::string closed_help =
        "Metrics-port connections the guard closed before a reply, by reason (a cap reached: the "
        "oldest unfinished connection makes room for a new one; a deadline passed)";
    for (const char* reason :
         {"per_address_cap", "connection_cap", "fd_limit", "header_timeout", "write_timeout", "bad_request"}) {
      closed_[reason] = r->GetCounter("engram_http_connections_shed_total", closed_help, {"reason"}, {reason});
    }
    open_ = r->GetGauge("engram_http_open_connections", "Connections open on the metrics port", {}, {});
    const std::string req_help = "Requests on the metrics port, by what answered them";
    for (const char* h : {"healthz", "readyz", "proxied", "refused"}) {
      requests_[h] = r->GetCounter("engram_http_requests_total", req_help, {"handler"}, {h});
    }
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
    reserve_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
    Watch(listen_fd_, EPOLLIN, EPOLL_CTL_ADD);
    Watch(event_fd_, EPOLLIN, EPOLL_CTL_ADD);
    loop_ = std::thread([this] { Loop(); });
    for (int i = 0; i < std::max(1, options_.proxy_threads); ++i) {
      proxies_.emplace_back([this] { ProxyLoop(); });
    }
  }

  ~Guard() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    jobs_cv_.notify_all();
    for (std::thread& t : proxies_) t.join();
    Wake();
    loop_.join();
    for (auto& [fd, conn] : conns_) close(fd);
    open_->Set(0);
    close(listen_fd_);
    close(event_fd_);
    close(epoll_fd_);
    if (reserve_fd_ >= 0) close(reserve_fd_);
  }

 private:
  enum class State { kReading, kProxying, kWriting, kDraining };
  struct Conn {
    uint64_t id = 0;
    std::string address;
    State state = State::kReading;
    Clock::time_point deadline;
    std::string in;
    std::string out;
    size_t out_done = 0;
  };
  struct Job {
    uint64_t id;
    int fd;
    std::string request;
  };

  // Events carry the descriptor and its connection's id (low 32 bits): an event for a connection
  // closed earlier in the same batch must not reach a new one that took its descriptor.
  void Watch(int fd, uint32_t events, int op, uint64_t id = 0) {
    epoll_event ev{};
    ev.events = events;
    ev.data.u64 = (id << 32) | static_cast<uint32_t>(fd);
    epoll_ctl(epoll_fd_, op, fd, &ev);
  }

  void Wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(event_fd_, &one, sizeof(one));
  }

  void Loop() {
    std::vector<epoll_event> events(256);
    Clock::time_point next_sweep = Clock::now();
    for (;;) {
      const int n = epoll_wait(epoll_fd_, events.data(), static_cast<int>(events.size()), 100);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return;
      }
      for (int i = 0; i < n; ++i) {
        const int fd = static_cast<int>(events[i].data.u64 & 0xffffffffu);
        if (fd == listen_fd_) {
          AcceptAll();
        } else if (fd == event_fd_) {
          TakeProxyReplies();
        } else {
          OnConnection(fd, static_cast<uint32_t>(events[i].data.u64 >> 32), events[i].events);
        }
      }
      const Clock::time_point now = Clock::now();
      if (now >= next_sweep) {
        Sweep(now);
        next_sweep = now + std::chrono::milliseconds(50);
      }
    }
  }

  // At most 64 connections per wakeup: a flood that keeps the backlog full must not keep this
  // thread from reading and answering the connections it holds.
  void AcceptAll() {
    for (int taken = 0; taken < 64; ++taken) {
      sockaddr_storage ss{};
      socklen_t len = sizeof(ss);
      const int fd = accept4(listen_fd_, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) {
        if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO) continue;
        if (errno == EMFILE || errno == ENFILE) {
          // Out of descriptors: make room by closing the oldest unfinished connection; with none
          // to close, take the connection on the reserve descriptor and close it (the backlog
          // would otherwise keep the listener readable and this loop spinning).
          if (ShedOldest(nullptr, "fd_limit")) continue;
          if (reserve_fd_ >= 0) {
            close(reserve_fd_);
            const int dropped = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
            if (dropped >= 0) close(dropped);
            reserve_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
            closed_["fd_limit"]->Add();
            if (dropped >= 0 && reserve_fd_ >= 0) continue;
          }
          // Nothing to shed and no reserve: stop listening until the next sweep rather than spin.
          epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, listen_fd_, nullptr);
          listener_paused_ = true;
        }
        return;  // EAGAIN, or an error accept cannot get past now
      }
      std::string address = PeerAddress(ss);
      int& at_address = per_address_[address];
      if (at_address >= options_.max_connections_per_address) ShedOldest(&address, "per_address_cap");
      if (static_cast<int>(conns_.size()) >= options_.max_connections) ShedOldest(nullptr, "connection_cap");
      Conn& conn = conns_[fd];
      conn.id = ++next_id_;
      conn.address = std::move(address);
      conn.deadline = Clock::now() + std::chrono::milliseconds(options_.header_timeout_ms);
      ++per_address_[conn.address];
      open_->Add(1);
      Watch(fd, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_ADD, conn.id);
    }
  }

  // Closes the oldest connection (of `address`, or of all) that is still sending its request or
  // draining after its reply; failing that, the oldest one being written to. Connections whose
  // request waits on civetweb are left: they are bounded by max_pending_proxy.
  bool ShedOldest(const std::string* address, const char* reason) {
    int victim = -1;
    uint64_t victim_id = 0;
    bool victim_unfinished = false;
    for (const auto& [fd, conn] : conns_) {
      if (address != nullptr && conn.address != *address) continue;
      if (conn.state == State::kProxying) continue;
      const bool unfinished = conn.state == State::kReading || conn.state == State::kDraining;
      if (victim >= 0 && (victim_unfinished && !unfinished)) continue;
      if (victim >= 0 && victim_unfinished == unfinished && conn.id > victim_id) continue;
      victim = fd;
      victim_id = conn.id;
      victim_unfinished = unfinished;
    }
    if (victim < 0) return false;
    closed_[reason]->Add();
    NoteShed(reason, conns_[victim].address);
    Close(victim);
    return true;
  }

  // One log line per ten seconds at most, with the count since the last.
  void NoteShed(const char* reason, const std::string& address) {
    ++shed_since_log_;
    const Clock::time_point now = Clock::now();
    if (now - last_shed_log_ < std::chrono::seconds(10)) return;
    LogWarn("http_connections_shed", {{"reason", reason},
                                      {"address", address},
                                      {"shed_since_last_line", absl::StrCat(shed_since_log_)},
                                      {"open", absl::StrCat(conns_.size())}});
    shed_since_log_ = 0;
    last_shed_log_ = now;
  }

  void Close(int fd) {
    auto it = conns_.find(fd);
    if (it == conns_.end()) return;
    if (--per_address_[it->second.address] <= 0) per_address_.erase(it->second.address);
    conns_.erase(it);
    epoll_ctl(epoll_fd_, EPOLL_CTL_DEL, fd, nullptr);
    close(fd);
    open_->Add(-1);
  }

  void OnConnection(int fd, uint32_t id, uint32_t events) {
    auto it = conns_.find(fd);
    if (it == conns_.end() || static_cast<uint32_t>(it->second.id) != id) return;
    Conn& conn = it->second;
    if (events & (EPOLLERR | EPOLLHUP)) {
      Close(fd);  // a reply still coming from civetweb for it finds no connection and is dropped
      return;
    }
    if (conn.state == State::kWriting && (events & EPOLLOUT)) {
      Flush(fd, conn);
      return;
    }
    if (conn.state == State::kReading || conn.state == State::kDraining) Read(fd, conn);
  }

  void Read(int fd, Conn& conn) {
    char buf[4096];
    for (;;) {
      const ssize_t n = recv(fd, buf, sizeof(buf), 0);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        Close(fd);
        return;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (conn.state == State::kDraining) continue;  // discarded: the reply is out
      const size_t searched_from = conn.in.size() >= 3 ? conn.in.size() - 3 : 0;
      conn.in.append(buf, static_cast<size_t>(n));
      const size_t end = conn.in.find("\r\n\r\n", searched_from);
      if (end != std::string::npos) {
        conn.in.resize(end + 4);
        Dispatch(fd, conn);
        return;
      }
      if (conn.in.size() > options_.max_header_bytes) {
        closed_["bad_request"]->Add();
        requests_["refused"]->Add();
        StartReply(fd, conn,
                   Response(431, "Request Header Fields Too Large",
                            absl::StrCat("request head over ", options_.max_header_bytes, " bytes\n"), false));
        return;
      }
    }
  }

  void Dispatch(int fd, Conn& conn) {
    const absl::string_view head(conn.in);
    const absl::string_view line = head.substr(0, head.find("\r\n"));
    std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
    const auto refuse = [&](int code, absl::string_view reason, absl::string_view body) {
      requests_["refused"]->Add();
      StartReply(fd, conn, Response(code, reason, body, false));
    };
    if (parts.size() != 3 || !absl::StartsWith(parts[2], "HTTP/1.")) {
      return refuse(400, "Bad Request", "not an HTTP/1.x request line\n");
    }
    const bool head_only = parts[0] == "HEAD";
    if (parts[0] != "GET" && !head_only) {
      return refuse(405, "Method Not Allowed", "engramd's HTTP endpoint takes GET and HEAD\n");
    }
    for (absl::string_view header : absl::StrSplit(head.substr(line.size()), "\r\n", absl::SkipEmpty())) {
      const size_t colon = header.find(':');
      if (colon == absl::string_view::npos) continue;
      const absl::string_view name = absl::StripAsciiWhitespace(header.substr(0, colon));
      const absl::string_view value = absl::StripAsciiWhitespace(header.substr(colon + 1));
      if (absl::EqualsIgnoreCase(name, "transfer-encoding") ||
          (absl::EqualsIgnoreCase(name, "content-length") && value != "0")) {
        return refuse(413, "Content Too Large", "engramd's HTTP endpoint takes no request bodies\n");
      }
    }
    const absl::string_view path = parts[1].substr(0, parts[1].find('?'));
    if (path == "/healthz") {
      requests_["healthz"]->Add();
      return StartReply(fd, conn, Response(200, "OK", "ok\n", head_only));
    }
    if (path == "/readyz") {
      requests_["readyz"]->Add();
      return StartReply(fd, conn,
                        owner_->ready() ? Response(200, "OK", "ready\n", head_only)
                                        : Response(503, "Service Unavailable", "not ready\n", head_only));
    }
    if (pending_proxy_ >= options_.max_pending_proxy) {
      return refuse(503, "Service Unavailable",
                    absl::StrCat("busy: ", pending_proxy_, " /metrics requests already in flight\n"));
    }
    requests_["proxied"]->Add();
    conn.state = State::kProxying;
    Watch(fd, 0, EPOLL_CTL_MOD, conn.id);
    ++pending_proxy_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(Job{conn.id, fd, std::move(conn.in)});
    }
    conn.in.clear();
    jobs_cv_.notify_one();
  }

  void StartReply(int fd, Conn& conn, std::string reply) {
    conn.in.clear();
    conn.out = std::move(reply);
    conn.out_done = 0;
    conn.state = State::kWriting;
    conn.deadline = Clock::now() + std::chrono::milliseconds(options_.write_timeout_ms);
    Watch(fd, EPOLLOUT, EPOLL_CTL_MOD, conn.id);
    Flush(fd, conn);
  }

  void Flush(int fd, Conn& conn) {
    while (conn.out_done < conn.out.size()) {
      const ssize_t n = send(fd, conn.out.data() + conn.out_done, conn.out.size() - conn.out_done, MSG_NOSIGNAL);
      if (n > 0) {
        conn.out_done += static_cast<size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return;  // EPOLLOUT brings us back
      } else {
        Close(fd);
        return;
      }
    }
    // All out: half-close and read what the peer still sends until it closes, so that unread
    // bytes do not turn our close into a reset that could discard the reply in flight.
    shutdown(fd, SHUT_WR);
    conn.out.clear();
    conn.out.shrink_to_fit();
    conn.state = State::kDraining;
    conn.deadline = Clock::now() + std::chrono::seconds(1);
    Watch(fd, EPOLLIN | EPOLLRDHUP, EPOLL_CTL_MOD, conn.id);
  }

  void Sweep(Clock::time_point now) {
    if (listener_paused_) {
      if (reserve_fd_ < 0) reserve_fd_ = open("/dev/null", O_RDONLY | O_CLOEXEC);
      Watch(listen_fd_, EPOLLIN, EPOLL_CTL_ADD);
      listener_paused_ = false;
    }
    std::vector<std::pair<int, const char*>> expired;
    for (const auto& [fd, conn] : conns_) {
      if (conn.state == State::kProxying || now < conn.deadline) continue;
      expired.emplace_back(fd, conn.state == State::kReading   ? "header_timeout"
                               : conn.state == State::kWriting ? "write_timeout"
                                                               : nullptr);
    }
    for (const auto& [fd, reason] : expired) {
      if (reason != nullptr) closed_[reason]->Add();
      Close(fd);
    }
  }

  void TakeProxyReplies() {
    uint64_t count = 0;
    [[maybe_unused]] ssize_t r = read(event_fd_, &count, sizeof(count));
    std::deque<Job> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      done.swap(done_);
    }
    for (Job& job : done) {
      --pending_proxy_;
      auto it = conns_.find(job.fd);
      if (it == conns_.end() || it->second.id != job.id || it->second.state != State::kProxying) continue;
      StartReply(job.fd, it->second, std::move(job.request));
    }
  }

  // Proxy threads: one request at a time to civetweb over loopback, the whole reply read back
  // (civetweb closes after each), then handed to the epoll thread to write out.
  void ProxyLoop() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        jobs_cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
        if (stopping_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job.request = Forward(job.request);
      {
        std::lock_guard<std::mutex> lock(mu_);
        done_.push_back(std::move(job));
      }
      Wake();
    }
  }

  std::string Forward(const std::string& request) const {
    const auto failed = [](const char* what) {
      return Response(502, "Bad Gateway", absl::StrCat("metrics backend: ", what, ": ", strerror(errno), "\n"), false);
    };
    const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return failed("socket");
    timeval tv{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(backend_port_));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string reply;
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      reply = failed("connect");
    } else if (send(fd, request.data(), request.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(request.size())) {
      reply = failed("send");
    } else {
      char buf[65536];
      for (;;) {
        const ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n > 0) {
          reply.append(buf, static_cast<size_t>(n));
          if (reply.size() > (64u << 20)) break;
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) reply = failed("recv");
        break;
      }
      if (reply.empty()) reply = Response(502, "Bad Gateway", "metrics backend closed without a reply\n", false);
    }
    close(fd);
    return reply;
  }

  HttpEndpoint* owner_;
  HttpGuardOptions options_;
  const int listen_fd_;
  const int backend_port_;
  int event_fd_ = -1;
  int epoll_fd_ = -1;
  int reserve_fd_ = -1;

  // Epoll thread only.
  std::unordered_map<int, Conn> conns_;
  std::unordered_map<std::string, int> per_address_;
  uint64_t next_id_ = 0;
  int pending_proxy_ = 0;
  bool listener_paused_ = false;
  uint64_t shed_since_log_ = 0;
  Clock::time_point last_shed_log_{};
  std::unordered_map<std::string, Counter*> closed_;
  std::unordered_map<std::string, Counter*> requests_;
  Gauge* open_ = nullptr;

  std::mutex mu_;
  std::condition_variable jobs_cv_;
  bool stopping_ = false;
  std::deque<Job> jobs_;
  std::deque<Job> done_;

  std::thread loop_;
  std::vector<std::thread> proxies_;
};

HttpEndpoint::HttpEndpoint(MetricsRegistry* registry, std::function<void()> before_render, HttpGuardOptions options)
    : registry_(registry), before_render_(std::move(before_render)), options_(options) {}

HttpEndpoint::~HttpEndpoint() { Stop(); }

absl::StatusOr<int> HttpEndpoint::Start(const std::string& listen) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(listen, &host, &port); !s.ok()) return s;
  if (host == "localhost") host = "127.0.0.1";

  // The public listener, the guard's.
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV | AI_NUMERICHOST;
  addrinfo* found = nullptr;
  const std::string port_text = absl::StrCat(port);
  if (int rc = getaddrinfo(host.c_str(), port_text.c_str(), &hints, &found); rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address ", listen, ": '", host, "' is not a numeric address (", gai_strerror(rc), ")"));
  }
  int listen_fd = -1;
  int bind_errno = 0;
  for (addrinfo* a = found; a != nullptr && listen_fd < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
      listen_fd = fd;
    } else {
      bind_errno = errno;
      close(fd);
    }
  }
  freeaddrinfo(found);
  if (listen_fd < 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", listen, ": ", strerror(bind_errno)));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof(bound);
  getsockname(listen_fd, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  const int bound_port = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6&>(bound).sin6_port
                                                           : reinterpret_cast<sockaddr_in&>(bound).sin_port);

  // civetweb behind it, on loopback: it only ever sees complete requests from the proxy threads.
  mg_init_library(0);
  const char* options[] = {"listening_ports", "127.0.0.1:0",       "num_threads", "4",    "request_timeout_ms",
                           "10000",           "enable_keep_alive", "no",          nullptr};
  mg_callbacks callbacks{};
  ctx_ = mg_start(&callbacks, this, options);
  if (ctx_ == nullptr) {
    close(listen_fd);
    return absl::UnavailableError("cannot start the metrics backend (civetweb) on 127.0.0.1");
  }
  mg_set_request_handler(ctx_, "/metrics$", &HttpEndpoint::HandleMetrics, this);
  // Everything else, registered last (civetweb takes the first match): our own short 404, which
  // also says where to look (civetweb's error page needs more stack than its workers have under
  // AddressSanitizer).
  mg_set_request_handler(ctx_, "**", &HttpEndpoint::HandleNotFound, this);
  mg_server_port backend[4];
  std::memset(backend, 0, sizeof(backend));
  if (mg_get_server_ports(ctx_, 4, backend) < 1) {
    Stop();
    close(listen_fd);
    return absl::UnavailableError("the metrics backend (civetweb) reports no port");
  }
  guard_ = std::make_unique<Guard>(this, listen_fd, backend[0].port);
  return bound_port;
}

void HttpEndpoint::Stop() {
  guard_.reset();
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

}  // namespace engram
