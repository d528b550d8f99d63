// The compression table from a tokenizer.json: DeepSeek-V3's tokenizer gives exactly the reference
// lut (computed with Hugging Face's own library, 98,627 ids), and the normal form follows each rule
// HASHING.md states, on Unicode 9.0's repertoire.
#include "service/tokenizer_lut.h"

#include <fstream>

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/layout/manifest.h"

namespace engram {
namespace {

TEST(TokenizerLutTest, DeepSeekV3TokenizerGivesTheReferenceLut) {
  auto reference = ReadInt32File(ENGRAM_LUT_PATH);
  ASSERT_TRUE(reference.ok()) << reference.status();
  ASSERT_EQ(reference->size(), 129280u);
  auto built = BuildCompressLut(testing::TestDataPath("deepseek_v3_tokenizer.json"), 129280);
  ASSERT_TRUE(built.ok()) << built.status();
  EXPECT_EQ(built->tokens, 128815);
  EXPECT_EQ(built->compressed_vocab, 98627);
  ASSERT_EQ(built->lut.size(), reference->size());
  size_t differ = 0, first = 0;
  for (size_t i = 0; i < built->lut.size(); ++i) {
    if (built->lut[i] != (*reference)[i] && differ++ == 0) first = i;
  }
  EXPECT_EQ(differ, 0u) << "first difference at id " << first;
  // Without --vocab-size: the tokenizer's own length.
  auto own = BuildCompressLut(testing::TestDataPath("deepseek_v3_tokenizer.json"), 0);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_EQ(own->lut.size(), 128815u);
  EXPECT_TRUE(std::equal(own->lut.begin(), own->lut.end(), reference->begin()));
  EXPECT_EQ(BuildCompressLut(testing::TestDataPath("deepseek_v3_tokenizer.json"), 1000).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TokenizerLutTest, NormalFormFollowsEachRule) {
  EXPECT_EQ(NormalizeTokenText("Ünïcödé"), "unicode");              // NFD, then marks out, lowercase
  EXPECT_EQ(NormalizeTokenText("\xEF\xAC\x81"), "fi");                  // U+FB01: NFKC
  EXPECT_EQ(NormalizeTokenText("a\xE2\x83\x9D"), "a");                  // U+20DD, an enclosing mark (Me)
  EXPECT_EQ(NormalizeTokenText("\xE0\xA4\x95\xE0\xA4\xBE"), "\xE0\xA4\x95");  // U+093E, a spacing mark (Mc)
  EXPECT_EQ(NormalizeTokenText("\xCE\xA3\xCE\x91\xCE\xA3"), "\xCF\x83\xCE\xB1\xCF\x83");  // ΣΑΣ -> σασ: no final sigma
  EXPECT_EQ(NormalizeTokenText("  a \t\n b\r\n"), "a b");             // runs collapse, ends trimmed
  EXPECT_EQ(NormalizeTokenText(" "), " ");                              // a lone space stays
  EXPECT_EQ(NormalizeTokenText("\t"), " ");                             // ... as does a lone tab, as a space
  EXPECT_EQ(NormalizeTokenText("\xC2\xA0x\xE2\x80\x83"), "x");          // NBSP (NFKC: space), EM SPACE: trimmed
  EXPECT_EQ(NormalizeTokenText("\xEF\xBB\xBF" "a"), "\xEF\xBB\xBF" "a");  // U+FEFF is not White_Space
  EXPECT_EQ(NormalizeTokenText("\xE2\x80\x8B"), "\xE2\x80\x8B");        // U+200B neither
  // A mark Unicode assigned after 9.0 (U+1DF9, Unicode 10) is not a mark to the reference: it stays.
  EXPECT_EQ(NormalizeTokenText("a\xE1\xB7\xB9"), "a\xE1\xB7\xB9");
  EXPECT_EQ(NormalizeTokenText("\xCC\x81"), "");  // a lone combining accent leaves nothing (keyed as itself)
}

TEST(TokenizerLutTest, BadTokenizerFilesAreRefusedClearly) {
  testing::TempDir dir;
  auto write = [&](const std::string& text) {
    std::ofstream(dir / "t.json") << text;
    return BuildCompressLut(dir / "t.json", 0).status();
  };
  EXPECT_NE(write("{").message().find("is not valid JSON"), absl::string_view::npos);
  EXPECT_NE(write("{\"model\": {}}").message().find("no model.vocab"), absl::string_view::npos);
  EXPECT_NE(write("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}").message().find("only byte-level BPE"),
            absl::string_view::npos);
  const absl::Status hole = write(
      "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 2}}, \"decoder\": {\"type\": \"ByteLevel\"}}");
  EXPECT_NE(hole.message().find("no token has id 1"), absl::string_view::npos) << hole;
  const absl::Status typed = write(
      "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}, \"decoder\": {\"type\": \"ByteLevel\"}, "
      "\"added_tokens\": [{\"id\": \"one\", \"content\": \"x\"}]}");
  EXPECT_EQ(typed.code(), absl::StatusCode::kInvalidArgument) << typed;  // a clear error, not a crash
  EXPECT_NE(typed.message().find("not a tokenizer.json as expected"), absl::string_view::npos) << typed;
  EXPECT_EQ(BuildCompressLut(dir / "missing.json", 0).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace engram
