// The token compression table (HASHING.md, "Lut from a tokenizer.json") built from a Hugging Face
// tokenizer.json: every token id's decoded text is normalized (NFKC, NFD, Marks removed, full
// lowercase, whitespace collapsed and trimmed), and ids whose normal forms agree share one
// compressed id, numbered by first appearance. Byte-level BPE decoding and the normal forms follow
// the reference library's semantics; normalization and the Mark test use Unicode 9.0's repertoire
// (ICU with its data restricted to characters assigned by Unicode 9.0), as the reference's
// normalizer does. Plain functions; thread-safe.
#ifndef ENGRAM_SERVICE_TOKENIZER_LUT_H_
#define ENGRAM_SERVICE_TOKENIZER_LUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace engram {

struct TokenizerLut {
  std::vector<int32_t> lut;      // raw id -> compressed id, [max(vocab_size, tokens)]
  int64_t tokens = 0;            // len(tokenizer): vocabulary plus added tokens
  int64_t compressed_vocab = 0;  // distinct compressed ids
  int64_t raw_keys = 0;          // ids whose decoded text held U+FFFD (keyed by their vocabulary string)
};

// `vocab_size` 0: the tokenizer's length; larger: ids past the tokenizer take the last token's
// compressed id; smaller than the tokenizer: InvalidArgument. Errors name what in the file is wrong.
absl::StatusOr<TokenizerLut> BuildCompressLut(const std::string& tokenizer_json_path, int64_t vocab_size);

// The normal form of one token's text (UTF-8 in and out), as the lut keys it; empty when nothing
// is left (the caller then keys the text itself).
std::string NormalizeTokenText(const std::string& text);

// The Unicode version whose repertoire the normalization is restricted to, and ICU's own.
std::string LutUnicodeVersions();

}  // namespace engram

#endif  // ENGRAM_SERVICE_TOKENIZER_LUT_H_
