#include "bench/socket_ceiling.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "bench/percentile.h"
#include "nlohmann/json.hpp"
#include "service/cli_flags.h"

namespace engram {
namespace {

using Clock = std::chrono::steady_clock;

bool WriteAll(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    const ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

int SocketCeiling(int argc, char** argv) {
  int64_t bytes = 8 << 20;
  double duration = 5;
  bool json = false;
  FlagSet flags("engram-bench socket",
                "engram-bench socket [--bytes N] [--duration S] [--json]: replies of N bytes over one loopback TCP\n"
                "connection, one request in flight (an 8-byte request, then N bytes back from a buffer made once,\n"
                "read into the client's buffer): the ceiling a unary gRPC Lookup of the same reply size runs against.");
  flags.Int("bytes", &bytes, "reply size (8 MiB: a 4096-token batch of 16 heads of 128-byte rows)");
  flags.Double("duration", &duration, "seconds to run");
  flags.Bool("json", &json, "print one JSON object on one line");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (bytes < 1 || duration <= 0) {
    std::fprintf(stderr, "engram-bench socket: --bytes and --duration must be positive\n");
    return 2;
  }
  const int listener = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      listen(listener, 1) != 0 || getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    std::fprintf(stderr, "engram-bench socket: cannot listen on 127.0.0.1: %s\n", std::strerror(errno));
    return 1;
  }
  std::thread server([&] {
    const int fd = accept(listener, nullptr, nullptr);
    if (fd < 0) return;
    std::vector<uint8_t> reply(static_cast<size_t>(bytes));
    for (size_t i = 0; i < reply.size(); ++i) reply[i] = static_cast<uint8_t>(i * 131);
    uint64_t want = 0;
    while (ReadAll(fd, reinterpret_cast<uint8_t*>(&want), sizeof(want)) && want == reply.size()) {
      if (!WriteAll(fd, reply.data(), reply.size())) break;
    }
    close(fd);
  });
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    std::fprintf(stderr, "engram-bench socket: cannot connect to 127.0.0.1:%d: %s\n", ntohs(addr.sin_port),
                 std::strerror(errno));
    close(listener);
    server.detach();
    return 1;
  }
  std::vector<uint8_t> out(static_cast<size_t>(bytes));
  std::vector<double> us;
  const uint64_t want = static_cast<uint64_t>(bytes);
  bool ok = true;
  const auto start = Clock::now();
  const auto end = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(duration));
  while (ok && Clock::now() < end) {
    const auto t0 = Clock::now();
    ok = WriteAll(fd, reinterpret_cast<const uint8_t*>(&want), sizeof(want)) && ReadAll(fd, out.data(), out.size());
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  shutdown(fd, SHUT_WR);
  close(fd);
  server.join();
  close(listener);
  // The bytes arrived as sent (a wrong count or a torn reply would show here).
  for (size_t i = 0; ok && i < out.size(); i += 4093) ok = out[i] == static_cast<uint8_t>(i * 131);
  if (!ok || us.empty()) {
    std::fprintf(stderr, "engram-bench socket: the loopback transfer failed\n");
    return 1;
  }
  const double per_s = static_cast<double>(us.size()) * static_cast<double>(bytes) / elapsed;
  const nlohmann::json r = {{"tool", "engram-bench"},         {"mode", "socket"},     {"bytes_per_reply", bytes},
                            {"replies", us.size()},           {"bytes_per_s", per_s}, {"p50_us", Percentile(us, 0.5)},
                            {"p99_us", Percentile(us, 0.99)}, {"duration_s", elapsed}};
  if (json) {
    std::printf("%s\n", r.dump().c_str());
  } else {
    std::printf(
        "engram-bench socket  %lld-byte replies over loopback TCP: %.2f GB/s, p50 %.0f us, p99 %.0f us (%zu replies)\n",
        static_cast<long long>(bytes), per_s / 1e9, Percentile(us, 0.5), Percentile(us, 0.99), us.size());
  }
  return 0;
}

}  // namespace engram
