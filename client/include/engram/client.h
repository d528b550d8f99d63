// libengram_client: what an inference engine links to talk to engramd.
//
//   auto client = engram::Client::Connect("unix:///run/engram/engramd.sock");  // or "grpc://host:port"
//   auto table = (*client)->OpenTable("demo");            // layout from the daemon
//   (*table)->hasher().HashCompressed(...)                // or LookupTokens to hash and fetch at once
//   (*client)->Lookup(**table, layer, num_tokens, indices, out);
//
// Rows land in caller-provided host buffers. Over unix:// a table the daemon holds resident is
// mapped read-only and gathered here without a round trip (ClientOptions::map_tables). Errors are absl::Status values carrying the
// daemon's message. When the daemon goes away, a call fails with UNAVAILABLE within a bounded time
// (its own deadline, and at most about connect_timeout_ms past the failure) while a background
// thread reconnects with backoff; once the daemon is back, the next call goes through on the new
// connection (tables reopened). Thread-safe: calls are serialized per Client; use one Client per
// engine thread for parallelism.
#ifndef ENGRAM_CLIENT_CLIENT_H_
#define ENGRAM_CLIENT_CLIENT_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

struct ClientOptions {
  uint64_t shm_data_bytes = 64ull << 20;  // unix://: the largest request's indices + rows must fit
  int timeout_ms = 30000;                 // a call's deadline unless it sets its own (CallTimeout)
  // One connection attempt waits at most this long (gRPC: for the channel to connect; unix://
  // fails or succeeds at once). A call that finds the daemon gone waits for at most one attempt.
  int connect_timeout_ms = 1000;
  // The background reconnector's pause between failed attempts: doubling from the first to the
  // second value. A call on a broken connection asks for an attempt at once.
  int reconnect_backoff_ms = 50;
  int reconnect_backoff_max_ms = 2000;
  // unix://: map tables the daemon holds resident (read-only) and gather from them here, with no
  // round trip; the daemon still counts them (the client reports about once a second).
  bool map_tables = true;
  // LookupToDevice over a mapped table: register the mapping with CUDA (read-only) and let one
  // kernel read the rows the HBM tier lacks straight from host memory, as engines do with their
  // pinned tables. False, or where the device cannot: the rows are gathered here into pinned
  // staging and copied.
  bool device_direct_gather = true;
  // How often a mapped table reports its counts, which is also how soon it notices the daemon
  // went away (then UNAVAILABLE and a reconnect, like any other call).
  int mapped_report_interval_ms = 1000;
};

// Bounds every Client call this thread makes while it lives, in milliseconds (0 or less: each
// Client's ClientOptions::timeout_ms), e.g. `{ engram::CallTimeout t(5); client->Lookup(...); }`;
// a LookupAsync posted under it keeps it. A call that runs out fails with DEADLINE_EXCEEDED
// (gRPC) or UNAVAILABLE (shared memory: the daemon did not answer in time).
class CallTimeout {
 public:
  explicit CallTimeout(int timeout_ms);
  ~CallTimeout();
  CallTimeout(const CallTimeout&) = delete;
  CallTimeout& operator=(const CallTimeout&) = delete;
  // The timeout in force on this thread: the innermost CallTimeout's, else `default_ms`.
  static int Effective(int default_ms);
  static int Current();  // the innermost CallTimeout's, or 0

 private:
  int previous_;
};

// A table's layout as the daemon describes it, with the hasher for its N-gram indices.
class TableHandle {
 public:
  const std::string& name() const { return name_; }
  const std::string& dtype() const { return dtype_; }
  uint32_t dim() const { return dim_; }
  uint32_t row_bytes() const { return row_bytes_; }
  uint32_t heads() const { return heads_; }
  std::vector<int> layer_ids() const;
  const NgramHasher& hasher() const { return *hasher_; }
  // The Engram module the rows feed: "demo" or "dsv41" (the pack's manifest `module`).
  const std::string& module() const { return module_; }

  // Builds one from a serialized engram.v1.TableInfo.
  static absl::StatusOr<std::shared_ptr<TableHandle>> FromTableInfo(const std::string& serialized);

 private:
  std::string name_, dtype_, module_ = "demo";
  uint32_t dim_ = 0, row_bytes_ = 0, heads_ = 0;
  std::unique_ptr<NgramHasher> hasher_;
};

struct ClientLookupStats {
  uint64_t rows_read = 0, dram_rows = 0, nvme_rows = 0;
};

