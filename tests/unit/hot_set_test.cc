// Hot-set files and the state store: what is written is read back; a damaged file is refused
// with an error naming it, never half-applied.
#include "tiering/hot_set.h"

#include "gtest/gtest.h"
#include "tests/test_util.h"
#include "tiering/state_store.h"

namespace engram {
namespace {

HotSet Sample() {
  HotSet h;
  h.table = "demo";
  h.fingerprint = "demo;bf16x64;1:100:abc";
  h.layers = {{1, {{5, 9}, {7, 3}}}, {15, {{2, 1}}}};
  return h;
}

TEST(HotSetTest, RoundTripsThroughAFile) {
  testing::TempDir dir;
  ASSERT_TRUE(WriteHotSetFile(Sample(), dir / "h").ok());
  auto back = ReadHotSetFile(dir / "h");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->table, "demo");
  EXPECT_EQ(back->fingerprint, Sample().fingerprint);
  ASSERT_NE(back->FindLayer(1), nullptr);
  EXPECT_EQ(back->FindLayer(1)->rows, Sample().layers[0].rows);
  EXPECT_EQ(back->FindLayer(15)->rows.size(), 1u);
}

TEST(HotSetTest, DamagedBytesAreRefused) {
  const std::string bytes = EncodeHotSet(Sample());
  auto truncated = DecodeHotSet(absl::string_view(bytes).substr(0, bytes.size() - 5), "h.bin");
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(truncated.status().message().find("h.bin"), absl::string_view::npos);
  EXPECT_EQ(DecodeHotSet("not a hot set", "x").status().code(), absl::StatusCode::kInvalidArgument);
  std::string huge = bytes;
  huge[4 + 4 + 4 + Sample().fingerprint.size() + 4 + 4 + 4] = '\x7f';  // a row count far past the end
  EXPECT_FALSE(DecodeHotSet(huge, "x").ok());
}

TEST(HotSetTest, StateStoreKeepsTheLatestSnapshot) {
  testing::TempDir dir;
  {
    auto store = StateStore::Open(dir / "db");
    ASSERT_TRUE(store.ok()) << store.status();
    auto none = (*store)->LoadHotSet("demo");
    ASSERT_TRUE(none.ok());
    EXPECT_FALSE(none->has_value());
    ASSERT_TRUE((*store)->SaveHotSet(Sample()).ok());
    HotSet newer = Sample();
    newer.layers[0].rows = {{42, 1}};
    ASSERT_TRUE((*store)->SaveHotSet(newer).ok());
  }
  auto store = StateStore::Open(dir / "db");  // reopened, as after a restart
  ASSERT_TRUE(store.ok());
  auto loaded = (*store)->LoadHotSet("demo");
  ASSERT_TRUE(loaded.ok() && loaded->has_value());
  EXPECT_EQ((*loaded)->FindLayer(1)->rows[0].first, 42u);
}

}  // namespace
}  // namespace engram
