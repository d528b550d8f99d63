#include "engram/shm_socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace engram::shm {
namespace {

constexpr uint32_t kMaxPayload = 64u << 20;
constexpr int kMaxFds = 64;  // a MapTable reply carries one per layer

absl::Status WaitReadable(int sock, int timeout_ms) {
  pollfd p{sock, POLLIN, 0};
  for (;;) {
    const int rc = poll(&p, 1, timeout_ms);
    if (rc > 0) return absl::OkStatus();
    if (rc == 0) return absl::DeadlineExceededError("no answer on the engramd socket");
    if (errno != EINTR) return absl::UnavailableError(absl::StrCat("poll: ", std::strerror(errno)));
  }
}

// Reads exactly n bytes (collecting any descriptors that arrive with them).
absl::Status ReadExactly(int sock, char* data, size_t n, int timeout_ms, std::vector<int>* fds) {
  while (n > 0) {
    if (absl::Status s = WaitReadable(sock, timeout_ms); !s.ok()) return s;
    iovec iov{data, n};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    const ssize_t got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (got == 0) return absl::UnavailableError("engramd closed the connection");
    if (got < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return absl::UnavailableError(absl::StrCat("recvmsg: ", std::strerror(errno)));
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
        const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; ++i) {
          int fd;
          std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
          fds->push_back(fd);
        }
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      for (int fd : *fds) close(fd);
      fds->clear();
      return absl::UnavailableError("engramd sent more descriptors than one frame may carry");
    }
    data += got;
    n -= static_cast<size_t>(got);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SendFrame(int sock, FrameType type, const std::string& payload, const std::vector<int>& fds) {
  if (fds.size() > kMaxFds) {
    return absl::ResourceExhaustedError(
        absl::StrCat(fds.size(), " descriptors do not fit one frame (at most ", kMaxFds, ")"));
  }
  FrameHeader header{static_cast<uint32_t>(type), static_cast<uint32_t>(payload.size())};
  std::string bytes(reinterpret_cast<const char*>(&header), sizeof(header));
  bytes += payload;
  size_t sent = 0;
  bool fds_sent = fds.empty();
  while (sent < bytes.size()) {
    iovec iov{bytes.data() + sent, bytes.size() - sent};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    if (!fds_sent) {
      msg.msg_control = control;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    const ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat("sendmsg: ", std::strerror(errno)));
    }
    fds_sent = true;
    sent += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<Frame> ReceiveFrame(int sock, int timeout_ms) {
  Frame frame;
  FrameHeader header;
  if (absl::Status s = ReadExactly(sock, reinterpret_cast<char*>(&header), sizeof(header), timeout_ms, &frame.fds);
      !s.ok()) {
    for (int fd : frame.fds) close(fd);
    return s;
  }
  if (header.payload_bytes > kMaxPayload) {
    for (int fd : frame.fds) close(fd);
    return absl::InvalidArgumentError(absl::StrCat("frame of ", header.payload_bytes, " bytes is too large"));
  }
  frame.type = static_cast<FrameType>(header.type);
  frame.payload.resize(header.payload_bytes);
  if (absl::Status s = ReadExactly(sock, frame.payload.data(), frame.payload.size(), timeout_ms, &frame.fds); !s.ok()) {
    for (int fd : frame.fds) close(fd);
    return s;
  }
  return frame;
}

}  // namespace engram::shm
