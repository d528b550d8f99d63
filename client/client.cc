#include "engram/client.h"

#include <cstdio>
#include <cstdlib>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "client/device_staging.h"
#include "client/transport.h"
#include "engram/shm_client.h"
#include "engram/v1/engram.pb.h"

namespace engram {

std::vector<int> TableHandle::layer_ids() const {
  std::vector<int> ids;
  for (const auto& l : hasher_->layers()) ids.push_back(l.layer_id);
  return ids;
}

absl::StatusOr<std::shared_ptr<TableHandle>> TableHandle::FromTableInfo(const std::string& serialized) {
  v1::TableInfo info;
  if (!info.ParseFromString(serialized)) return absl::DataLossError("the table layout from engramd did not parse");
  HashConfig config;
  config.max_ngram = static_cast<int>(info.hash().max_ngram());
  config.heads_per_ngram = static_cast<int>(info.hash().heads_per_ngram());
  config.seed = info.hash().seed();
  for (uint64_t v : info.hash().vocab_per_ngram()) config.vocab_per_ngram.push_back(static_cast<int64_t>(v));
  config.pad_id = info.hash().pad_id();
  config.compressed_vocab = static_cast<int64_t>(info.hash().compressed_vocab());
  if (info.hash().has_dead_token_id()) config.dead_token_id = info.hash().dead_token_id();
  config.compress_lut.resize(info.hash().compress_lut().size() / 4);
  if (!config.compress_lut.empty()) {  // (memcpy from an empty string's null data is undefined)
    std::memcpy(config.compress_lut.data(), info.hash().compress_lut().data(), config.compress_lut.size() * 4);
  }
  std::vector<LayerHashLayout> layers;
  for (const auto& l : info.layers()) {
    LayerHashLayout layout;
    layout.layer_id = static_cast<int>(l.id());
    for (uint64_t r : l.head_rows()) layout.head_rows.push_back(static_cast<int64_t>(r));
    for (int64_t m : l.multipliers()) layout.multipliers.push_back(m);
    layers.push_back(std::move(layout));
  }
  auto hasher = NgramHasher::Create(std::move(config), std::move(layers));
  if (!hasher.ok()) return hasher.status();
  auto handle = std::shared_ptr<TableHandle>(new TableHandle());
  handle->name_ = info.name();
  handle->dtype_ = info.dtype();
  handle->dim_ = info.dim();
  handle->row_bytes_ = info.row_bytes();
  handle->heads_ = info.heads();
  if (!info.module().empty()) handle->module_ = info.module();
  handle->hasher_ = std::move(*hasher);
  return handle;
}

namespace {

absl::StatusOr<std::unique_ptr<Transport>> MakeTransport(const std::string& uri, const ClientOptions& options) {
  if (absl::StartsWith(uri, "unix://")) return MakeShmTransport(uri.substr(7), options);
  if (absl::StartsWith(uri, "grpc://")) return MakeGrpcTransport(uri.substr(7), options);
  return absl::InvalidArgumentError(absl::StrCat("'", uri, "' is neither unix:///SOCKET nor grpc://HOST:PORT"));
}

}  // namespace

namespace {
thread_local int call_timeout_ms = 0;
}  // namespace

CallTimeout::CallTimeout(int timeout_ms) : previous_(call_timeout_ms) { call_timeout_ms = std::max(0, timeout_ms); }
CallTimeout::~CallTimeout() { call_timeout_ms = previous_; }
int CallTimeout::Effective(int default_ms) { return call_timeout_ms > 0 ? call_timeout_ms : default_ms; }
int CallTimeout::Current() { return call_timeout_ms; }

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(const std::string& uri, const ClientOptions& options) {
  auto transport = MakeTransport(uri, options);  // it waits connect_timeout_ms at most to connect
  if (!transport.ok()) return transport.status();
  std::unique_ptr<Client> client(new Client(uri, options));
  client->transport_ = std::move(*transport);
  return client;
}

Client::Client(std::string uri, ClientOptions options) : uri_(std::move(uri)), options_(options) {}

Client::~Client() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  reconnect_cv_.notify_all();
  if (reconnector_.joinable()) reconnector_.join();
}

