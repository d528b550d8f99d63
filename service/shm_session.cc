#include "service/shm_session.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engram/shm_arena.h"
#include "engram/shm_protocol.h"
#include "engram/shm_socket.h"
#include "service/log.h"
#include "service/shm_control.h"
#include "service/shm_server.h"
#include "tiering/layout/request_rows.h"

namespace engram {

using shm::ArenaHeader;
using shm::Completion;
using shm::RequestDescriptor;

namespace {

// One client's arena as the daemon holds it: a sealed memfd (the client can neither shrink nor
// grow it, so the daemon's mapping never faults), mapped here, and the two eventfds. Every read
// of shared memory goes through the view, which copies descriptors out before they are checked.
class ServerArena {
 public:
  ~ServerArena() {
    if (base_ != nullptr) munmap(base_, layout_.arena_bytes);
    for (int fd : {memfd_, request_efd_, completion_efd_}) {
      if (fd >= 0) close(fd);
    }
  }
  absl::Status Create(uint32_t entries, uint64_t data_bytes) {
    auto layout = shm::ComputeArenaLayout(entries, data_bytes);
    if (!layout.ok()) return layout.status();
    layout_ = *layout;
    memfd_ = memfd_create("engram-client-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (memfd_ < 0) return absl::InternalError(absl::StrCat("memfd_create: ", std::strerror(errno)));
    if (ftruncate(memfd_, static_cast<off_t>(layout_.arena_bytes)) != 0) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot size a ", layout_.arena_bytes, "-byte arena: ", std::strerror(errno)));
    }
    if (fcntl(memfd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return absl::InternalError(absl::StrCat("sealing the arena: ", std::strerror(errno)));
    }
    void* p = mmap(nullptr, layout_.arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd_, 0);
    if (p == MAP_FAILED) return absl::ResourceExhaustedError(absl::StrCat("mmap arena: ", std::strerror(errno)));
    base_ = static_cast<uint8_t*>(p);
    auto* h = new (base_) ArenaHeader();
    h->magic = shm::kMagic;
    h->version = shm::kVersion;
    h->ring_entries = entries;
    view_ = shm::ArenaView(base_, layout_);
    request_efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    completion_efd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (request_efd_ < 0 || completion_efd_ < 0) {
      return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }
  const shm::ArenaView& view() const { return view_; }
  shm::HelloReply Reply() const { return shm::ReplyFor(layout_); }
  uint32_t entries() const { return layout_.ring_entries; }
  int memfd() const { return memfd_; }
  int request_efd() const { return request_efd_; }
  int completion_efd() const { return completion_efd_; }

 private:
  uint8_t* base_ = nullptr;
  shm::ArenaLayout layout_;
  shm::ArenaView view_;
  int memfd_ = -1, request_efd_ = -1, completion_efd_ = -1;
};

void SetMessage(Completion* c, const absl::Status& s) {
  c->status = static_cast<int32_t>(s.code());
  const std::string m(s.message());
  std::snprintf(c->message, sizeof(c->message), "%s", m.c_str());
}

}  // namespace

ShmSession::~ShmSession() {
  if (thread_.joinable()) thread_.join();
  if (sock_ >= 0) close(sock_);
}

void ShmSession::ShutDownSocket() const { shutdown(sock_, SHUT_RDWR); }

void ShmSession::WaitForHangUp() {
  const int sock = sock_;
  char discard[4096];
  while (!ctx_.stopping->load()) {
    pollfd p{sock, POLLIN | POLLRDHUP, 0};
    const int rc = poll(&p, 1, 200);
    if (rc < 0 && errno != EINTR) return;
    if (rc <= 0) continue;
    if (p.revents & (POLLHUP | POLLERR | POLLRDHUP | POLLNVAL)) return;
    // Whatever the client still sends is dropped (descriptors with it are closed by the kernel).
    const ssize_t n = recv(sock, discard, sizeof(discard), MSG_DONTWAIT);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) return;
  }
}

void ShmSession::Serve() {
  const int sock = sock_;
  const std::string who = absl::StrCat(pid_);
  ShmClientState* watched = nullptr;  // set once the client exists: its HBM pins
  auto finish = [&](const std::string& reason) {
    LogInfo("shm_client_gone", {{"pid", who}, {"reason", reason}});
    if (watched != nullptr && !watched->readers.empty() && !ctx_.stopping->load()) {
      // The daemon ends this session, but the client may still be reading HBM slots under a pin.
      // Its pins stay watched until its socket hangs up (peer pids are no help across PID
      // namespaces); at shutdown the promoter has stopped first, so nothing moves any more.
      shutdown(sock, SHUT_WR);  // the client sees end-of-stream and gives up its session
      WaitForHangUp();
    }
    shutdown(sock, SHUT_RDWR);  // the client sees the hang-up now; the Session closes the fd when reaped
    done_.store(true);
  };
  // Handshake.
  auto hello_frame = shm::ReceiveFrame(sock, 5000);
  if (hello_frame.ok()) {
    for (int fd : hello_frame->fds) close(fd);  // a client has no business sending descriptors
  }
  if (!hello_frame.ok() || hello_frame->type != shm::FrameType::kHello ||
      hello_frame->payload.size() != sizeof(shm::Hello)) {
    return finish("no valid hello");
  }
  shm::Hello hello;
  std::memcpy(&hello, hello_frame->payload.data(), sizeof(hello));
  auto refuse = [&](absl::StatusCode code, const std::string& msg) {
    shm::HelloReply reply{};
    reply.status = static_cast<int32_t>(code);
    std::string payload(reinterpret_cast<const char*>(&reply), sizeof(reply));
    payload += msg;
    (void)shm::SendFrame(sock, shm::FrameType::kHelloReply, payload, {});
    finish(msg);
  };
  if (hello.magic != shm::kMagic || hello.version < shm::kMinVersion || hello.version > shm::kVersion) {
    return refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("protocol version ", hello.version, " is not supported (this engramd speaks ",
                               shm::kMinVersion, " to ", shm::kVersion, ")"));
  }
  const uint32_t entries = hello.ring_entries;
  if (hello.data_bytes == 0 || hello.data_bytes > ctx_.options->max_client_arena_bytes) {
    return refuse(absl::StatusCode::kResourceExhausted,
                  absl::StrCat("data region of ", hello.data_bytes, " bytes is outside (0, --max-client-arena ",
                               ctx_.options->max_client_arena_bytes, "]"));
  }
  ServerArena arena;
  if (absl::Status s = arena.Create(entries, hello.data_bytes); !s.ok()) {
    return refuse(s.code(), std::string(s.message()));
  }
  const shm::HelloReply reply = arena.Reply();
  if (!shm::SendFrame(sock, shm::FrameType::kHelloReply,
                      std::string(reinterpret_cast<const char*>(&reply), sizeof(reply)),
                      {arena.memfd(), arena.request_efd(), arena.completion_efd()})
           .ok()) {
    return finish("hello reply not delivered");
  }
  LogInfo("shm_client", {{"pid", who},
                         {"uid", absl::StrCat(uid_)},
                         {"arena_bytes", absl::StrCat(reply.arena_bytes)},
                         {"ring_entries", absl::StrCat(entries)}});

