#include "engram/engram_layer.h"

#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/engram_layer_cuda.h"
#include "engram/kernels/engram_math.h"
#include "engram/safetensors.h"
#include "nlohmann/json.hpp"
#include "tiering/layout/manifest.h"

namespace engram {
namespace {

int DefaultThreads(int threads) {
  return threads > 0 ? threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

absl::StatusOr<nlohmann::json> ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json doc = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a JSON object"));
  }
  return doc;
}

}  // namespace

absl::StatusOr<EngramVariant> ParseEngramVariant(const std::string& name) {
  if (name == "demo") return EngramVariant::kDemo;
  if (name == "dsv41") return EngramVariant::kDsv41;
  return absl::InvalidArgumentError(absl::StrCat("module variant '", name, "' is not demo or dsv41"));
}

const char* EngramVariantName(EngramVariant variant) { return variant == EngramVariant::kDsv41 ? "dsv41" : "demo"; }

absl::StatusOr<kernels::Dsv41Weights> LoadDsv41Weights(const std::string& dir, int layer_id, int64_t embed_width,
                                                       int threads) {
  auto config_doc = ReadJsonFile(dir + "/config.json");
  if (!config_doc.ok()) return config_doc.status();
  const nlohmann::json& top = *config_doc;
  const nlohmann::json& config =
      top.contains("text_config") && top["text_config"].is_object() && top["text_config"].contains("hidden_size")
          ? top["text_config"]
          : top;
  const std::string config_path = dir + "/config.json";
  kernels::Dsv41Weights w;
  auto integer = [&](const char* field, int* to) -> absl::Status {
    if (!config.contains(field) || !config[field].is_number_integer() || config[field].get<int64_t>() < 1 ||
        config[field].get<int64_t>() > (1 << 20)) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": ", field, " must be an integer in [1, 2^20]"));
    }
    *to = config[field].get<int>();
    return absl::OkStatus();
  };
  if (absl::Status s = integer("hc_mult", &w.streams); !s.ok()) return s;
  if (absl::Status s = integer("hidden_size", &w.hidden); !s.ok()) return s;
  if (!config.contains("rms_norm_eps") || !config["rms_norm_eps"].is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": rms_norm_eps must be a number"));
  }
  const double eps = config["rms_norm_eps"].get<double>();
  w.eps = static_cast<float>(eps);
  if (!(eps >= 0.0) || !std::isfinite(w.eps) || (eps > 0.0 && w.eps == 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": rms_norm_eps ", eps, " is not a non-negative f32 number"));
  }

  // Tensor name -> shard, through the index (or the one model.safetensors of a small checkpoint).
  const std::string prefix = absl::StrCat("layers.", layer_id, ".engram.");
  const std::vector<std::string> names = {prefix + "wkv.weight", prefix + "wkv.scale", prefix + "q_weight",
                                          prefix + "k_weight"};
  std::map<std::string, std::string> shard_of;
  const std::string index_path = dir + "/model.safetensors.index.json";
  if (std::ifstream(index_path).good()) {
    auto index = ReadJsonFile(index_path);
    if (!index.ok()) return index.status();
    if (!index->contains("weight_map") || !(*index)["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, " has no weight_map object"));
    }
    const auto& map = (*index)["weight_map"];
    for (const auto& name : names) {
      if (!map.contains(name) || !map[name].is_string()) {
        return absl::NotFoundError(absl::StrCat(index_path, " names no shard for '", name, "' (is layer ", layer_id,
                                                " an Engram layer of this checkpoint?)"));
      }
      const std::string file = map[name].get<std::string>();
      if (file.empty() || file.find('/') != std::string::npos || file[0] == '.') {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard '", file, "' of '", name,
                                                       "' is not a file name in the checkpoint directory"));
      }
      shard_of[name] = dir + "/" + file;
    }
  } else {
    for (const auto& name : names) shard_of[name] = dir + "/model.safetensors";
  }
  std::map<std::string, SafetensorsFile> shards;
  auto file_for = [&](const std::string& name) -> absl::StatusOr<const SafetensorsFile*> {
    const std::string& path = shard_of[name];
    auto it = shards.find(path);
    if (it == shards.end()) {
      auto opened = SafetensorsFile::Open(path);
      if (!opened.ok()) return opened.status();
      it = shards.emplace(path, std::move(*opened)).first;
    }
    return &it->second;
  };

  const int64_t K = w.streams, D = w.hidden, rows = (K + 1) * D;
  auto wkv_file = file_for(names[0]);
  if (!wkv_file.ok()) return wkv_file.status();
  auto wkv = (*wkv_file)->ReadRaw(names[0], "F8_E4M3");
  if (!wkv.ok()) return wkv.status();
  if (wkv->shape.size() != 2 || wkv->shape[0] != rows || wkv->shape[1] < 1 ||
      (embed_width > 0 && wkv->shape[1] != embed_width)) {
    return absl::InvalidArgumentError(absl::StrCat(
        (*wkv_file)->path(), ": '", names[0], "' has shape [", absl::StrJoin(wkv->shape, ", "), "]; [(hc_mult + 1) x ",
        "hidden_size = ", rows, ", ", embed_width > 0 ? absl::StrCat(embed_width) : std::string("M"),
        "] expected (config.json: hc_mult ", K, ", hidden_size ", D, ")"));
  }
  w.embed = static_cast<int>(wkv->shape[1]);
  const int64_t M = w.embed, scale_rows = (rows + 31) / 32, scale_cols = (M + 31) / 32;
  auto scale_file = file_for(names[1]);
  if (!scale_file.ok()) return scale_file.status();
  auto scale = (*scale_file)->ReadRaw(names[1], "F8_E8M0", {scale_rows, scale_cols});
  if (!scale.ok()) return scale.status();
  w.wkv.resize(static_cast<size_t>(rows * M));
  kernels::DequantizeBlockFp8(wkv->bytes.data(), scale->bytes.data(), rows, M, w.wkv.data(), DefaultThreads(threads));
  for (auto [name, to] : {std::pair{&names[2], &w.q_weight}, {&names[3], &w.k_weight}}) {
    auto file = file_for(*name);
    if (!file.ok()) return file.status();
    auto t = (*file)->Read(*name, {K, D});
    if (!t.ok()) return t.status();
    *to = std::move(t->values);
  }
  return w;
}

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

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Prepare(RowSource source, int layer_id, int64_t embed,
                                                                  const EngramLayerOptions& options) {
  if (source.hasher == nullptr || !source.lookup) {
    return absl::InvalidArgumentError("EngramLayer needs a row source with a hasher and a lookup");
  }
  const int layer_index = source.hasher->LayerIndex(layer_id);
  if (layer_index < 0) return absl::NotFoundError(absl::StrCat("the table has no layer ", layer_id));
  if (source.row_dim < 1 || RowBytesFor(source.dtype, source.row_dim) <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows of ", source.row_dim, " elements are not a valid row of ",
                                                   RowDtypeName(source.dtype), " (fp8 needs a multiple of 32)"));
  }
  const int heads = source.hasher->heads_per_layer();
  if (static_cast<int64_t>(heads) * source.row_dim != embed) {
    return absl::InvalidArgumentError(absl::StrCat("the weights expect embeddings of width ", embed,
                                                   "; the table gives ", heads, " heads x ", source.row_dim, " = ",
                                                   static_cast<int64_t>(heads) * source.row_dim));
  }
  std::unique_ptr<EngramLayer> layer(new EngramLayer());
  layer->source_ = std::move(source);
  layer->layer_id_ = layer_id;
  layer->layer_index_ = layer_index;
  layer->cpu_threads_ = DefaultThreads(options.cpu_threads);
  return layer;
}

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(RowSource source, int layer_id,
                                                                 kernels::EngramWeights weights,
                                                                 const EngramLayerOptions& options) {
  if (absl::Status s = weights.Validate(); !s.ok()) return s;
  auto layer = Prepare(std::move(source), layer_id, weights.embed, options);
  if (!layer.ok()) return layer.status();
  (*layer)->weights_ = std::move(weights);
  if (options.device != EngramDevice::kCpu) {
    auto cuda = EngramLayerCuda::Create((*layer)->weights_, (*layer)->source_.dtype, (*layer)->source_.row_dim);
    if (cuda.ok()) {
      (*layer)->cuda_ = std::move(*cuda);
      (*layer)->device_ = EngramDevice::kCuda;
    } else if (options.device == EngramDevice::kCuda) {
      return cuda.status();
    }
  }
  return layer;
}

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(RowSource source, int layer_id,
                                                                 kernels::Dsv41Weights weights,
                                                                 const EngramLayerOptions& options) {
  if (absl::Status s = weights.Validate(); !s.ok()) return s;
  auto layer = Prepare(std::move(source), layer_id, weights.embed, options);
  if (!layer.ok()) return layer.status();
  (*layer)->variant_ = EngramVariant::kDsv41;
  (*layer)->dsv41_ = std::move(weights);
  if (options.device != EngramDevice::kCpu) {
    auto cuda = EngramLayerCuda::CreateDsv41((*layer)->dsv41_, (*layer)->source_.dtype, (*layer)->source_.row_dim);
    if (cuda.ok()) {
      (*layer)->cuda_ = std::move(*cuda);
      (*layer)->device_ = EngramDevice::kCuda;
    } else if (options.device == EngramDevice::kCuda) {
      return cuda.status();
    }
  }
  return layer;
}

