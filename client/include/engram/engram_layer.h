// EngramLayer: one Engram module of a model, as an engine calls it. Forward takes token ids and
// the hidden states of the hyper-connection branches, hashes the ids with the table's layout, gets
// the layer's rows (through a Client, or any row source), dequantizes them and runs the gating and
// fusion: Y = V + ShortConv(V) (the block adds Y to its hidden states). The math is in
// engram/kernels/engram_math.h; this runs it on the CPU twin, or with CUDA kernels when the
// library was built with CUDA and a device is present.
//
// Weights load from safetensors with the reference module's names (LoadEngramWeights).
// Not thread-safe: one EngramLayer per engine thread (they may share a Client).
#ifndef ENGRAM_CLIENT_ENGRAM_LAYER_H_
#define ENGRAM_CLIENT_ENGRAM_LAYER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engram/client.h"
#include "engram/kernels/row_dtype.h"
#include "engram/kernels/cpu_twin.h"
#include "tiering/layout/ngram_hasher.h"

namespace engram {

class EngramLayerCuda;

// Reads key_projs.{g}.weight|bias, value_proj.weight|bias, norm1.{g}.weight, norm2.{g}.weight,
// short_conv.norms.{g}.weight and short_conv.conv.weight ([G*D, 1, 4]). G is the number of
// key_projs present; D and M come from key_projs.0.weight ([D, M]); every other shape must agree.
absl::StatusOr<kernels::EngramWeights> LoadEngramWeights(const std::string& safetensors_path);

enum class EngramDevice { kAuto, kCpu, kCuda };

struct EngramLayerOptions {
  EngramDevice device = EngramDevice::kAuto;  // kAuto: CUDA when built with it and a device is present
  int cpu_threads = 0;                        // CPU twin threads; 0: every core
};

// Where rows come from: head-local `indices` [num_tokens][heads] of one layer into `rows`
// ([num_tokens][heads][row_bytes]); and, optionally, a prefetch of the same.
struct RowSource {
  const NgramHasher* hasher = nullptr;  // must outlive the layer
  RowDtype dtype = RowDtype::kBf16;
  int row_dim = 0;  // elements per row (per head)
  std::function<absl::Status(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices,
                             absl::Span<uint8_t> rows)>
      lookup;
  std::function<absl::Status(int layer_id, uint32_t num_tokens, absl::Span<const uint32_t> indices)> prefetch;
};

class EngramLayer {
 public:
  static absl::StatusOr<std::unique_ptr<EngramLayer>> Create(RowSource source, int layer_id,
                                                             kernels::EngramWeights weights,
                                                             const EngramLayerOptions& options = {});
  // Rows through `client` (which must outlive the layer) from `table`.
  static absl::StatusOr<std::unique_ptr<EngramLayer>> Create(Client* client, std::shared_ptr<const TableHandle> table,
                                                             int layer_id, kernels::EngramWeights weights,
                                                             const EngramLayerOptions& options = {});
  ~EngramLayer();

  // token_ids [batch][seq_len]; hidden and out [batch][seq_len][G][D] f32. On the CPU path they
  // are host memory; on the CUDA path device memory, with the work enqueued on `cuda_stream`
  // (a cudaStream_t; null: the default stream).
  absl::Status Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len, absl::Span<const float> hidden,
                       absl::Span<float> out, void* cuda_stream = nullptr);
  // Forward with hidden states and output in host memory whatever the device (on CUDA they are
  // copied in and out, synchronously): for tools and tests.
  absl::Status ForwardHost(absl::Span<const int32_t> token_ids, int batch, int seq_len, absl::Span<const float> hidden,
                           absl::Span<float> out);
  // Asks the row source to stage this layer's rows for these tokens (call it for later layers
  // when a step starts).
  absl::Status Prefetch(absl::Span<const int32_t> token_ids, int batch, int seq_len);

  EngramDevice device() const { return device_; }
  const kernels::EngramWeights& weights() const { return weights_; }
  int layer_id() const { return layer_id_; }
  // From the last Forward, for debugging: head-local indices [B*T][heads] and the dequantized
  // embeddings [B*T][M].
  const std::vector<uint32_t>& last_indices() const { return indices_; }
  const std::vector<float>& last_embeddings() const { return embeddings_; }

 private:
  EngramLayer() = default;
  absl::Status Hash(absl::Span<const int32_t> token_ids, int batch, int seq_len);
  // Hashes and fetches the rows of a forward pass into rows_.
  absl::Status FetchRows(absl::Span<const int32_t> token_ids, int batch, int seq_len);

  RowSource source_;
  std::shared_ptr<const TableHandle> table_;  // keeps the hasher alive for Client-backed layers
  int layer_id_ = 0;
  int layer_index_ = 0;
  kernels::EngramWeights weights_;
  EngramDevice device_ = EngramDevice::kCpu;
  int cpu_threads_ = 1;
  std::vector<int64_t> compressed_, local_;
  std::vector<uint32_t> indices_;
  std::vector<uint8_t> rows_;
  std::vector<float> embeddings_;
  std::unique_ptr<EngramLayerCuda> cuda_;
};

}  // namespace engram

#endif  // ENGRAM_CLIENT_ENGRAM_LAYER_H_