  ArenaHeader* h = arena.view().header();
  const auto tables = ctx_.engine->tables();
  ShmClientState client;  // declared after the arena: its pins leave the HBM tiers before the arena goes
  watched = &client;
  client.header = h;
  client.mapped.assign(tables.size(), false);
  client.hbm_mapped.assign(tables.size(), false);
  const ShmControlContext control{ctx_.engine, ctx_.metrics, &tables, &client, sock, who};
  uint32_t head = 0, completion_tail = 0;  // the daemon's own copies; shared ones are only published
  RequestMetrics* const lookup_metrics = ctx_.metrics->Requests("shm", "Lookup");  // resolved once per session
  RequestMetrics* const prefetch_metrics = ctx_.metrics->Requests("shm", "Prefetch");
  std::vector<uint32_t> indices;
  for (;;) {
    const uint32_t tail = h->request_tail.load(std::memory_order_acquire);
    const uint32_t queued = tail - head;
    if (queued > entries) return finish("protocol violation: request ring position out of range");
    if (queued == 0) {
      // Spin briefly (the next request is usually microseconds away), then sleep on the eventfd,
      // still watching the socket: its hang-up is how a client's exit shows.
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(ctx_.options->spin_us);
      bool arrived = false;
      while (std::chrono::steady_clock::now() < spin_until) {
        if (h->request_tail.load(std::memory_order_acquire) != head) {
          arrived = true;
          break;
        }
      }
      if (arrived) continue;
      h->daemon_sleeping.store(1, std::memory_order_seq_cst);
      if (h->request_tail.load(std::memory_order_seq_cst) != head) {
        h->daemon_sleeping.store(0, std::memory_order_relaxed);
        continue;
      }
      pollfd fds[2] = {{sock, POLLIN, 0}, {arena.request_efd(), POLLIN, 0}};
      const int rc = poll(fds, 2, 1000);
      h->daemon_sleeping.store(0, std::memory_order_relaxed);
      if (ctx_.stopping->load()) return finish("daemon stopping");
      if (rc < 0 && errno != EINTR) return finish(absl::StrCat("poll: ", std::strerror(errno)));
      if (rc > 0 && (fds[1].revents & POLLIN)) {
        uint64_t counter;
        // Non-blocking: EAGAIN means another wake-up drained it first; anything else is a bug.
        if (read(arena.request_efd(), &counter, sizeof(counter)) < 0 && errno != EAGAIN && errno != EINTR) {
          return finish(absl::StrCat("reading the request eventfd: ", std::strerror(errno)));
        }
      }
      if (rc > 0 && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
        auto frame = shm::ReceiveFrame(sock, 1000);
        if (!frame.ok()) return finish("socket closed");
        for (int fd : frame->fds) close(fd);
        if (frame->type != shm::FrameType::kOpenTable && hello.version < 2) {
          return finish("protocol violation: version 1 clients have no mapped tables");
        }
        if ((frame->type == shm::FrameType::kMapHbm || frame->type == shm::FrameType::kAccessReport) &&
            hello.version < 3) {
          return finish("protocol violation: HBM frames need protocol 3");
        }
        if (absl::Status s = HandleControlFrame(*frame, control); !s.ok()) {
          return finish(std::string(s.message()));
        }
      }
      continue;
    }

    // One request: copy the descriptor out of shared memory, then check everything in it.
    const auto start = std::chrono::steady_clock::now();
    const RequestDescriptor d = arena.view().ReadRequest(head);
    ++head;
    h->request_head.store(head, std::memory_order_release);
    Completion c{};
    c.request_id = d.request_id;
    absl::Status s;
    const Table* table = d.table_id < tables.size() ? tables[d.table_id] : nullptr;
    const uint8_t* index_bytes = arena.view().DataRange(d.indices_offset, d.indices_bytes);
    if (ctx_.draining->load()) {
      s = absl::UnavailableError("engramd is shutting down; reconnect to the restarted daemon");
    } else if (table == nullptr) {
      s = absl::NotFoundError(absl::StrCat("table id ", d.table_id, " is not one this daemon gave out"));
    } else if (d.op != static_cast<uint32_t>(shm::Op::kLookup) && d.op != static_cast<uint32_t>(shm::Op::kPrefetch)) {
      s = absl::InvalidArgumentError(absl::StrCat("unknown op ", d.op));
    } else if (index_bytes == nullptr || d.indices_bytes % 4 != 0) {
      s = absl::InvalidArgumentError(absl::StrCat("indices [", d.indices_offset, ", +", d.indices_bytes,
                                                  ") are not whole uint32 values inside the data region"));
    } else if (absl::Status shape = CheckRequestShape(d.num_tokens, static_cast<uint64_t>(table->heads()),
                                                      d.indices_bytes / 4, ctx_.engine->options().max_batch_rows);
               !shape.ok()) {
      s = shape;  // nothing is copied out of a request before its size is known to be sane
    } else {
      indices.resize(d.indices_bytes / 4);
      // Copied: the client cannot change them now (none to copy for an empty request).
      if (d.indices_bytes > 0) std::memcpy(indices.data(), index_bytes, d.indices_bytes);
      if (d.op == static_cast<uint32_t>(shm::Op::kPrefetch)) {
        s = ctx_.engine->Prefetch(*table, static_cast<int>(d.layer), d.num_tokens, indices).status();
      } else {
        uint8_t* out = arena.view().DataRange(d.out_offset, d.out_bytes);
        if (out == nullptr) {
          s = absl::InvalidArgumentError(
              absl::StrCat("output [", d.out_offset, ", +", d.out_bytes, ") does not lie inside the data region"));
        } else {
          LookupStats stats;
          s = ctx_.engine->Lookup(*table, static_cast<int>(d.layer), d.num_tokens, indices,
                                  absl::MakeSpan(out, d.out_bytes), &stats);
          if (s.ok()) {
            ctx_.metrics->RecordLookup(*table, stats);
            c.rows_read = stats.rows_read;
            c.dram_rows = stats.tiers.rows[static_cast<int>(TierKind::kDram)];
            c.nvme_rows = stats.tiers.rows[static_cast<int>(TierKind::kNvme)];
          }
        }
      }
    }
    SetMessage(&c, s);
    (d.op == static_cast<uint32_t>(shm::Op::kPrefetch) ? prefetch_metrics : lookup_metrics)
        ->Record(s.code(), std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    // Post the completion; a client that stops consuming only stalls its own session.
    for (;;) {
      const uint32_t consumed = h->completion_head.load(std::memory_order_acquire);
      const uint32_t used = completion_tail - consumed;
      if (used > entries) return finish("protocol violation: completion ring position out of range");
      if (used < entries) break;
      pollfd p{sock, POLLIN, 0};
      const int ready = poll(&p, 1, 10);
      if (ready > 0 && (p.revents & (POLLHUP | POLLERR))) return finish("socket closed");
      if (ready > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));  // data, not a hang-up: no spin
      if (ctx_.stopping->load()) return finish("daemon stopping");
    }
    arena.view().WriteCompletion(completion_tail, c);
    ++completion_tail;
    h->completion_tail.store(completion_tail, std::memory_order_seq_cst);
    if (h->client_sleeping.load(std::memory_order_seq_cst)) {
      const uint64_t one = 1;
      // EAGAIN: the counter is saturated, so the client has a wake-up pending anyway.
      if (write(arena.completion_efd(), &one, sizeof(one)) < 0 && errno != EAGAIN && errno != EINTR) {
        return finish(absl::StrCat("waking the client: ", std::strerror(errno)));
      }
    }
  }
}

}  // namespace engram
