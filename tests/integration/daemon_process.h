// Test helpers for the integration tests: run a command, GET over loopback HTTP, and an engramd
// child process with its own loopback ports, socket and log.
#ifndef ENGRAM_TESTS_INTEGRATION_DAEMON_PROCESS_H_
#define ENGRAM_TESTS_INTEGRATION_DAEMON_PROCESS_H_

#include <arpa/inet.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace engram::testing {

// Runs a command, returns (exit code, stdout+stderr).
inline std::pair<int, std::string> RunCommand(const std::string& cmd, bool with_stderr = true) {
  std::string out;
  FILE* p = popen((cmd + (with_stderr ? " 2>&1" : " 2>/dev/null")).c_str(), "r");
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// A plain HTTP/1.1 GET on 127.0.0.1; returns (status code, body), or -1 after 20 s without a reply.
inline std::pair<int, std::string> HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return {-1, ""};
  }
  timeval timeout{20, 0};  // a daemon that never answers fails the test instead of hanging it
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string resp;
  char buf[8192];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, static_cast<size_t>(n));
  close(fd);
  const size_t sp = resp.find(' ');
  const size_t body = resp.find("\r\n\r\n");
  if (sp == std::string::npos || body == std::string::npos) return {-1, resp};
  return {std::stoi(resp.substr(sp + 1, 3)), resp.substr(body + 4)};
}

// The value of one exposition line ("name{labels}"), or -1 when the daemon does not export it.
inline double MetricValue(int port, const std::string& series) {
  const auto [code, body] = HttpGet(port, "/metrics");
  if (code != 200) return -1;
  const size_t at = body.find("\n" + series + " ");
  if (at == std::string::npos) return -1;
  return std::stod(body.substr(at + series.size() + 2));
}

// engramd as a child process; ports are read from --ports-file.
class Daemon {
 public:
  Daemon(const std::vector<std::string>& args, const std::string& dir) : log_path_(dir + "/engramd.log") {
    const std::string ports = dir + "/ports.json";
    std::remove(ports.c_str());
    std::vector<std::string> argv = {ENGRAMD_PATH, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
                                     "--ports-file", ports, "--socket", dir + "/engramd.sock"};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::fopen(log_path_.c_str(), "w");
      dup2(fileno(log), 1);
      dup2(fileno(log), 2);
      std::vector<char*> cargv;
      for (auto& a : argv) cargv.push_back(a.data());
      cargv.push_back(nullptr);
      execv(cargv[0], cargv.data());
      _exit(127);
    }
    for (int i = 0; i < 600 && !std::ifstream(ports).good(); ++i) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        pid_ = -1;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    const auto j = nlohmann::json::parse(ReadFile(ports));
    grpc_port_ = j["grpc_port"];
    socket_ = j.value("socket", "");
    metrics_port_ = j["metrics_port"];
  }
  ~Daemon() {
    if (pid_ > 0) Stop();
  }
  // SIGTERM and wait (bounded); returns the exit code.
  int Stop() {
    if (pid_ <= 0) return exit_code_;
    kill(pid_, SIGTERM);
    for (int i = 0; i < 200; ++i) {
      int status;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        return exit_code_;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    return -1;
  }
  // SIGKILL (no shutdown at all, as after a crash) and reap.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  bool running() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }
  int exit_code() const { return exit_code_; }
  int grpc_port() const { return grpc_port_; }
  int metrics_port() const { return metrics_port_; }
  std::string socket() const { return socket_; }
  std::string log() const { return ReadFile(log_path_); }
  // Waits (at most timeout_ms) until the daemon's log contains `needle`; true if it does.
  bool WaitForLog(const std::string& needle, int timeout_ms = 5000) const {
    for (int waited = 0; log().find(needle) == std::string::npos; waited += 50) {
      if (waited >= timeout_ms) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return true;
  }

 private:
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
  int grpc_port_ = 0, metrics_port_ = 0;
  std::string socket_;
};

}  // namespace engram::testing

#endif  // ENGRAM_TESTS_INTEGRATION_DAEMON_PROCESS_H_
