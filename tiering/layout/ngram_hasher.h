// Engram N-gram hashing (HASHING.md): token compression, per-layer odd multipliers drawn with
// numpy's generator, one distinct prime table size per (layer, order, head), and the wrapping
// int64 XOR mix reduced by floor modulo. Bit-exact with the reference demo.
//
// HashConfig is plain data. LayerHashLayout is derived once per table. NgramHasher is immutable
// after construction and safe to share between threads.
#ifndef ENGRAM_TIERING_LAYOUT_NGRAM_HASHER_H_
#define ENGRAM_TIERING_LAYOUT_NGRAM_HASHER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace engram {

struct HashConfig {
  int max_ngram = 3;                     // orders 2..max_ngram are hashed
  int heads_per_ngram = 8;               // K heads per order
  uint64_t seed = 0;
  std::vector<int64_t> vocab_per_ngram;  // base table size per order, [max_ngram - 1]
  int64_t pad_id = 2;                    // raw id used for left padding
  std::vector<int32_t> compress_lut;     // raw id -> compressed id; empty means identity
  int64_t compressed_vocab = 0;          // max(lut)+1, or the raw vocab size without a lut
  // The raw id that marks a dead position (no text: an image span), when the table's model has
  // them (DeepSeek-V4.1: -1). An n-gram never reaches across or into one: walking back from a
  // position, every slot from the first dead (or before-the-start) one on takes the pad id, so a
  // dead position itself hashes as all-pad (HASHING.md §6). Unset: the reference demo's semantics
  // (only positions before the start are padded; a negative id is hashed as it is).
  std::optional<int64_t> dead_token_id;

  int heads_per_layer() const { return (max_ngram - 1) * heads_per_ngram; }
  // Checks ranges and consistency; the message names the offending field.
  absl::Status Validate() const;
};

// The derived per-layer constants: head sizes (primes), multipliers, and where each head's rows start.
struct LayerHashLayout {
  int layer_id = 0;
  std::vector<int64_t> head_rows;     // [heads_per_layer], prime sizes in head order
  std::vector<int64_t> multipliers;   // [max_ngram], odd
  std::vector<uint64_t> head_offset;  // [heads_per_layer], prefix sums of head_rows
  uint64_t total_rows = 0;

  // Fills head_offset and total_rows from head_rows.
  void ComputeOffsets();
};

// Smallest prime strictly greater than n (deterministic Miller-Rabin; n < 2^62).
int64_t NextPrimeAbove(int64_t n);
bool IsPrime(uint64_t n);

// Derives every layer's layout for `layer_ids` in the configured order (the prime search is
// shared across layers, so order matters).
absl::StatusOr<std::vector<LayerHashLayout>> DeriveLayerLayouts(const HashConfig& config,
                                                                absl::Span<const int> layer_ids);

class NgramHasher {
 public:
  // `layers` must hold head_rows and multipliers sized for `config` (derived or explicit).
  static absl::StatusOr<std::unique_ptr<NgramHasher>> Create(HashConfig config,
                                                             std::vector<LayerHashLayout> layers);

  const HashConfig& config() const { return config_; }
  const std::vector<LayerHashLayout>& layers() const { return layers_; }
  int heads_per_layer() const { return config_.heads_per_layer(); }
  int64_t compressed_pad() const { return compressed_pad_; }  // the pad id after compression
  // Index into layers() of the layer with this id, or -1.
  int LayerIndex(int layer_id) const;

  // Raw ids [batch][seq_len] -> compressed ids. Fails (InvalidArgument, naming the position) on a
  // raw id outside the lut.
  absl::Status Compress(absl::Span<const int32_t> raw, absl::Span<int64_t> out) const;

  // Head-local indices out[b][t][h] for one layer (`layer_index` into layers()), from compressed ids
  // [batch][seq_len]. REQUIRES: out.size() == batch*seq_len*heads_per_layer().
  void HashCompressed(absl::Span<const int64_t> compressed, int batch, int seq_len, int layer_index,
                      absl::Span<int64_t> out) const;

  // The global rows a token stream touches in one layer, in order (token by token, head by head),
  // hashing `compressed` as consecutive sequences of `seq_len` tokens: what a trace replay, a
  // profile and the cache simulator all need.
  std::vector<uint64_t> TraceRows(absl::Span<const int64_t> compressed, uint32_t seq_len, int layer_index) const;

  // Convenience: compress then hash every layer; out is [batch][seq_len][layers][heads].
  absl::Status HashAllLayers(absl::Span<const int32_t> raw, int batch, int seq_len,
                             std::vector<int64_t>* out) const;

 private:
  NgramHasher(HashConfig config, std::vector<LayerHashLayout> layers);

  HashConfig config_;
  std::vector<LayerHashLayout> layers_;
  int64_t compressed_pad_ = 0;
};

}  // namespace engram

#endif  // ENGRAM_TIERING_LAYOUT_NGRAM_HASHER_H_
