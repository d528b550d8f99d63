#include "bench/health.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "bench/percentile.h"
#include "nlohmann/json.hpp"
#include "service/cli_flags.h"
#include "service/http_endpoint.h"

namespace engram {
namespace {

using Clock = std::chrono::steady_clock;

double Ms(Clock::duration d) { return std::chrono::duration<double, std::milli>(d).count(); }

bool Resolve(const std::string& host, int port, sockaddr_in* addr) {
  *addr = sockaddr_in{};
  addr->sin_family = AF_INET;
  addr->sin_port = htons(static_cast<uint16_t>(port));
  return inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host.c_str(), &addr->sin_addr) == 1;
}

// A connection from `source` (empty: the kernel's choice); -1 on failure.
int Open(const sockaddr_in& to, const std::string& source) {
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  if (!source.empty()) {
    sockaddr_in from{};
    from.sin_family = AF_INET;
    inet_pton(AF_INET, source.c_str(), &from.sin_addr);
    if (bind(fd, reinterpret_cast<const sockaddr*>(&from), sizeof(from)) != 0) {
      close(fd);
      return -1;
    }
  }
  // Nonblocking: a connection still in the daemon's backlog is held as much as an accepted one.
  fcntl(fd, F_SETFL, O_NONBLOCK);
  if (connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to)) != 0 && errno != EINPROGRESS) {
    close(fd);
    return -1;
  }
  return fd;
}

// One probe: connect, GET, read to the end within timeout_ms. Milliseconds, or -1 on failure.
double Probe(const sockaddr_in& to, const std::string& path, int timeout_ms) {
  const Clock::time_point t0 = Clock::now();
  const Clock::time_point deadline = t0 + std::chrono::milliseconds(timeout_ms);
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  connect(fd, reinterpret_cast<const sockaddr*>(&to), sizeof(to));
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n";
  size_t sent = 0;
  std::string reply;
  double result = -1;
  for (;;) {
    const int left =
        static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count());
    if (left <= 0) break;
    pollfd p{fd, static_cast<short>(sent < request.size() ? POLLOUT : POLLIN), 0};
    if (poll(&p, 1, left) <= 0) break;
    if (sent < request.size()) {
      const ssize_t n = send(fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<size_t>(n);
      continue;
    }
    char buf[4096];
    const ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n < 0 && errno == EAGAIN) continue;
    if (n > 0) {
      reply.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0 && reply.compare(0, 12, "HTTP/1.1 200") == 0) result = Ms(Clock::now() - t0);
    break;
  }
  close(fd);
  return result;
}

struct Held {
  std::vector<int> fds;
  std::vector<std::string> sources;
  uint64_t reopened = 0;
  // Reopens every connection the daemon has closed.
  void Refill(const sockaddr_in& to) {
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i] >= 0) {
        pollfd p{fds[i], POLLIN | POLLRDHUP, 0};
        if (poll(&p, 1, 0) <= 0) continue;
        close(fds[i]);
      }
      fds[i] = Open(to, sources[i]);
      ++reopened;
    }
  }
  int open() const {
    return static_cast<int>(std::count_if(fds.begin(), fds.end(), [](int fd) { return fd >= 0; }));
  }
  void CloseAll() {
    for (int& fd : fds) {
      if (fd >= 0) close(fd);
      fd = -1;
    }
  }
};

}  // namespace

