// Command-line parsing as users type it.
#include "service/cli_flags.h"

#include "gtest/gtest.h"

namespace engram {
namespace {

absl::Status ParseArgs(FlagSet& flags, std::vector<std::string> args, std::vector<std::string>* positional) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return flags.Parse(static_cast<int>(argv.size()), argv.data(), 1, positional);
}

TEST(CliFlagsTest, FormsOfFlags) {
  std::vector<std::string> packs;
  std::string listen = "127.0.0.1:1";
  int64_t n = 0;
  bool verify = true;
  FlagSet flags("t", "usage");
  flags.StringList("pack", &packs, "p");
  flags.String("listen", &listen, "l");
  flags.Int("n", &n, "n");
  flags.Bool("verify", &verify, "v");
  std::vector<std::string> positional;
  ASSERT_TRUE(ParseArgs(flags, {"t", "--pack", "a", "--pack=b", "--listen=[::1]:5", "--n", "7", "--no-verify", "x"},
                        &positional)
                  .ok());
  EXPECT_EQ(packs, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(listen, "[::1]:5");
  EXPECT_EQ(n, 7);
  EXPECT_FALSE(verify);
  EXPECT_EQ(positional, (std::vector<std::string>{"x"}));
  EXPECT_NE(flags.Help().find("--pack VALUE"), std::string::npos);
}

TEST(CliFlagsTest, ErrorsNameTheFlag) {
  int64_t n = 0;
  FlagSet flags("t", "usage");
  flags.Int("n", &n, "n");
  absl::Status s = ParseArgs(flags, {"t", "--n", "seven"}, nullptr);
  EXPECT_NE(s.message().find("--n wants an integer, got 'seven'"), absl::string_view::npos) << s;
  s = ParseArgs(flags, {"t", "--bogus"}, nullptr);
  EXPECT_NE(s.message().find("unknown flag --bogus"), absl::string_view::npos) << s;
  s = ParseArgs(flags, {"t", "--n"}, nullptr);
  EXPECT_NE(s.message().find("--n needs a value"), absl::string_view::npos) << s;
  s = ParseArgs(flags, {"t", "stray"}, nullptr);
  EXPECT_NE(s.message().find("unexpected argument 'stray'"), absl::string_view::npos) << s;
  ASSERT_TRUE(ParseArgs(flags, {"t", "--help"}, nullptr).ok());
  EXPECT_TRUE(flags.help_requested());
}

TEST(CliFlagsTest, ByteSizes) {
  uint64_t v = 0;
  ASSERT_TRUE(ParseBytes("64K", &v).ok());
  EXPECT_EQ(v, 65536u);
  ASSERT_TRUE(ParseBytes("2G", &v).ok());
  EXPECT_EQ(v, 2ull << 30);
  ASSERT_TRUE(ParseBytes("1.5m", &v).ok());
  EXPECT_EQ(v, 3ull << 19);
  EXPECT_FALSE(ParseBytes("lots", &v).ok());
}

}  // namespace
}  // namespace engram
