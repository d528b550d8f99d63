#include "tiering/cache/policy.h"

#include "absl/strings/str_cat.h"

namespace engram {

absl::StatusOr<PolicySpec> ParsePolicy(absl::string_view name) {
  PolicySpec spec;
  spec.name = std::string(name);
  if (name == "lru") {
    spec.eviction = PolicySpec::Eviction::kLru;
  } else if (name == "s3fifo") {
    spec.eviction = PolicySpec::Eviction::kS3Fifo;
  } else if (name == "tinylfu") {
    spec.eviction = PolicySpec::Eviction::kS3Fifo;
    spec.tinylfu_admission = true;
  } else if (name == "static-topk") {
    spec.eviction = PolicySpec::Eviction::kPinned;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown cache policy '", name, "' (known: lru, s3fifo, tinylfu, static-topk)"));
  }
  return spec;
}

std::unique_ptr<EvictionPolicy> MakeEviction(const PolicySpec& spec, uint32_t capacity) {
  switch (spec.eviction) {
    case PolicySpec::Eviction::kLru: return MakeLruPolicy(capacity);
    case PolicySpec::Eviction::kS3Fifo: return MakeS3FifoPolicy(capacity);
    case PolicySpec::Eviction::kPinned: return MakePinnedPolicy(capacity);
  }
  return nullptr;
}

}  // namespace engram
