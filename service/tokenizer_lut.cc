#include "service/tokenizer_lut.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>
#include <unicode/unistr.h>
#include <unicode/uversion.h>

#include <array>
#include <fstream>
#include <memory>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace engram {
namespace {

constexpr char kUnicodeVersion[] = "9.0";

// Byte-level BPE: every byte has a printable stand-in character (bytes that print as themselves
// keep their code point; the others, in order, take 256, 257, ...). Returns code point -> byte,
// -1 for characters that stand for no byte.
const absl::flat_hash_map<uint32_t, uint8_t>& ByteLevelDecodeMap() {
  static const auto* map = [] {
    auto* m = new absl::flat_hash_map<uint32_t, uint8_t>();
    auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) (*m)[printable(b) ? static_cast<uint32_t>(b) : next++] = static_cast<uint8_t>(b);
    return m;
  }();
  return *map;
}

// Code points of a UTF-8 string known to be valid (JSON strings are).
std::vector<uint32_t> CodePoints(const std::string& s) {
  std::vector<uint32_t> out;
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(s);
  for (int32_t i = 0; i < u.length();) {
    const UChar32 c = u.char32At(i);
    out.push_back(static_cast<uint32_t>(c));
    i += U16_LENGTH(c);
  }
  return out;
}

// True when `bytes` is well-formed UTF-8 (no surrogates, no overlongs, at most U+10FFFF).
bool ValidUtf8(const std::string& bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return false;
    }
    if (i + len > n || p[i + 1] < lo || p[i + 1] > hi) return false;
    for (size_t k = 2; k < len; ++k) {
      if (p[i + k] < 0x80 || p[i + k] > 0xBF) return false;
    }
    i += len;
  }
  return true;
}

// What the reference's decode of one vocabulary token gives: the bytes its characters stand for
// (a token with a character that stands for no byte decodes to its own UTF-8 bytes), as UTF-8.
std::string ByteLevelDecode(const std::string& token) {
  const auto& map = ByteLevelDecodeMap();
  std::string bytes;
  for (uint32_t cp : CodePoints(token)) {
    auto it = map.find(cp);
    if (it == map.end()) return token;
    bytes.push_back(static_cast<char>(it->second));
  }
  return bytes;
}

struct Normalizers {
  icu::UnicodeSet assigned;  // code points assigned by kUnicodeVersion
  std::unique_ptr<icu::FilteredNormalizer2> nfkc, nfd;
};

const Normalizers& Unicode9() {
  static const Normalizers* n = [] {
    auto* out = new Normalizers();
    UErrorCode status = U_ZERO_ERROR;
    out->assigned.applyPattern(icu::UnicodeString::fromUTF8(absl::StrCat("[:age=", kUnicodeVersion, ":]")), status);
    out->assigned.freeze();
    const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
    const icu::Normalizer2* nfd = icu::Normalizer2::getNFDInstance(status);
    if (U_FAILURE(status)) {
      std::fprintf(stderr, "ICU: cannot load normalization data: %s\n", u_errorName(status));
      std::abort();  // the ICU install is broken: nothing this program can do
    }
    out->nfkc = std::make_unique<icu::FilteredNormalizer2>(*nfkc, out->assigned);
    out->nfd = std::make_unique<icu::FilteredNormalizer2>(*nfd, out->assigned);
    return out;
  }();
  return *n;
}

bool IsMark(UChar32 c, const icu::UnicodeSet& assigned) {
  const int8_t t = u_charType(c);
  return (t == U_NON_SPACING_MARK || t == U_COMBINING_SPACING_MARK || t == U_ENCLOSING_MARK) && assigned.contains(c);
}

}  // namespace

std::string LutUnicodeVersions() {
  UVersionInfo v;
  u_getUnicodeVersion(v);
  char text[U_MAX_VERSION_STRING_LENGTH];
  u_versionToString(v, text);
  return absl::StrCat("Unicode ", kUnicodeVersion, " repertoire (ICU ", U_ICU_VERSION, ", Unicode ", text, " data)");
}

std::string NormalizeTokenText(const std::string& text) {
  const Normalizers& n = Unicode9();
  UErrorCode status = U_ZERO_ERROR;
  icu::UnicodeString compat, s;
  n.nfkc->normalize(icu::UnicodeString::fromUTF8(text), compat, status);
  n.nfd->normalize(compat, s, status);
  if (U_FAILURE(status)) return "";
  // Marks out, then full lowercase character by character (no context: a lone final sigma is σ).
  icu::UnicodeString lowered;
  for (int32_t i = 0; i < s.length();) {
    const UChar32 c = s.char32At(i);
    i += U16_LENGTH(c);
    if (IsMark(c, n.assigned)) continue;
    icu::UnicodeString one(c);
    lowered.append(one.toLower(icu::Locale::getRoot()));
  }
  // Runs of space, tab, CR, LF become one space.
  icu::UnicodeString collapsed;
  bool in_run = false;
  for (int32_t i = 0; i < lowered.length(); ++i) {
    const char16_t c = lowered.charAt(i);
    const bool ws = c == u' ' || c == u'\t' || c == u'\r' || c == u'\n';
    if (ws) {
      if (!in_run) collapsed.append(u' ');
      in_run = true;
    } else {
      collapsed.append(c);
      in_run = false;
    }
  }
  // A lone space stays; otherwise White_Space characters are trimmed from both ends.
  if (collapsed != icu::UnicodeString(u" ")) {
    int32_t begin = 0, end = collapsed.length();
    while (begin < end && u_isUWhiteSpace(collapsed.char32At(begin))) begin += U16_LENGTH(collapsed.char32At(begin));
    while (end > begin) {
      const int32_t last = collapsed.moveIndex32(end, -1);
      if (!u_isUWhiteSpace(collapsed.char32At(last))) break;
      end = last;
    }
    collapsed = icu::UnicodeString(collapsed, begin, end - begin);
  }
  std::string out;
  collapsed.toUTF8String(out);
  return out;
}

