#include "bench/simulate.h"

#include <algorithm>
#include <limits>
#include <set>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/numbers.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engram/kernels/hbm_probe.h"
#include "service/cli_flags.h"
#include "tiering/cache/row_cache.h"
#include "tiering/hbm/hbm_residency.h"
#include "tiering/hbm/hbm_sampler.h"
#include "tiering/hbm/hbm_tier.h"
#include "tiering/hot_set.h"

namespace engram {
namespace {

constexpr uint32_t kNever = std::numeric_limits<uint32_t>::max();

// A replay's hits: all of them, and those of the accesses from `last_from` on (the last pass).
struct Hits {
  uint64_t all = 0, last = 0;
  void Add(size_t i, size_t last_from) {
    ++all;
    last += i >= last_from ? 1 : 0;
  }
};

// Hits of a static cache holding the `capacity` most frequent keys of the stream.
uint64_t StaticTopKHits(const std::vector<uint64_t>& stream, uint64_t capacity) {
  absl::flat_hash_map<uint64_t, uint32_t> counts;
  for (uint64_t k : stream) ++counts[k];
  std::vector<uint32_t> freq;
  freq.reserve(counts.size());
  for (const auto& [k, c] : counts) freq.push_back(c);
  const size_t keep = std::min<size_t>(capacity, freq.size());
  std::partial_sort(freq.begin(), freq.begin() + keep, freq.end(), std::greater<>());
  uint64_t hits = 0;
  for (size_t i = 0; i < keep; ++i) hits += freq[i];
  return hits;
}

// Belady's optimal replacement with bypass: on a miss, the row is cached only if it is used again
// sooner than the cached row used furthest in the future (which it then replaces).
Hits BeladyHits(const std::vector<uint64_t>& stream, uint64_t capacity, size_t last_from) {
  const size_t n = stream.size();
  std::vector<uint32_t> next_use(n, kNever);
  absl::flat_hash_map<uint64_t, uint32_t> last_seen;
  for (size_t i = n; i-- > 0;) {
    auto [it, inserted] = last_seen.try_emplace(stream[i], static_cast<uint32_t>(i));
    if (!inserted) {
      next_use[i] = it->second;
      it->second = static_cast<uint32_t>(i);
    }
  }
  std::set<std::pair<uint32_t, uint64_t>> by_next;  // (next use, key)
  absl::flat_hash_map<uint64_t, uint32_t> cached;   // key -> its next use
  Hits hits;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t key = stream[i];
    auto it = cached.find(key);
    if (it != cached.end()) {
      hits.Add(i, last_from);
      by_next.erase({it->second, key});
      if (next_use[i] == kNever) {
        cached.erase(it);
      } else {
        it->second = next_use[i];
        by_next.insert({next_use[i], key});
      }
      continue;
    }
    if (next_use[i] == kNever) continue;  // never reused: bypass
    if (cached.size() >= capacity) {
      const auto furthest = std::prev(by_next.end());
      if (furthest->first <= next_use[i]) continue;
      cached.erase(furthest->second);
      by_next.erase(furthest);
    }
    cached.emplace(key, next_use[i]);
    by_next.insert({next_use[i], key});
  }
  return hits;
}

// Fills `cache` from a profile's rows, hottest first, as the daemon warms from a hot set.
void WarmFrom(const LayerHotSet* hot, RowCache& cache) {
  if (hot == nullptr) return;
  for (const auto& [row, count] : hot->rows) cache.Warm(row, nullptr, count);
}

// Demand-fills the daemon's RowCache (keys only) with `policy` over the stream and returns its
// hits. With `oracle_admission`, a hindsight filter in front: a miss whose row is never used
// again is not inserted (what perfect admission alone would be worth).
absl::StatusOr<Hits> RowCacheHits(const std::vector<uint64_t>& stream, absl::string_view policy, uint64_t capacity,
                                  int shards, const LayerHotSet* warm, bool oracle_admission, size_t last_from) {
  auto spec = ParsePolicy(policy);
  if (!spec.ok()) return spec.status();
  auto cache = RowCache::Create(capacity, /*row_bytes=*/0, *spec, shards);
  if (!cache.ok()) return cache.status();
  if (spec->eviction != PolicySpec::Eviction::kPinned) WarmFrom(warm, **cache);
  absl::flat_hash_map<uint64_t, uint32_t> remaining;  // uses still ahead, for the filter
  if (oracle_admission) {
    for (uint64_t k : stream) ++remaining[k];
  }
  Hits hits;
  for (size_t i = 0; i < stream.size(); ++i) {
    const uint64_t key = stream[i];
    const bool again = !oracle_admission || --remaining[key] > 0;
    if ((*cache)->Lookup(key, nullptr)) {
      hits.Add(i, last_from);
    } else if (again) {
      (*cache)->Insert(key, nullptr);
    }
  }
  return hits;
}

// A 64-bit identity of the n-gram of `order` ending at position t of a sequence (left positions
// before the start padded, as the hash pads them).
uint64_t NgramIdentity(const int64_t* seq, size_t t, int order, int64_t pad) {
  uint64_t h = static_cast<uint64_t>(order);
  for (int k = 0; k < order; ++k) {
    const int64_t id = t >= static_cast<size_t>(k) ? seq[t - k] : pad;
    h = kernels::HbmMix64(h ^ (static_cast<uint64_t>(id) + 0x9E3779B97F4A7C15ULL * (k + 1)));
  }
  return h;
}

void AddReuseBreakdown(const std::vector<int64_t>& compressed, uint32_t seq_len, int heads_per_ngram,
                       int max_ngram, int64_t pad, const std::vector<uint64_t>& stream,
                       std::vector<ReuseBreakdown>* out) {
  const int heads = (max_ngram - 1) * heads_per_ngram;
  if (out->empty()) {
    for (int n = 2; n <= max_ngram; ++n) out->push_back({.order = n});
  }
  struct Last {
    uint64_t ngram;
    uint32_t sequence;
    uint32_t uses;
  };
  absl::flat_hash_map<uint64_t, Last> last;
  uint64_t ngram = 0;
  for (size_t i = 0; i < stream.size(); ++i) {
    const size_t token = i / heads;
    const int order = 2 + static_cast<int>(i % heads) / heads_per_ngram;
    if (i % heads_per_ngram == 0) {  // the order's first head: the heads of one order share an n-gram
      const size_t start = token / seq_len * seq_len;
      ngram = NgramIdentity(compressed.data() + start, token - start, order, pad);
    }
    const auto sequence = static_cast<uint32_t>(token / seq_len);
    ReuseBreakdown& r = (*out)[order - 2];
    ++r.accesses;
    auto [it, first] = last.try_emplace(stream[i], Last{ngram, sequence, 0});
    if (!first) {
      ++r.reuses;
      const bool other = it->second.ngram != ngram;
      r.in_sequence += it->second.sequence == sequence;
      r.other_ngram += other;
      if (it->second.uses == 1) {
        ++r.first_reuses;
        r.first_other_ngram += other;
      }
      it->second.ngram = ngram;
      it->second.sequence = sequence;
    }
    ++it->second.uses;
  }
}

// The HBM tier's residency planning (HbmResidency, the daemon's code, with HbmTierOptions'
// decay): accesses counted as they come, and every kHbmPlanEvery accesses (one request) one
// batched plan of at most kHbmMovesPerPlan promotions applied, as the promoter would between
// steps. A hit is an access that does not cross PCIe: its row was resident then, or the same
// request already brings it over (the device path reads each distinct row it lacks once per
// request: MappedTable::SplitForDevice and SplitForDeviceDirect).
constexpr uint64_t kHbmPlanEvery = 16 * 4096;  // one 4096-token request of one layer
constexpr size_t kHbmMovesPerPlan = 16 * 4096;

// `sample_every` > 1 counts about one access in that many (HbmSampler, each sample weighing
// `sample_every`), as engramd does when its load exceeds the promoter's sample budget; 1 counts
// every access, as it does below that.
Hits HbmPlannerHits(const std::vector<uint64_t>& stream, uint64_t capacity, uint32_t sample_every, size_t last_from) {
  if (capacity == 0) return {};
  HbmResidency residency(static_cast<uint32_t>(std::min<uint64_t>(capacity, UINT32_MAX)),
                         HbmTierOptions{}.decay_every);
  HbmSampler sampler(sample_every);  // the engine's and the clients' sampling
  Hits hits;
  absl::flat_hash_set<uint64_t> crossing;  // rows this request brings over PCIe
  for (size_t i = 0; i < stream.size(); ++i) {
    if (residency.SlotOf(stream[i]) != kernels::kNoSlot || !crossing.insert(stream[i]).second) hits.Add(i, last_from);
    sampler.ForEach(1, [&](size_t) { residency.RecordAccess(stream[i], sample_every); });
    if ((i + 1) % kHbmPlanEvery == 0) {
      residency.Apply(residency.NextPlan(kHbmMovesPerPlan));
      crossing.clear();
    }
  }
  return hits;
}

// What a --policy name runs: the daemon's RowCache with that policy, a hindsight reference, or
// the HBM planner counting one access in `sample_every`.
struct SimulatedPolicy {
  enum class Kind { kRowCache, kOracleAdmission, kStaticTopK, kBelady, kHbm } kind;
  uint32_t sample_every = 1;
};

absl::StatusOr<SimulatedPolicy> ResolvePolicy(const std::string& name) {
  using Kind = SimulatedPolicy::Kind;
  if (name == "belady") return SimulatedPolicy{Kind::kBelady};
  if (name == "oracle-admission") return SimulatedPolicy{Kind::kOracleAdmission};
  if (name == "static-topk") return SimulatedPolicy{Kind::kStaticTopK};
  if (name == "hbm") return SimulatedPolicy{Kind::kHbm};
  if (absl::StartsWith(name, "hbm-1in")) {
    uint32_t every = 0;
    if (!absl::SimpleAtoi(name.substr(7), &every) || every == 0 || every > 1024) {
      return absl::InvalidArgumentError(
          absl::StrCat("policy '", name, "': hbm-1inN wants N in 1..1024 (one access counted in N)"));
    }
    return SimulatedPolicy{Kind::kHbm, every};
  }
  if (ParsePolicy(name).ok()) return SimulatedPolicy{Kind::kRowCache};
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown policy '", name,
      "' (known: lru, s3fifo, tinylfu, static-topk, hbm, hbm-1inN, oracle-admission, belady, all; "
      "give --policy once per policy)"));
}

}  // namespace

