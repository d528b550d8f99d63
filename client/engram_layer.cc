#include "engram/engram_layer.h"

#include <thread>

#include "absl/strings/str_cat.h"
#include "client/engram_layer_cuda.h"
#include "engram/kernels/engram_math.h"
#include "engram/safetensors.h"
#include "tiering/layout/manifest.h"

namespace engram {

absl::StatusOr<kernels::EngramWeights> LoadEngramWeights(const std::string& path) {
  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  kernels::EngramWeights w;
  while (file->Has(absl::StrCat("key_projs.", w.branches, ".weight"))) ++w.branches;
  if (w.branches == 0) return absl::NotFoundError(absl::StrCat(path, " has no tensor 'key_projs.0.weight'"));
  auto first = file->Read("key_projs.0.weight");
  if (!first.ok()) return first.status();
  if (first->shape.size() != 2 || first->shape[0] < 1 || first->shape[1] < 1 || first->shape[0] > (1 << 20) ||
      first->shape[1] > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": key_projs.0.weight must be 2-D [D, M] with D and M in [1, 2^20]"));
  }
  w.hidden = static_cast<int>(first->shape[0]);
  w.embed = static_cast<int>(first->shape[1]);
  const int64_t G = w.branches, D = w.hidden, M = w.embed;
  w.projection.reserve(static_cast<size_t>((G + 1) * D * M));
  w.projection_bias.reserve(static_cast<size_t>((G + 1) * D));
  auto append = [&](const std::string& name, const std::vector<int64_t>& shape, std::vector<float>* to) -> absl::Status {
    auto t = file->Read(name, shape);
    if (!t.ok()) return t.status();
    to->insert(to->end(), t->values.begin(), t->values.end());
    return absl::OkStatus();
  };
  for (int64_t g = 0; g <= G; ++g) {
    const std::string prefix = g < G ? absl::StrCat("key_projs.", g) : "value_proj";
    if (absl::Status s = append(prefix + ".weight", {D, M}, &w.projection); !s.ok()) return s;
    if (absl::Status s = append(prefix + ".bias", {D}, &w.projection_bias); !s.ok()) return s;
  }
  for (int64_t g = 0; g < G; ++g) {
    if (absl::Status s = append(absl::StrCat("norm1.", g, ".weight"), {D}, &w.key_norm); !s.ok()) return s;
    if (absl::Status s = append(absl::StrCat("norm2.", g, ".weight"), {D}, &w.query_norm); !s.ok()) return s;
    if (absl::Status s = append(absl::StrCat("short_conv.norms.", g, ".weight"), {D}, &w.conv_norm); !s.ok()) return s;
  }
  if (absl::Status s = append("short_conv.conv.weight", {G * D, 1, kernels::kShortConvTaps}, &w.conv_taps); !s.ok()) {
    return s;
  }
  return w;
}

EngramLayer::~EngramLayer() = default;

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(RowSource source, int layer_id,
                                                                 kernels::EngramWeights weights,
                                                                 const EngramLayerOptions& options) {
  if (source.hasher == nullptr || !source.lookup) {
    return absl::InvalidArgumentError("EngramLayer needs a row source with a hasher and a lookup");
  }
  if (absl::Status s = weights.Validate(); !s.ok()) return s;
  const int layer_index = source.hasher->LayerIndex(layer_id);
  if (layer_index < 0) return absl::NotFoundError(absl::StrCat("the table has no layer ", layer_id));
  if (source.row_dim < 1 || RowBytesFor(source.dtype, source.row_dim) <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows of ", source.row_dim, " elements are not a valid row of ",
                                                   RowDtypeName(source.dtype), " (fp8 needs a multiple of 32)"));
  }
  const int heads = source.hasher->heads_per_layer();
  if (static_cast<int64_t>(heads) * source.row_dim != weights.embed) {
    return absl::InvalidArgumentError(absl::StrCat("the weights expect embeddings of width ", weights.embed,
                                                   "; the table gives ", heads, " heads x ", source.row_dim, " = ",
                                                   static_cast<int64_t>(heads) * source.row_dim));
  }
  std::unique_ptr<EngramLayer> layer(new EngramLayer());
  layer->source_ = std::move(source);
  layer->layer_id_ = layer_id;
  layer->layer_index_ = layer_index;
  layer->weights_ = std::move(weights);
  layer->cpu_threads_ =
      options.cpu_threads > 0 ? options.cpu_threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const bool want_cuda = options.device == EngramDevice::kCuda;
  if (options.device != EngramDevice::kCpu) {
    auto cuda = EngramLayerCuda::Create(layer->weights_, layer->source_.dtype, layer->source_.row_dim);
    if (cuda.ok()) {
      layer->cuda_ = std::move(*cuda);
      layer->device_ = EngramDevice::kCuda;
    } else if (want_cuda) {
      return cuda.status();
    }
  }
  return layer;
}

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(Client* client,
                                                                 std::shared_ptr<const TableHandle> table, int layer_id,
                                                                 kernels::EngramWeights weights,
                                                                 const EngramLayerOptions& options) {
  auto dtype = ParseRowDtype(table->dtype());
  if (!dtype.ok()) return dtype.status();
  RowSource source;
  source.hasher = &table->hasher();
  source.dtype = *dtype;
  source.row_dim = static_cast<int>(table->dim());
  const TableHandle* handle = table.get();
  source.lookup = [client, handle](int layer, uint32_t n, absl::Span<const uint32_t> idx, absl::Span<uint8_t> rows) {
    return client->Lookup(*handle, layer, n, idx, rows);
  };
  source.prefetch = [client, handle](int layer, uint32_t n, absl::Span<const uint32_t> idx) {
    return client->Prefetch(*handle, layer, n, idx);
  };
  auto layer = Create(std::move(source), layer_id, std::move(weights), options);
  if (layer.ok()) (*layer)->table_ = std::move(table);
  return layer;
}