class Transport;
class DeviceStaging;

class Client {
 public:
  static absl::StatusOr<std::unique_ptr<Client>> Connect(const std::string& uri, const ClientOptions& options = {});
  ~Client();

  absl::StatusOr<std::shared_ptr<const TableHandle>> OpenTable(const std::string& name);

  // Rows of head-local `indices` [num_tokens][heads] into `out` ([num_tokens][heads][row_bytes]).
  absl::Status Lookup(const TableHandle& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                      absl::Span<uint8_t> out, ClientLookupStats* stats = nullptr);
  // The same, run by this Client's async worker (one thread, started by the first call; calls
  // run in the order made). `indices` and `out` must stay alive until the future is ready or
  // `done` has run. Destroying the Client first finishes every call already made.
  std::future<absl::Status> LookupAsync(std::shared_ptr<const TableHandle> table, int layer, uint32_t num_tokens,
                                        absl::Span<const uint32_t> indices, absl::Span<uint8_t> out);
  // Callback form: `done` runs on the worker thread with the lookup's status, exactly once. It
  // must not wait for another LookupAsync of this Client (the one worker would wait on itself)
  // nor destroy the Client; what it throws is dropped.
  void LookupAsync(std::shared_ptr<const TableHandle> table, int layer, uint32_t num_tokens,
                   absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                   std::function<void(absl::Status)> done);
  absl::Status Prefetch(const TableHandle& table, int layer, uint32_t num_tokens, absl::Span<const uint32_t> indices);
  // Rows into GPU memory: looked up into a pinned (page-locked) staging buffer, then copied to
  // `device_out` (device_bytes = num_tokens * heads * row_bytes) with cudaMemcpyAsync on
  // `cuda_stream` (a cudaStream_t; null: the default stream). Returns once the copy is enqueued;
  // the next call waits for it before reusing the buffer. FailedPrecondition when the library was
  // built without CUDA or there is no device.
  absl::Status LookupToDevice(const TableHandle& table, int layer, uint32_t num_tokens,
                              absl::Span<const uint32_t> indices, void* device_out, uint64_t device_bytes,
                              void* cuda_stream = nullptr);
  // Hashes raw token ids [batch][seq_len] here (the table's layout) and looks up one layer.
  absl::Status LookupTokens(const TableHandle& table, int layer, absl::Span<const int32_t> token_ids, uint32_t batch,
                            uint32_t seq_len, absl::Span<uint8_t> out);

  // True when `table`'s lookups are gathered here from a read-only mapping (see map_tables).
  bool IsMapped(const TableHandle& table);
  const std::string& uri() const { return uri_; }

 private:
  Client(std::string uri, ClientOptions options);
  // Runs `call` with the transport (lock holds mu_). On UNAVAILABLE, or when the connection is
  // already broken, asks the reconnector for an attempt and waits for it (mu_ released) until the
  // call's deadline or one connect timeout, then runs `call` once more on the new connection;
  // else returns UNAVAILABLE.
  template <typename F>
  absl::Status WithRetry(std::unique_lock<std::mutex>& lock, const F& call);
  bool AwaitReconnectLocked(std::unique_lock<std::mutex>& lock, std::chrono::steady_clock::time_point deadline);
  absl::Status UnavailableLocked() const;
  void ReconnectLoop();

  std::string uri_;
  ClientOptions options_;
  std::mutex mu_;
  std::unique_ptr<Transport> transport_;
  // The reconnector (started by the first failure) and what it shares with calls, under mu_.
  std::condition_variable reconnect_cv_;
  std::thread reconnector_;
  bool broken_ = false, stopping_ = false, attempt_wanted_ = false;
  uint64_t attempts_started_ = 0, attempts_done_ = 0;  // failed or not, since the Client was made
  std::string last_error_;
  std::mutex device_mu_;                          // serializes LookupToDevice (one staging buffer)
  std::unique_ptr<DeviceStaging> staging_;  // created by the first LookupToDevice

  // LookupAsync's worker: a FIFO of jobs and the thread that runs them. Declared last, so it is
  // stopped (after running what was queued) before the transport goes away.
  class AsyncWorker {
   public:
    ~AsyncWorker();
    void Post(std::function<void()> job);

   private:
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::function<void()>> jobs_;
    bool stopping_ = false;
    std::thread thread_;  // started by the first Post
  };
  AsyncWorker async_;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_CLIENT_H_