absl::StatusOr<RowSource> EngramLayer::ClientSource(Client* client, const TableHandle* handle) {
  auto dtype = ParseRowDtype(handle->dtype());
  if (!dtype.ok()) return dtype.status();
  RowSource source;
  source.hasher = &handle->hasher();
  source.dtype = *dtype;
  source.row_dim = static_cast<int>(handle->dim());
  source.lookup = [client, handle](int layer, uint32_t n, absl::Span<const uint32_t> idx, absl::Span<uint8_t> rows) {
    return client->Lookup(*handle, layer, n, idx, rows);
  };
  source.prefetch = [client, handle](int layer, uint32_t n, absl::Span<const uint32_t> idx) {
    return client->Prefetch(*handle, layer, n, idx);
  };
  return source;
}

template <typename Weights>
absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::CreateOnClient(Client* client,
                                                                         std::shared_ptr<const TableHandle> table,
                                                                         int layer_id, Weights weights,
                                                                         const EngramLayerOptions& options) {
  auto source = ClientSource(client, table.get());
  if (!source.ok()) return source.status();
  auto layer = Create(std::move(*source), layer_id, std::move(weights), options);
  if (layer.ok()) (*layer)->table_ = std::move(table);
  return layer;
}

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(Client* client,
                                                                 std::shared_ptr<const TableHandle> table, int layer_id,
                                                                 kernels::EngramWeights weights,
                                                                 const EngramLayerOptions& options) {
  return CreateOnClient(client, std::move(table), layer_id, std::move(weights), options);
}