absl::Status EngramLayer::Hash(absl::Span<const int32_t> token_ids, int batch, int seq_len) {
  if (batch < 1 || seq_len < 1) {
    return absl::InvalidArgumentError(absl::StrCat("shape ", batch, "x", seq_len, ": both must be at least 1"));
  }
  const size_t tokens = static_cast<size_t>(batch) * seq_len;
  if (token_ids.size() != tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat(token_ids.size(), " token ids for shape ", batch, "x", seq_len, " (", tokens, " expected)"));
  }
  const NgramHasher& hasher = *source_.hasher;
  compressed_.resize(tokens);
  if (absl::Status s = hasher.Compress(token_ids, absl::MakeSpan(compressed_)); !s.ok()) return s;
  local_.resize(tokens * hasher.heads_per_layer());
  hasher.HashCompressed(compressed_, batch, seq_len, layer_index_, absl::MakeSpan(local_));
  indices_.assign(local_.begin(), local_.end());
  return absl::OkStatus();
}

absl::Status EngramLayer::Prefetch(absl::Span<const int32_t> token_ids, int batch, int seq_len) {
  if (!source_.prefetch) return absl::OkStatus();
  if (absl::Status s = Hash(token_ids, batch, seq_len); !s.ok()) return s;
  return source_.prefetch(layer_id_, static_cast<uint32_t>(token_ids.size()), indices_);
}

absl::Status EngramLayer::FetchRows(absl::Span<const int32_t> token_ids, int batch, int seq_len) {
  if (absl::Status s = Hash(token_ids, batch, seq_len); !s.ok()) return s;
  const int64_t row_bytes = RowBytesFor(source_.dtype, source_.row_dim);
  rows_.resize(indices_.size() * static_cast<size_t>(row_bytes));
  return source_.lookup(layer_id_, static_cast<uint32_t>(token_ids.size()), indices_, absl::MakeSpan(rows_));
}

absl::Status EngramLayer::Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                  absl::Span<const float> hidden, absl::Span<float> out, void* cuda_stream) {
  if (absl::Status s = FetchRows(token_ids, batch, seq_len); !s.ok()) return s;
  const kernels::ForwardShape shape{batch, seq_len, source_.hasher->config().max_ngram};
  if (cuda_ != nullptr) {
    embeddings_.clear();
    return cuda_->Forward(rows_, static_cast<int64_t>(indices_.size()), shape, hidden, out, cuda_stream);
  }
  embeddings_.resize(token_ids.size() * static_cast<size_t>(weights_.embed));
  kernels::DequantizeRows(rows_.data(), static_cast<int64_t>(indices_.size()), source_.row_dim, source_.dtype,
                          embeddings_.data(), cpu_threads_);
  return kernels::EngramForwardCpu(weights_, shape, embeddings_, hidden, out, cpu_threads_);
}

absl::Status EngramLayer::ForwardHost(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                      absl::Span<const float> hidden, absl::Span<float> out) {
  if (cuda_ == nullptr) return Forward(token_ids, batch, seq_len, hidden, out);
  if (absl::Status s = FetchRows(token_ids, batch, seq_len); !s.ok()) return s;
  embeddings_.clear();
  const kernels::ForwardShape shape{batch, seq_len, source_.hasher->config().max_ngram};
  return cuda_->ForwardHostBuffers(rows_, static_cast<int64_t>(indices_.size()), shape, hidden, out);
}

}  // namespace engram
