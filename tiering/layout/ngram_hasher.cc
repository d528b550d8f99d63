#include "tiering/layout/ngram_hasher.h"

#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "tiering/layout/numpy_rng.h"

namespace engram {
namespace {

uint64_t MulMod(uint64_t a, uint64_t b, uint64_t m) {
  return static_cast<uint64_t>(static_cast<unsigned __int128>(a) * b % m);
}

uint64_t PowMod(uint64_t base, uint64_t exp, uint64_t m) {
  uint64_t result = 1;
  base %= m;
  while (exp != 0) {
    if (exp & 1) result = MulMod(result, base, m);
    base = MulMod(base, base, m);
    exp >>= 1;
  }
  return result;
}

}  // namespace

bool IsPrime(uint64_t n) {
  if (n < 2) return false;
  for (uint64_t p : {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37}) {
    if (n % p == 0) return n == p;
  }
  uint64_t d = n - 1;
  int s = 0;
  while ((d & 1) == 0) {
    d >>= 1;
    ++s;
  }
  // These bases make Miller-Rabin deterministic for every 64-bit n.
  for (uint64_t a : {2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37}) {
    uint64_t x = PowMod(a, d, n);
    if (x == 1 || x == n - 1) continue;
    bool composite = true;
    for (int r = 1; r < s; ++r) {
      x = MulMod(x, x, n);
      if (x == n - 1) {
        composite = false;
        break;
      }
    }
    if (composite) return false;
  }
  return true;
}

int64_t NextPrimeAbove(int64_t n) {
  int64_t candidate = n < 2 ? 2 : n + 1;
  while (!IsPrime(static_cast<uint64_t>(candidate))) ++candidate;
  return candidate;
}

absl::Status HashConfig::Validate() const {
  if (max_ngram < 2 || max_ngram > 8) {
    return absl::InvalidArgumentError(absl::StrCat("hash.max_ngram must be in [2, 8], got ", max_ngram));
  }
  if (heads_per_ngram < 1 || heads_per_ngram > 64) {
    return absl::InvalidArgumentError(
        absl::StrCat("hash.heads_per_ngram must be in [1, 64], got ", heads_per_ngram));
  }
  if (static_cast<int>(vocab_per_ngram.size()) != max_ngram - 1) {
    return absl::InvalidArgumentError(absl::StrCat("hash.vocab_per_ngram needs ", max_ngram - 1,
                                                   " entries (orders 2..", max_ngram, "), got ",
                                                   vocab_per_ngram.size()));
  }
  for (size_t i = 0; i < vocab_per_ngram.size(); ++i) {
    if (vocab_per_ngram[i] < 2 || vocab_per_ngram[i] > (int64_t{1} << 40)) {
      return absl::InvalidArgumentError(absl::StrCat("hash.vocab_per_ngram[", i,
                                                     "] must be in [2, 2^40], got ",
                                                     vocab_per_ngram[i]));
    }
  }
  if (dead_token_id && *dead_token_id >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "hash.dead_token_id must be negative (a raw id no token has; DeepSeek-V4.1 uses -1), got ", *dead_token_id));
  }
  if (compressed_vocab < 1 || compressed_vocab >= (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("hash.compressed_vocab must be in [1, 2^30), got ", compressed_vocab));
  }
  if (!compress_lut.empty()) {
    if (pad_id < 0 || pad_id >= static_cast<int64_t>(compress_lut.size())) {
      return absl::InvalidArgumentError(absl::StrCat("hash.pad_id ", pad_id,
                                                     " is outside the compress lut of ",
                                                     compress_lut.size(), " ids"));
    }
    for (size_t i = 0; i < compress_lut.size(); ++i) {
      if (compress_lut[i] < 0 || compress_lut[i] >= compressed_vocab) {
        return absl::InvalidArgumentError(absl::StrCat("compress lut entry ", i, " = ",
                                                       compress_lut[i], " is outside [0, ",
                                                       compressed_vocab, ")"));
      }
    }
  }
  return absl::OkStatus();
}