absl::Status Client::LookupToDevice(const TableHandle& table, int layer, uint32_t num_tokens,
                                    absl::Span<const uint32_t> indices, void* device_out, uint64_t device_bytes,
                                    void* cuda_stream) {
  const uint64_t bytes = static_cast<uint64_t>(indices.size()) * table.row_bytes();
  if (device_bytes != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("device buffer holds ", device_bytes, " bytes; ", indices.size(),
                                                   " rows x ", table.row_bytes(), " bytes = ", bytes, " expected"));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (staging_ == nullptr) {
      auto staging = DeviceStaging::Create();
      if (!staging.ok()) return staging.status();
      staging_ = std::move(*staging);
    }
  }
  // One LookupToDevice at a time per Client: the staging buffer is shared.
  std::lock_guard<std::mutex> device_lock(device_mu_);
  {
    // Straight from the daemon's HBM tier where it runs one on this GPU (hits never leave the
    // device); any reason it cannot (another GPU, every pin busy) falls through to staging.
    std::lock_guard<std::mutex> lock(mu_);
    // Not through a broken connection: its daemon (and the slots it exported) may be gone.
    MappedTable* mapped = broken_ ? nullptr : transport_->mapped_table(table.name());
    // A mapped table the GPU reads itself: no CPU gather, no staging copy (misses cross PCIe
    // once, straight into device_out).
    if (mapped != nullptr && options_.device_direct_gather) {
      absl::Status s = staging_->GatherDirect(mapped, layer, num_tokens, indices, device_out, cuda_stream);
      // UNAVAILABLE (the daemon is gone, seen at a report) goes the staged way too: its Lookup
      // marks the connection broken and starts the reconnect.
      if (s.code() != absl::StatusCode::kFailedPrecondition && s.code() != absl::StatusCode::kUnavailable) return s;
      mapped = s.code() == absl::StatusCode::kUnavailable ? nullptr : mapped;
    }
    if (mapped != nullptr && mapped->hbm_access() == MappedTable::HbmAccess::kCuda) {
      absl::Status s = staging_->GatherThroughHbm(mapped, layer, num_tokens, indices, device_out, cuda_stream);
      if (s.code() != absl::StatusCode::kFailedPrecondition && s.code() != absl::StatusCode::kUnavailable) return s;
    }
  }
  auto buffer = staging_->Acquire(bytes);
  if (!buffer.ok()) return buffer.status();
  if (absl::Status s = Lookup(table, layer, num_tokens, indices, *buffer); !s.ok()) return s;
  return staging_->CopyToDevice(device_out, bytes, cuda_stream);
}

void Client::ReconnectLoop() {
  std::unique_lock<std::mutex> lock(mu_);
  int backoff_ms = std::max(1, options_.reconnect_backoff_ms);
  auto next = std::chrono::steady_clock::now();
  while (!stopping_) {
    reconnect_cv_.wait_until(lock, next, [&] { return stopping_ || (broken_ && attempt_wanted_); });
    if (stopping_) break;
    if (!broken_) {  // nothing to do until a call finds the connection broken
      reconnect_cv_.wait(lock, [&] { return stopping_ || broken_; });
      backoff_ms = std::max(1, options_.reconnect_backoff_ms);
      next = std::chrono::steady_clock::now();
      continue;
    }
    if (!attempt_wanted_ && std::chrono::steady_clock::now() < next) continue;
    attempt_wanted_ = false;
    ++attempts_started_;
    lock.unlock();
    auto transport = MakeTransport(uri_, options_);
    lock.lock();
    ++attempts_done_;
    if (transport.ok() && !stopping_) {
      // Device work queued against the old transport's mapped tables (HBM pin callbacks) runs
      // before they go away.
      if (staging_ != nullptr) {
        staging_->Quiesce();
        staging_->ForgetMappings();  // registered with CUDA; unmapped with the old transport
      }
      transport_ = std::move(*transport);
      broken_ = false;
      last_error_.clear();
    } else if (!transport.ok()) {
      last_error_ = std::string(transport.status().message());
      next = std::chrono::steady_clock::now() + std::chrono::milliseconds(backoff_ms);
      backoff_ms = std::max(backoff_ms, std::min(std::max(1, options_.reconnect_backoff_max_ms), backoff_ms * 2));
    }
    reconnect_cv_.notify_all();
  }
}