int HealthBench(int argc, char** argv) {
  std::string metrics = "127.0.0.1:9464", path = "/readyz";
  int64_t idle = 500, sources = 20, probes = 100, rounds = 5, timeout_ms = 1000, gap_ms = 10;
  bool json = false;
  FlagSet flags("engram-bench health",
                "engram-bench health --metrics HOST:PORT [--idle N] [--path /readyz]: times health probes\n"
                "(a fresh connection each, kubelet's way) on a quiet metrics port and with N idle connections\n"
                "held on it, reopened whenever engramd closes one, in interleaved rounds. On loopback the idle\n"
                "connections come from --sources addresses (127.0.0.2, 127.0.0.3, ...), as from many clients.");
  flags.String("metrics", &metrics, "engramd's --metrics-listen address (IPv4 HOST:PORT)");
  flags.String("path", &path, "/readyz or /healthz");
  flags.Int("idle", &idle, "idle connections held in the abused rounds");
  flags.Int("sources", &sources,
            "loopback source addresses the idle connections come from (0: the kernel's choice, one address)");
  flags.Int("probes", &probes, "probes per round");
  flags.Int("rounds", &rounds, "rounds of each kind, interleaved");
  flags.Int("timeout-ms", &timeout_ms, "a probe slower than this fails (kubelet's default is 1 s)");
  flags.Int("gap-ms", &gap_ms, "pause between probes");
  flags.Bool("json", &json, "print one JSON object on one line");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  std::string host;
  int port = 0;
  sockaddr_in to{};
  if (absl::Status s = SplitHostPort(metrics, &host, &port); !s.ok() || !Resolve(host, port, &to)) {
    std::fprintf(stderr, "engram-bench health: --metrics %s is not an IPv4 HOST:PORT\n", metrics.c_str());
    return 2;
  }
  if (rlimit files{}; getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  const bool loopback = (ntohl(to.sin_addr.s_addr) >> 24) == 127;
  Held held;
  for (int64_t i = 0; i < idle; ++i) {
    held.fds.push_back(-1);
    held.sources.push_back(loopback && sources > 0 ? "127.0.0." + std::to_string(2 + i % sources) : "");
  }
  if (Probe(to, path, timeout_ms) < 0) {
    std::fprintf(stderr, "engram-bench health: no 200 from http://%s%s within %lld ms\n", metrics.c_str(), path.c_str(),
                 static_cast<long long>(timeout_ms));
    return 1;
  }
  std::vector<double> quiet, abused;
  int64_t quiet_failed = 0, abused_failed = 0, held_min = idle;
  for (int64_t r = 0; r < rounds; ++r) {
    for (const bool abuse : {false, true}) {
      if (abuse) held.Refill(to);
      for (int64_t p = 0; p < probes; ++p) {
        if (abuse) {
          held.Refill(to);
          held_min = std::min<int64_t>(held_min, held.open());
        }
        const double ms = Probe(to, path, static_cast<int>(timeout_ms));
        if (ms < 0) {
          ++(abuse ? abused_failed : quiet_failed);
        } else {
          (abuse ? abused : quiet).push_back(ms);
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(gap_ms));
      }
      if (abuse) held.CloseAll();
    }
  }
  const nlohmann::json out = {
      {"tool", "engram-bench"},
      {"mode", "health"},
      {"path", path},
      {"idle_connections", idle},
      {"idle_sources", loopback ? sources : 1},
      {"idle_held_min", held_min},
      {"idle_reopened", held.reopened},
      {"probes_per_kind", probes * rounds},
      {"timeout_ms", timeout_ms},
      {"quiet",
       {{"p50_ms", Percentile(quiet, 0.5)},
        {"p99_ms", Percentile(quiet, 0.99)},
        {"max_ms", Percentile(quiet, 1.0)},
        {"failed", quiet_failed}}},
      {"abused",
       {{"p50_ms", Percentile(abused, 0.5)},
        {"p99_ms", Percentile(abused, 0.99)},
        {"max_ms", Percentile(abused, 1.0)},
        {"failed", abused_failed}}},
  };
  if (json) {
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("engram-bench health  %s%s  %lld probes each, %lld ms timeout\n", metrics.c_str(), path.c_str(),
              static_cast<long long>(probes * rounds), static_cast<long long>(timeout_ms));
  std::printf("  %-32s %10s %10s %10s %8s\n", "", "p50 ms", "p99 ms", "max ms", "failed");
  for (const auto& [name, kind] : {std::pair{"quiet", "quiet"}, std::pair{"idle", "abused"}}) {
    const auto& k = out[kind];
    const std::string label =
        std::string(name) == "quiet" ? "quiet port" : std::to_string(idle) + " idle connections held";
    std::printf("  %-32s %10.2f %10.2f %10.2f %8lld\n", label.c_str(), k["p50_ms"].get<double>(),
                k["p99_ms"].get<double>(), k["max_ms"].get<double>(),
                static_cast<long long>(k["failed"].get<int64_t>()));
  }
  std::printf("  (idle connections reopened %llu times; fewest held at once %lld)\n",
              static_cast<unsigned long long>(held.reopened), static_cast<long long>(held_min));
  return 0;
}

}  // namespace engram