void LayerHashLayout::ComputeOffsets() {
  head_offset.resize(head_rows.size());
  uint64_t offset = 0;
  for (size_t h = 0; h < head_rows.size(); ++h) {
    head_offset[h] = offset;
    offset += static_cast<uint64_t>(head_rows[h]);
  }
  total_rows = offset;
}

absl::StatusOr<std::vector<LayerHashLayout>> DeriveLayerLayouts(const HashConfig& config,
                                                                absl::Span<const int> layer_ids) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  const uint64_t max_int64 = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  uint64_t half_bound = max_int64 / static_cast<uint64_t>(config.compressed_vocab) / 2;
  if (half_bound < 1) half_bound = 1;

  std::set<int64_t> seen;
  std::vector<LayerHashLayout> layouts;
  for (int layer_id : layer_ids) {
    if (layer_id < 0) {
      return absl::InvalidArgumentError(absl::StrCat("layer id must be >= 0, got ", layer_id));
    }
    LayerHashLayout layout;
    layout.layer_id = layer_id;
    auto draws = NumpyIntegers(config.seed + 10007ULL * static_cast<uint64_t>(layer_id), half_bound,
                               config.max_ngram);
    if (!draws.ok()) return draws.status();
    for (uint64_t r : *draws) layout.multipliers.push_back(static_cast<int64_t>(2 * r + 1));
    for (int n = 2; n <= config.max_ngram; ++n) {
      int64_t start = config.vocab_per_ngram[n - 2] - 1;
      for (int head = 0; head < config.heads_per_ngram; ++head) {
        int64_t p = NextPrimeAbove(start);
        while (seen.count(p)) p = NextPrimeAbove(p);
        seen.insert(p);
        layout.head_rows.push_back(p);
        start = p;
      }
    }
    layout.ComputeOffsets();
    layouts.push_back(std::move(layout));
  }
  return layouts;
}

NgramHasher::NgramHasher(HashConfig config, std::vector<LayerHashLayout> layers)
    : config_(std::move(config)), layers_(std::move(layers)) {
  compressed_pad_ = config_.compress_lut.empty() ? config_.pad_id : config_.compress_lut[config_.pad_id];
}

absl::StatusOr<std::unique_ptr<NgramHasher>> NgramHasher::Create(HashConfig config,
                                                                 std::vector<LayerHashLayout> layers) {
  if (absl::Status s = config.Validate(); !s.ok()) return s;
  for (auto& layer : layers) {
    if (static_cast<int>(layer.head_rows.size()) != config.heads_per_layer()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer.layer_id, " has ",
                                                     layer.head_rows.size(), " head sizes, expected ",
                                                     config.heads_per_layer()));
    }
    if (static_cast<int>(layer.multipliers.size()) != config.max_ngram) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer.layer_id, " has ",
                                                     layer.multipliers.size(),
                                                     " multipliers, expected ", config.max_ngram));
    }
    for (int64_t rows : layer.head_rows) {
      if (rows < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("layer ", layer.layer_id, " has a head with ", rows, " rows"));
      }
    }
    layer.ComputeOffsets();
  }
  return std::unique_ptr<NgramHasher>(new NgramHasher(std::move(config), std::move(layers)));
}

int NgramHasher::LayerIndex(int layer_id) const {
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (layers_[i].layer_id == layer_id) return static_cast<int>(i);
  }
  return -1;
}

absl::Status NgramHasher::Compress(absl::Span<const int32_t> raw, absl::Span<int64_t> out) const {
  const auto& lut = config_.compress_lut;
  for (size_t i = 0; i < raw.size(); ++i) {
    const int32_t id = raw[i];
    if (id < 0 || lut.empty()) {
      out[i] = id;
    } else if (static_cast<size_t>(id) >= lut.size()) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " at position ", i,
                                                     " is outside the tokenizer's ", lut.size(),
                                                     " ids"));
    } else {
      out[i] = lut[id];
    }
  }
  return absl::OkStatus();
}