bool Client::AwaitReconnectLocked(std::unique_lock<std::mutex>& lock, std::chrono::steady_clock::time_point deadline) {
  if (stopping_) return false;
  broken_ = true;
  if (!reconnector_.joinable()) reconnector_ = std::thread([this] { ReconnectLoop(); });
  // A ticket: the attempt that starts after this request (one under way may predate it).
  attempt_wanted_ = true;
  const uint64_t ticket = attempts_started_ + 1;
  reconnect_cv_.notify_all();
  // One attempt's worth of waiting at most (it may already be under way), never past the deadline.
  const auto limit = std::min(deadline, std::chrono::steady_clock::now() +
                                            std::chrono::milliseconds(std::max(1, options_.connect_timeout_ms) + 100));
  reconnect_cv_.wait_until(lock, limit, [&] { return stopping_ || !broken_ || attempts_done_ >= ticket; });
  return !broken_ && !stopping_;
}

absl::Status Client::UnavailableLocked() const {
  return absl::UnavailableError(absl::StrCat("engramd at ", uri_, " is unavailable", last_error_.empty() ? "" : ": ",
                                             last_error_, "; reconnecting in the background (", attempts_done_,
                                             " attempts so far)"));
}

template <typename F>
absl::Status Client::WithRetry(std::unique_lock<std::mutex>& lock, const F& call) {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(CallTimeout::Effective(options_.timeout_ms));
  if (broken_ && !AwaitReconnectLocked(lock, deadline)) return UnavailableLocked();
  absl::Status s = call(*transport_);
  if (s.code() != absl::StatusCode::kUnavailable) return s;
  last_error_ = std::string(s.message());
  if (!AwaitReconnectLocked(lock, deadline)) return UnavailableLocked();
  return call(*transport_);
}

absl::StatusOr<std::shared_ptr<const TableHandle>> Client::OpenTable(const std::string& name) {
  std::unique_lock<std::mutex> lock(mu_);
  std::string info;
  absl::Status s = WithRetry(lock, [&](Transport& t) {
    auto opened = t.OpenTable(name);
    if (opened.ok()) info = std::move(*opened);
    return opened.status();
  });
  if (!s.ok()) return s;
  auto handle = TableHandle::FromTableInfo(info);
  if (!handle.ok()) return handle.status();
  return std::shared_ptr<const TableHandle>(std::move(*handle));
}

absl::Status Client::Lookup(const TableHandle& table, int layer, uint32_t num_tokens,
                            absl::Span<const uint32_t> indices, absl::Span<uint8_t> out, ClientLookupStats* stats) {
  std::unique_lock<std::mutex> lock(mu_);
  return WithRetry(lock, [&](Transport& t) {
    absl::Status s = t.Lookup(table.name(), layer, num_tokens, indices, out, stats);
    if (s.code() == absl::StatusCode::kFailedPrecondition) {  // a new connection: open the table on it
      auto opened = t.OpenTable(table.name());
      if (!opened.ok()) return opened.status();
      s = t.Lookup(table.name(), layer, num_tokens, indices, out, stats);
    }
    return s;
  });
}

bool Client::IsMapped(const TableHandle& table) {
  std::lock_guard<std::mutex> lock(mu_);
  return transport_->Mapped(table.name());
}

std::future<absl::Status> Client::LookupAsync(std::shared_ptr<const TableHandle> table, int layer, uint32_t num_tokens,
                                              absl::Span<const uint32_t> indices, absl::Span<uint8_t> out) {
  auto promise = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> future = promise->get_future();
  LookupAsync(std::move(table), layer, num_tokens, indices, out,
              [promise](absl::Status status) { promise->set_value(std::move(status)); });
  return future;
}