absl::StatusOr<uint64_t> CapacityRows(const std::string& capacity, uint64_t layer_rows, uint64_t table_rows,
                                      int64_t row_bytes) {
  if (absl::EndsWith(capacity, "%")) {
    double percent = 0;
    if (!absl::SimpleAtod(capacity.substr(0, capacity.size() - 1), &percent) || percent <= 0 || percent > 100) {
      return absl::InvalidArgumentError(absl::StrCat("--capacity '", capacity, "': a percentage in (0, 100]"));
    }
    return std::max<uint64_t>(1, static_cast<uint64_t>(static_cast<double>(layer_rows) * percent / 100.0));
  }
  uint64_t bytes = 0;
  if (absl::Status s = ParseBytes(capacity, &bytes); !s.ok()) return s;
  const double share = static_cast<double>(layer_rows) / static_cast<double>(table_rows);
  return std::max<uint64_t>(1, static_cast<uint64_t>(static_cast<double>(bytes) * share / row_bytes));
}

absl::StatusOr<SimulationReport> SimulateCache(const PackManifest& manifest, const std::vector<int32_t>& tokens,
                                               const SimulationOptions& options) {
  std::vector<LayerHashLayout> layouts;
  for (const auto& l : manifest.layers) layouts.push_back(l.layout);
  auto hasher = NgramHasher::Create(manifest.hash, layouts);
  if (!hasher.ok()) return hasher.status();
  SimulationReport report;
  for (const auto& l : manifest.layers) report.table_rows += l.layout.total_rows;
  std::vector<SimulatedPolicy> resolved;  // checked before any work
  for (const std::string& name : options.policies) {
    auto policy = ResolvePolicy(name);
    if (!policy.ok()) return policy.status();
    resolved.push_back(*policy);
    report.results.push_back({name});
  }

  std::vector<int64_t> compressed(tokens.size());
  if (absl::Status s = (*hasher)->Compress(tokens, absl::MakeSpan(compressed)); !s.ok()) return s;
  HotSet warm;
  if (!options.warm_tokens.empty()) {
    auto profiled = ProfileTokens(manifest, options.warm_tokens, std::max<uint32_t>(1, options.seq_len), 1.0);
    if (!profiled.ok()) return profiled.status();
    warm = std::move(*profiled);
  }
  if (options.replays < 1 || options.replays > 64) {
    return absl::InvalidArgumentError(absl::StrCat("--replays ", options.replays, ": 1..64"));
  }
  for (size_t li = 0; li < manifest.layers.size(); ++li) {
    const LayerHashLayout& layout = manifest.layers[li].layout;
    const LayerHotSet* warm_layer = options.warm_tokens.empty() ? nullptr : warm.FindLayer(manifest.layers[li].id);
    std::vector<uint64_t> stream = (*hasher)->TraceRows(compressed, options.seq_len, static_cast<int>(li));
    if (options.reuse_breakdown) {
      AddReuseBreakdown(compressed, std::max<uint32_t>(1, options.seq_len), manifest.hash.heads_per_ngram,
                        manifest.hash.max_ngram, (*hasher)->compressed_pad(), stream, &report.reuse);
    }
    size_t last_from = stream.size();  // where the last pass starts (none when played once)
    if (options.replays > 1) {
      const size_t once = stream.size();
      last_from = once * (options.replays - 1);
      stream.resize(once * options.replays);
      for (int r = 1; r < options.replays; ++r) std::copy_n(stream.begin(), once, stream.begin() + r * once);
    }
    auto capacity = CapacityRows(options.capacity, layout.total_rows, report.table_rows, manifest.row.bytes);
    if (!capacity.ok()) return capacity.status();
    report.capacity_rows += *capacity;
    report.accesses += stream.size();
    for (size_t p = 0; p < report.results.size(); ++p) {
      PolicyResult& result = report.results[p];
      result.accesses += stream.size();
      Hits hits;
      switch (resolved[p].kind) {
        case SimulatedPolicy::Kind::kBelady:
          if (stream.size() >= kNever) {  // it numbers accesses in 32 bits
            return absl::InvalidArgumentError(absl::StrCat("belady: ", stream.size(),
                                                           " accesses in a layer is too many (at most 4,294,967,294); "
                                                           "fewer --replays or a shorter trace"));
          }
          hits = BeladyHits(stream, *capacity, last_from);
          break;
        case SimulatedPolicy::Kind::kStaticTopK:
          hits.all = StaticTopKHits(stream, *capacity);
          break;
        case SimulatedPolicy::Kind::kHbm:
          hits = HbmPlannerHits(stream, *capacity, resolved[p].sample_every, last_from);
          break;
        case SimulatedPolicy::Kind::kOracleAdmission:
        case SimulatedPolicy::Kind::kRowCache: {
          const bool oracle = resolved[p].kind == SimulatedPolicy::Kind::kOracleAdmission;
          auto got = RowCacheHits(stream, oracle ? kDefaultPolicy : absl::string_view(result.policy), *capacity,
                                  options.shards, warm_layer, oracle, last_from);
          if (!got.ok()) return got.status();
          hits = *got;
          break;
        }
      }
      result.hits += hits.all;
      // static-topk has no order, so no last pass
      if (resolved[p].kind != SimulatedPolicy::Kind::kStaticTopK && options.replays > 1) {
        result.last_pass_hits += hits.last;
        result.last_pass_accesses += stream.size() - last_from;
      }
    }
  }
  return report;
}

}  // namespace engram
