// EngramLayer: one Engram module of a model, as an engine calls it. Forward takes token ids and
// the hidden states of the hyper-connection streams, hashes the ids with the table's layout, gets
// the layer's rows (through a Client, or any row source), dequantizes them and runs the gating and
// fusion of one of two modules (engram/kernels/engram_math.h):
//   - demo (the paper's reference demo): Forward writes Y = V + ShortConv(V), which the block adds
//     to its hidden states; weights from a safetensors file with the demo's names
//     (LoadEngramWeights).
//   - dsv41 (DeepSeek-V4.1-Flash): no ShortConv; one FP8 projection gives a key per stream and one
//     shared value; Forward writes the updated streams h_k + g_k * v (g_k = 0 at dead positions);
//     weights from the checkpoint's shards by their names (LoadDsv41Weights). Streams may be f32
//     or bf16 (the released model's stream dtype).
// This runs on the CPU twin, or with CUDA kernels when the library was built with CUDA and a
// device is present.
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

// DeepSeek-V4.1's module weights of decoder layer `layer_id` from a Hugging Face checkpoint
// directory: hc_mult, hidden_size and rms_norm_eps from config.json (under text_config or at the
// top level); layers.L.engram.wkv.weight (F8_E4M3 [(K+1)*D, M]) with its block scales wkv.scale
// (F8_E8M0 [ceil((K+1)D/32), ceil(M/32)]), q_weight and k_weight (BF16/F16/F32 [K, D]) from the
// shards model.safetensors.index.json names, read by range. `embed_width` is M when the caller
// knows it (the table's heads x dim; 0: take it from wkv.weight). Errors name the file, tensor and
// field.
absl::StatusOr<kernels::Dsv41Weights> LoadDsv41Weights(const std::string& checkpoint_dir, int layer_id,
                                                       int64_t embed_width = 0, int threads = 0);

enum class EngramVariant { kDemo, kDsv41 };
// "demo" | "dsv41" (a pack's manifest `module`, engramctl forward --variant).
absl::StatusOr<EngramVariant> ParseEngramVariant(const std::string& name);
const char* EngramVariantName(EngramVariant variant);

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
  // The V4.1 module. Dead positions are the table's hash.dead_token_id (-1 for V4.1 packs).
  static absl::StatusOr<std::unique_ptr<EngramLayer>> Create(RowSource source, int layer_id,
                                                             kernels::Dsv41Weights weights,
                                                             const EngramLayerOptions& options = {});
  static absl::StatusOr<std::unique_ptr<EngramLayer>> Create(Client* client, std::shared_ptr<const TableHandle> table,
                                                             int layer_id, kernels::Dsv41Weights weights,
                                                             const EngramLayerOptions& options = {});
  ~EngramLayer();

  // token_ids [batch][seq_len]; hidden and out [batch][seq_len][streams][D] f32 (demo: out is Y;
  // dsv41: out is the updated streams, and may be `hidden` itself). On the CPU path they are host
  // memory; on the CUDA path device memory, with the work enqueued on `cuda_stream` (a
  // cudaStream_t; null: the default stream).
  absl::Status Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len, absl::Span<const float> hidden,
                       absl::Span<float> out, void* cuda_stream = nullptr);
  // dsv41 with bf16 streams (uint16_t bits), as the released model keeps them; the update is
  // computed in f32 and rounded once. InvalidArgument for the demo module.
  absl::Status Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                       absl::Span<const uint16_t> hidden_bf16, absl::Span<uint16_t> out_bf16,
                       void* cuda_stream = nullptr);
  // Forward with hidden states and output in host memory whatever the device (on CUDA they are
  // copied in and out, synchronously): for tools and tests.
  absl::Status ForwardHost(absl::Span<const int32_t> token_ids, int batch, int seq_len, absl::Span<const float> hidden,
                           absl::Span<float> out);
  absl::Status ForwardHost(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                           absl::Span<const uint16_t> hidden_bf16, absl::Span<uint16_t> out_bf16);
  // Asks the row source to stage this layer's rows for these tokens (call it for later layers
  // when a step starts).
  absl::Status Prefetch(absl::Span<const int32_t> token_ids, int batch, int seq_len);

  EngramDevice device() const { return device_; }
  EngramVariant variant() const { return variant_; }
  // Hyper-connection streams (G or K), hidden size D and embedding width M, whichever module.
  int streams() const { return variant_ == EngramVariant::kDsv41 ? dsv41_.streams : weights_.branches; }
  int hidden_size() const { return variant_ == EngramVariant::kDsv41 ? dsv41_.hidden : weights_.hidden; }
  int embed_width() const { return variant_ == EngramVariant::kDsv41 ? dsv41_.embed : weights_.embed; }
  const kernels::EngramWeights& weights() const { return weights_; }       // demo
  const kernels::Dsv41Weights& dsv41_weights() const { return dsv41_; }  // dsv41
  int layer_id() const { return layer_id_; }
  // From the last Forward, for debugging: head-local indices [B*T][heads] and the dequantized
  // embeddings [B*T][M].
  const std::vector<uint32_t>& last_indices() const { return indices_; }
  const std::vector<float>& last_embeddings() const { return embeddings_; }

 private:
  EngramLayer() = default;
  static absl::StatusOr<RowSource> ClientSource(Client* client, const TableHandle* table);
  // Either module's Create on rows through a Client (keeps the table handle alive).
  template <typename Weights>
  static absl::StatusOr<std::unique_ptr<EngramLayer>> CreateOnClient(Client* client,
                                                                     std::shared_ptr<const TableHandle> table,
                                                                     int layer_id, Weights weights,
                                                                     const EngramLayerOptions& options);
  // Checks the source and the embedding width; fills source_, layer ids and threads.
  static absl::StatusOr<std::unique_ptr<EngramLayer>> Prepare(RowSource source, int layer_id, int64_t embed,
                                                              const EngramLayerOptions& options);
  template <typename Stream>
  absl::Status ForwardDsv41(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                            absl::Span<const Stream> hidden, absl::Span<Stream> out, void* cuda_stream,
                            bool host_buffers);
  absl::Status Hash(absl::Span<const int32_t> token_ids, int batch, int seq_len);
  // Hashes and fetches the rows of a forward pass into rows_.
  absl::Status FetchRows(absl::Span<const int32_t> token_ids, int batch, int seq_len);

  RowSource source_;
  std::shared_ptr<const TableHandle> table_;  // keeps the hasher alive for Client-backed layers
  int layer_id_ = 0;
  int layer_index_ = 0;
  EngramVariant variant_ = EngramVariant::kDemo;
  kernels::EngramWeights weights_;
  kernels::Dsv41Weights dsv41_;
  std::vector<uint8_t> dead_;  // dsv41: [tokens], 1 at a dead position
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
