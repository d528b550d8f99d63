// The HBM tier's residency logic, on the CPU: the hottest rows fill free slots first; a resident
// row is displaced only by a clearly hotter one (no flapping at the boundary) and its slot is
// reused; plans are bounded; old heat decays so a new hot set takes over; and the flat index the
// device probes finds every resident row's slot and nothing else.
#include "tiering/hbm/hbm_residency.h"

#include <random>
#include <set>

#include "engram/kernels/hbm_probe.h"
#include "gtest/gtest.h"

namespace engram {
namespace {

void Touch(HbmResidency* r, uint64_t row, int times) {
  for (int i = 0; i < times; ++i) r->RecordAccess(row);
}

TEST(HbmResidencyTest, HottestRowsFillFreeSlotsThenSwapOnlyWhenClearlyHotter) {
  HbmResidency r(3);
  Touch(&r, 10, 50);
  Touch(&r, 20, 40);
  Touch(&r, 30, 30);
  Touch(&r, 40, 5);
  HbmPlan plan = r.NextPlan(10);
  ASSERT_EQ(plan.promote.size(), 3u);
  EXPECT_TRUE(plan.demote.empty());
  std::set<uint64_t> rows;
  std::set<uint32_t> slots;
  for (const auto& m : plan.promote) {
    rows.insert(m.row);
    slots.insert(m.slot);
  }
  EXPECT_EQ(rows, (std::set<uint64_t>{10, 20, 30}));
  EXPECT_EQ(slots, (std::set<uint32_t>{0, 1, 2}));
  r.Apply(plan);
  EXPECT_EQ(r.resident(), 3u);
  // Row 40 is colder than everything resident: nothing to do.
  EXPECT_TRUE(r.NextPlan(10).promote.empty());
  // Just above the coldest resident (30 -> 33 < 30 * 1.25): still nothing, no flapping.
  Touch(&r, 40, 28);
  EXPECT_TRUE(r.NextPlan(10).promote.empty());
  // Clearly hotter: row 40 takes row 30's slot.
  const uint32_t slot30 = r.SlotOf(30);
  Touch(&r, 40, 20);
  plan = r.NextPlan(10);
  ASSERT_EQ(plan.promote.size(), 1u);
  EXPECT_EQ(plan.promote[0].row, 40u);
  EXPECT_EQ(plan.promote[0].slot, slot30);
  EXPECT_EQ(plan.demote, std::vector<uint64_t>{30});
  // Applied in two steps, as the arena does (demotions published before rows are overwritten).
  r.Apply(HbmPlan{plan.demote, {}});
  EXPECT_EQ(r.SlotOf(30), kernels::kNoSlot);
  EXPECT_EQ(r.SlotOf(40), kernels::kNoSlot);
  EXPECT_EQ(r.resident(), 2u);
  r.Apply(HbmPlan{{}, plan.promote});
  EXPECT_EQ(r.SlotOf(40), slot30);
  EXPECT_EQ(r.resident(), 3u);
  // Every slot is held by exactly one row.
  std::set<uint32_t> held = {r.SlotOf(10), r.SlotOf(20), r.SlotOf(40)};
  EXPECT_EQ(held, (std::set<uint32_t>{0, 1, 2}));
  EXPECT_TRUE(r.NextPlan(10).promote.empty());
}

TEST(HbmResidencyTest, PlansAreBoundedAndDecayLetsANewHotSetTakeOver) {
  HbmResidency r(100, /*decay_every=*/1000);
  for (uint64_t row = 0; row < 100; ++row) Touch(&r, row, 5);
  HbmPlan first = r.NextPlan(30);
  EXPECT_EQ(first.promote.size(), 30u);
  r.Apply(first);
  for (int i = 0; i < 3; ++i) r.Apply(r.NextPlan(30));
  EXPECT_EQ(r.resident(), 100u);
  // A new set of rows becomes hot; after a few decays it displaces the old one entirely.
  for (int round = 0; round < 20; ++round) {
    for (uint64_t row = 1000; row < 1100; ++row) Touch(&r, row, 3);
  }
  for (int i = 0; i < 10; ++i) r.Apply(r.NextPlan(30));
  for (uint64_t row = 1000; row < 1100; ++row) EXPECT_NE(r.SlotOf(row), kernels::kNoSlot) << row;
  for (uint64_t row = 0; row < 100; ++row) EXPECT_EQ(r.SlotOf(row), kernels::kNoSlot) << row;
}

TEST(HbmResidencyTest, SampledCountsDecayMoreSlowly) {
  // The same 64,000 accesses, counted one by one and as 1-in-64 samples: sampled counts halve
  // 4x less often (each row needs more samples to be ranked), lightly sampled ones as often.
  HbmResidency exact(10, /*decay_every=*/1000), sampled(10, 1000), light(10, 1000);
  for (int i = 0; i < 64000; ++i) exact.RecordAccess(i % 50);
  for (int i = 0; i < 1000; ++i) sampled.RecordAccess(i % 50, 64);
  for (int i = 0; i < 16000; ++i) light.RecordAccess(i % 50, 4);
  EXPECT_EQ(exact.decays(), 64u);
  EXPECT_EQ(sampled.decays(), 16u);
  EXPECT_EQ(light.decays(), 64u);
  EXPECT_EQ(HbmResidency::DecayPeriod(1000, 1), 1000u);
  EXPECT_EQ(HbmResidency::DecayPeriod(1000, 64), 4000u);
}

TEST(HbmResidencyTest, FlatIndexFindsEveryResidentRowAndNothingElse) {
  HbmResidency r(5000);
  for (uint64_t row = 0; row < 5000; ++row) Touch(&r, row * 7919 + 3, 1 + static_cast<int>(row % 5));
  r.Apply(r.NextPlan(5000));
  ASSERT_EQ(r.resident(), 5000u);
  std::vector<uint64_t> keys;
  std::vector<uint32_t> slots;
  uint64_t mask = 0;
  r.CopyIndex(&keys, &slots, &mask);
  EXPECT_EQ(keys.size(), mask + 1);
  EXPECT_EQ(mask & (mask + 1), 0u) << "bucket count must be a power of two";
  EXPECT_GE(keys.size(), 10000u) << "at most half full";
  std::set<uint32_t> seen;
  for (uint64_t row = 0; row < 5000; ++row) {
    const uint32_t slot = kernels::HbmProbe(keys.data(), slots.data(), mask, row * 7919 + 3);
    ASSERT_LT(slot, 5000u) << row;
    EXPECT_TRUE(seen.insert(slot).second) << "slot " << slot << " given twice";
    EXPECT_EQ(kernels::HbmProbe(keys.data(), slots.data(), mask, row * 7919 + 4), kernels::kNoSlot);
  }
  // The batched host probe (what clients use) answers the same for resident and absent rows,
  // batches shorter than its look-ahead included.
  std::vector<uint64_t> rows;
  for (uint64_t row = 0; row < 5000; ++row) rows.push_back(row * 7919 + 3 + (row % 3 == 0 ? 1 : 0));
  for (size_t n : {size_t{0}, size_t{1}, size_t{7}, rows.size()}) {
    std::vector<uint32_t> many(n + 1, 12345);
    kernels::HbmProbeMany(keys.data(), slots.data(), mask, rows.data(), n, many.data());
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(many[i], kernels::HbmProbe(keys.data(), slots.data(), mask, rows[i])) << i;
      EXPECT_EQ(many[i] == kernels::kNoSlot, i % 3 == 0) << i;
    }
    EXPECT_EQ(many[n], 12345u) << "wrote past the batch";
  }
}

// Rows come and go for many rounds (every demotion deletes from the index in place): the index
// always answers exactly the resident set, and slots are never shared.
TEST(HbmResidencyTest, IndexStaysExactUnderChurn) {
  HbmResidency r(500, /*decay_every=*/3000);
  std::mt19937_64 rng(7);
  for (int round = 0; round < 60; ++round) {
    // A shifting hot window over 5000 rows.
    for (int i = 0; i < 2000; ++i) Touch(&r, (round * 80 + rng() % 700) % 5000, 1);
    r.Apply(r.NextPlan(200, 1.1));
    std::set<uint32_t> slots;
    size_t found = 0;
    for (uint64_t row = 0; row < 5000; ++row) {
      const uint32_t slot = r.SlotOf(row);
      if (slot == kernels::kNoSlot) continue;
      ++found;
      ASSERT_LT(slot, 500u);
      ASSERT_TRUE(slots.insert(slot).second) << "slot " << slot << " held twice in round " << round;
    }
    ASSERT_EQ(found, r.resident()) << "round " << round;
  }
  EXPECT_GT(r.resident(), 400u);
}

// Many residents: victims come from a sample, and a plan's cost does not grow with the slots.
// Every hot row still gets in, every victim was resident, and no slot is handed out twice.
TEST(HbmResidencyTest, ManyResidentsVictimsFromASampleStillMakeRoomForTheHotRows) {
  constexpr uint32_t kSlots = 100000;
  HbmResidency r(kSlots, /*decay_every=*/1ull << 40);
  for (uint64_t row = 0; row < kSlots; ++row) r.RecordAccess(row);
  r.Apply(r.NextPlan(kSlots));
  ASSERT_EQ(r.resident(), kSlots);
  for (uint64_t row = 1000000; row < 1001000; ++row) Touch(&r, row, 10);
  Touch(&r, 2000000, 1);  // no hotter than the residents: not a candidate at all
  const HbmPlan plan = r.NextPlan(5000);
  ASSERT_EQ(plan.promote.size(), 1000u);
  ASSERT_EQ(plan.demote.size(), 1000u);
  std::set<uint32_t> slots;
  for (const HbmMove& m : plan.promote) {
    EXPECT_GE(m.row, 1000000u);
    EXPECT_LT(m.row, 1001000u);
    EXPECT_TRUE(slots.insert(m.slot).second) << "slot " << m.slot << " twice";
  }
  std::set<uint64_t> demoted(plan.demote.begin(), plan.demote.end());
  EXPECT_EQ(demoted.size(), 1000u);
  for (uint64_t row : demoted) EXPECT_NE(r.SlotOf(row), kernels::kNoSlot) << row << " was not resident";
  r.Apply(plan);
  for (uint64_t row = 1000000; row < 1001000; ++row) ASSERT_NE(r.SlotOf(row), kernels::kNoSlot) << row;
  for (uint64_t row : demoted) EXPECT_EQ(r.SlotOf(row), kernels::kNoSlot) << row;
  EXPECT_EQ(r.SlotOf(2000000), kernels::kNoSlot);
  EXPECT_EQ(r.resident(), kSlots);
  EXPECT_TRUE(r.NextPlan(5000).promote.empty()) << "nothing left hotter than the residents";
}

}  // namespace
}  // namespace engram