absl::StatusOr<std::unique_ptr<EngramLayer>> EngramLayer::Create(Client* client,
                                                                 std::shared_ptr<const TableHandle> table, int layer_id,
                                                                 kernels::Dsv41Weights weights,
                                                                 const EngramLayerOptions& options) {
  return CreateOnClient(client, std::move(table), layer_id, std::move(weights), options);
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

template <typename Stream>
absl::Status EngramLayer::ForwardDsv41(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                       absl::Span<const Stream> hidden, absl::Span<Stream> out, void* cuda_stream,
                                       bool host_buffers) {
  if (absl::Status s = FetchRows(token_ids, batch, seq_len); !s.ok()) return s;
  const size_t tokens = token_ids.size();
  const size_t values = tokens * static_cast<size_t>(dsv41_.streams) * static_cast<size_t>(dsv41_.hidden);
  if (hidden.size() != values || out.size() != values) {
    return absl::InvalidArgumentError(absl::StrCat("hidden states and output must hold tokens x streams x D = ",
                                                   values, " values (have ", hidden.size(), " and ", out.size(), ")"));
  }
  const std::optional<int64_t> dead_id = source_.hasher->config().dead_token_id;
  dead_.resize(tokens);
  for (size_t t = 0; t < tokens; ++t) dead_[t] = dead_id && token_ids[t] == *dead_id ? 1 : 0;
  constexpr bool kBf16 = std::is_same_v<Stream, uint16_t>;
  if (cuda_ != nullptr) {
    embeddings_.clear();
    return cuda_->ForwardDsv41(rows_, static_cast<int64_t>(indices_.size()), dead_, hidden.data(), out.data(), values,
                               kBf16, cuda_stream, host_buffers);
  }
  embeddings_.resize(tokens * static_cast<size_t>(dsv41_.embed));
  kernels::DequantizeRows(rows_.data(), static_cast<int64_t>(indices_.size()), source_.row_dim, source_.dtype,
                          embeddings_.data(), cpu_threads_);
  return kernels::Dsv41ForwardCpu(dsv41_, static_cast<int64_t>(tokens), embeddings_, dead_, hidden, out, cpu_threads_);
}

absl::Status EngramLayer::Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                  absl::Span<const uint16_t> hidden, absl::Span<uint16_t> out, void* cuda_stream) {
  if (variant_ != EngramVariant::kDsv41) {
    return absl::InvalidArgumentError("bf16 streams are for the dsv41 module; the demo module takes f32");
  }
  return ForwardDsv41<uint16_t>(token_ids, batch, seq_len, hidden, out, cuda_stream, /*host_buffers=*/false);
}

absl::Status EngramLayer::ForwardHost(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                      absl::Span<const uint16_t> hidden, absl::Span<uint16_t> out) {
  if (variant_ != EngramVariant::kDsv41) {
    return absl::InvalidArgumentError("bf16 streams are for the dsv41 module; the demo module takes f32");
  }
  return ForwardDsv41<uint16_t>(token_ids, batch, seq_len, hidden, out, nullptr, /*host_buffers=*/true);
}

absl::Status EngramLayer::Forward(absl::Span<const int32_t> token_ids, int batch, int seq_len,
                                  absl::Span<const float> hidden, absl::Span<float> out, void* cuda_stream) {
  if (variant_ == EngramVariant::kDsv41) {
    return ForwardDsv41<float>(token_ids, batch, seq_len, hidden, out, cuda_stream, /*host_buffers=*/false);
  }
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
  if (variant_ == EngramVariant::kDsv41) {
    return ForwardDsv41<float>(token_ids, batch, seq_len, hidden, out, nullptr, /*host_buffers=*/true);
  }
  if (cuda_ == nullptr) return Forward(token_ids, batch, seq_len, hidden, out);
  if (absl::Status s = FetchRows(token_ids, batch, seq_len); !s.ok()) return s;
  embeddings_.clear();
  const kernels::ForwardShape shape{batch, seq_len, source_.hasher->config().max_ngram};
  return cuda_->ForwardHostBuffers(rows_, static_cast<int64_t>(indices_.size()), shape, hidden, out);
}

}  // namespace engram