void Client::LookupAsync(std::shared_ptr<const TableHandle> table, int layer, uint32_t num_tokens,
                         absl::Span<const uint32_t> indices, absl::Span<uint8_t> out,
                         std::function<void(absl::Status)> done) {
  if (!done) done = [](absl::Status) {};
  const int timeout_ms = CallTimeout::Current();
  async_.Post([this, table = std::move(table), layer, num_tokens, indices, out, done = std::move(done), timeout_ms] {
    CallTimeout bound(timeout_ms);
    absl::Status status;
    if (table == nullptr) {
      status = absl::InvalidArgumentError("LookupAsync: no table (a null TableHandle)");
    } else {
      try {
        status = Lookup(*table, layer, num_tokens, indices, out);
      } catch (const std::exception& e) {  // bad_alloc and the like: the caller still hears back
        status = absl::InternalError(absl::StrCat("LookupAsync: ", e.what()));
      }
    }
    done(std::move(status));
  });
}

Client::AsyncWorker::~AsyncWorker() {
  if (thread_.joinable() && std::this_thread::get_id() == thread_.get_id()) {
    // The queued jobs use the Client being destroyed: there is no way to finish them safely.
    std::fprintf(stderr, "engram::Client destroyed from one of its own LookupAsync callbacks; not allowed\n");
    std::abort();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Client::AsyncWorker::Post(std::function<void()> job) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!thread_.joinable()) {  // started before the job is queued: if this throws, nothing is left behind
    thread_ = std::thread([this] {
      std::unique_lock<std::mutex> lock(mu_);
      for (;;) {
        cv_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stopping, and everything queued has run
        std::function<void()> next = std::move(jobs_.front());
        jobs_.pop_front();
        lock.unlock();
        try {
          next();
        } catch (...) {  // a callback that throws must not take the worker (and the process) down
        }
        lock.lock();
      }
    });
  }
  jobs_.push_back(std::move(job));
  cv_.notify_one();
}

absl::Status Client::Prefetch(const TableHandle& table, int layer, uint32_t num_tokens,
                              absl::Span<const uint32_t> indices) {
  std::unique_lock<std::mutex> lock(mu_);
  return WithRetry(lock, [&](Transport& t) {
    absl::Status s = t.Prefetch(table.name(), layer, num_tokens, indices);
    if (s.code() == absl::StatusCode::kFailedPrecondition) {
      auto opened = t.OpenTable(table.name());
      if (!opened.ok()) return opened.status();
      s = t.Prefetch(table.name(), layer, num_tokens, indices);
    }
    return s;
  });
}

absl::Status Client::LookupTokens(const TableHandle& table, int layer, absl::Span<const int32_t> token_ids,
                                  uint32_t batch, uint32_t seq_len, absl::Span<uint8_t> out) {
  const NgramHasher& hasher = table.hasher();
  const int layer_index = hasher.LayerIndex(layer);
  if (layer_index < 0) return absl::NotFoundError(absl::StrCat("table '", table.name(), "' has no layer ", layer));
  const size_t tokens = static_cast<size_t>(batch) * seq_len;
  if (token_ids.size() != tokens) {
    return absl::InvalidArgumentError(absl::StrCat(token_ids.size(), " token ids for shape ", batch, "x", seq_len));
  }
  std::vector<int64_t> compressed(tokens);
  if (absl::Status s = hasher.Compress(token_ids, absl::MakeSpan(compressed)); !s.ok()) return s;
  std::vector<int64_t> local(tokens * hasher.heads_per_layer());
  hasher.HashCompressed(compressed, static_cast<int>(batch), static_cast<int>(seq_len), layer_index,
                        absl::MakeSpan(local));
  const std::vector<uint32_t> indices(local.begin(), local.end());
  return Lookup(table, layer, static_cast<uint32_t>(tokens), indices, out);
}

}  // namespace engram