void NgramHasher::HashCompressed(absl::Span<const int64_t> compressed, int batch, int seq_len,
                                 int layer_index, absl::Span<int64_t> out) const {
  const LayerHashLayout& layer = layers_[layer_index];
  const int max_ngram = config_.max_ngram;
  const int heads = config_.heads_per_ngram;
  const int heads_per_layer = config_.heads_per_layer();
  const bool dead = config_.dead_token_id.has_value();
  const int64_t dead_id = config_.dead_token_id.value_or(0);
  for (int b = 0; b < batch; ++b) {
    const int64_t* seq = compressed.data() + static_cast<size_t>(b) * seq_len;
    for (int t = 0; t < seq_len; ++t) {
      int64_t* dst = out.data() + (static_cast<size_t>(b) * seq_len + t) * heads_per_layer;
      // Dead positions (when the table has them): once the walk back meets one, it stays blocked.
      // Negative ids pass compression unchanged, so the compressed marker is the raw one.
      bool blocked = dead && seq[t] == dead_id;
      // Wrapping signed arithmetic, done in uint64 (two's complement is the same bits).
      uint64_t mix = static_cast<uint64_t>(blocked ? compressed_pad_ : seq[t]) *
                     static_cast<uint64_t>(layer.multipliers[0]);
      for (int k = 1; k < max_ngram; ++k) {
        if (dead && !blocked && (t < k || seq[t - k] == dead_id)) blocked = true;
        const int64_t shifted = !blocked && t >= k ? seq[t - k] : compressed_pad_;
        mix ^= static_cast<uint64_t>(shifted) * static_cast<uint64_t>(layer.multipliers[k]);
        const int n = k + 1;  // mix now covers order n
        const int64_t signed_mix = static_cast<int64_t>(mix);
        for (int j = 0; j < heads; ++j) {
          const int h = (n - 2) * heads + j;
          const int64_t p = layer.head_rows[h];
          int64_t r = signed_mix % p;
          if (r < 0) r += p;
          dst[h] = r;
        }
      }
    }
  }
}

std::vector<uint64_t> NgramHasher::TraceRows(absl::Span<const int64_t> compressed, uint32_t seq_len,
                                             int layer_index) const {
  const LayerHashLayout& layout = layers_[layer_index];
  const int heads = heads_per_layer();
  seq_len = std::max<uint32_t>(1, seq_len);
  std::vector<uint64_t> rows;
  rows.reserve(compressed.size() * heads);
  std::vector<int64_t> local(static_cast<size_t>(seq_len) * heads);
  for (size_t start = 0; start < compressed.size(); start += seq_len) {
    const size_t len = std::min<size_t>(seq_len, compressed.size() - start);
    HashCompressed(compressed.subspan(start, len), 1, static_cast<int>(len), layer_index,
                   absl::MakeSpan(local.data(), len * heads));
    for (size_t i = 0; i < len * heads; ++i) rows.push_back(layout.head_offset[i % heads] + local[i]);
  }
  return rows;
}

absl::Status NgramHasher::HashAllLayers(absl::Span<const int32_t> raw, int batch, int seq_len,
                                        std::vector<int64_t>* out) const {
  const size_t tokens = static_cast<size_t>(batch) * seq_len;
  if (raw.size() != tokens) {
    return absl::InvalidArgumentError(absl::StrCat("expected ", tokens, " token ids for shape ",
                                                   batch, "x", seq_len, ", got ", raw.size()));
  }
  std::vector<int64_t> compressed(tokens);
  if (absl::Status s = Compress(raw, absl::MakeSpan(compressed)); !s.ok()) return s;
  const int heads = heads_per_layer();
  const int num_layers = static_cast<int>(layers_.size());
  out->assign(tokens * num_layers * heads, 0);
  std::vector<int64_t> one_layer(tokens * heads);
  for (int l = 0; l < num_layers; ++l) {
    HashCompressed(compressed, batch, seq_len, l, absl::MakeSpan(one_layer));
    for (size_t i = 0; i < tokens; ++i) {
      std::copy_n(one_layer.data() + i * heads, heads, out->data() + (i * num_layers + l) * heads);
    }
  }
  return absl::OkStatus();
}

}  // namespace engram