absl::StatusOr<TokenizerLut> BuildCompressLutUnchecked(const std::string& path, int64_t vocab_size);

absl::StatusOr<TokenizerLut> BuildCompressLut(const std::string& path, int64_t vocab_size) {
  try {
    return BuildCompressLutUnchecked(path, vocab_size);
  } catch (const nlohmann::json::exception& e) {  // a field of the wrong type somewhere in the file
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a tokenizer.json as expected: ", e.what()));
  }
}

absl::StatusOr<TokenizerLut> BuildCompressLutUnchecked(const std::string& path, int64_t vocab_size) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json doc = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, " is not valid JSON"));
  if (!doc.contains("model") || !doc["model"].contains("vocab") || !doc["model"]["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": no model.vocab object (a BPE tokenizer.json has one)"));
  }
  const std::string model_type = doc["model"].value("type", "");
  if (model_type != "BPE") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": model.type is '", model_type, "'; only byte-level BPE tokenizers are supported"));
  }
  const bool byte_level = doc.contains("decoder") && doc["decoder"].is_object() &&
                          doc["decoder"].value("type", "") == "ByteLevel";
  if (!byte_level) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": the decoder is not ByteLevel; only byte-level BPE "
                                                         "tokenizers are supported"));
  }
  // id -> (text as the tokenizer decodes it, the raw vocabulary string); added tokens win.
  std::vector<std::string> vocab_string, decoded;
  std::vector<bool> present;
  auto place = [&](int64_t id, const std::string& raw, const std::string& dec) -> absl::Status {
    if (id < 0 || id >= (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token id ", id, " is out of range"));
    }
    if (static_cast<size_t>(id) >= present.size()) {
      present.resize(id + 1, false);
      vocab_string.resize(id + 1);
      decoded.resize(id + 1);
    }
    present[id] = true;
    vocab_string[id] = raw;
    decoded[id] = dec;
    return absl::OkStatus();
  };
  for (const auto& [token, id] : doc["model"]["vocab"].items()) {
    if (!id.is_number_integer()) return absl::InvalidArgumentError(absl::StrCat(path, ": vocab entry without an id"));
    if (absl::Status s = place(id.get<int64_t>(), token, ByteLevelDecode(token)); !s.ok()) return s;
  }
  if (doc.contains("added_tokens") && doc["added_tokens"].is_array()) {
    for (const auto& added : doc["added_tokens"]) {
      if (!added.contains("id") || !added.contains("content")) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": an added token without id or content"));
      }
      const std::string content = added["content"].get<std::string>();
      if (absl::Status s = place(added["id"].get<int64_t>(), content, content); !s.ok()) return s;
    }
  }
  TokenizerLut out;
  out.tokens = static_cast<int64_t>(present.size());
  for (size_t id = 0; id < present.size(); ++id) {
    if (!present[id]) return absl::InvalidArgumentError(absl::StrCat(path, ": no token has id ", id));
  }
  if (out.tokens == 0) return absl::InvalidArgumentError(absl::StrCat(path, ": the vocabulary is empty"));
  if (vocab_size != 0 && vocab_size < out.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("--vocab-size ", vocab_size, " is smaller than the tokenizer's ",
                                                   out.tokens, " tokens"));
  }
  const std::string replacement = "\xEF\xBF\xBD";  // U+FFFD
  absl::flat_hash_map<std::string, int32_t> ids;
  out.lut.reserve(std::max<int64_t>(vocab_size, out.tokens));
  for (int64_t id = 0; id < out.tokens; ++id) {
    const std::string& dec = decoded[id];
    std::string key;
    if (!ValidUtf8(dec) || dec.find(replacement) != std::string::npos) {
      key = vocab_string[id];  // its decoding is lossy: keyed by its byte-level form
      ++out.raw_keys;
    } else {
      key = NormalizeTokenText(dec);
      if (key.empty()) key = dec;
    }
    auto [it, inserted] = ids.try_emplace(std::move(key), static_cast<int32_t>(ids.size()));
    out.lut.push_back(it->second);
  }
  out.compressed_vocab = static_cast<int64_t>(ids.size());
  while (static_cast<int64_t>(out.lut.size()) < vocab_size) out.lut.push_back(out.lut[out.tokens - 1]);
  return out;
}

}  // namespace engram
