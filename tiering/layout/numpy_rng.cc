#include "tiering/layout/numpy_rng.h"

#include "absl/strings/str_cat.h"

namespace engram {
namespace {

constexpr uint32_t kInitA = 0x43b0d7e5;
constexpr uint32_t kMultA = 0x931e8875;
constexpr uint32_t kInitB = 0x8b51f9dd;
constexpr uint32_t kMultB = 0x58f38ded;
constexpr uint32_t kMixMultL = 0xca01f9dd;
constexpr uint32_t kMixMultR = 0x4973f715;
constexpr int kXShift = 16;
constexpr int kPoolSize = 4;

// hashmix with a running constant that persists across calls of one seeding.
struct HashMixer {
  uint32_t hash_const = kInitA;
  uint32_t operator()(uint32_t value) {
    value ^= hash_const;
    hash_const *= kMultA;
    value *= hash_const;
    value ^= value >> kXShift;
    return value;
  }
};

uint32_t Mix(uint32_t x, uint32_t y) {
  uint32_t result = kMixMultL * x - kMixMultR * y;
  result ^= result >> kXShift;
  return result;
}

}  // namespace

std::vector<uint32_t> SeedSequenceState(unsigned __int128 entropy, int num_words) {
  std::vector<uint32_t> words;
  do {
    words.push_back(static_cast<uint32_t>(entropy));
    entropy >>= 32;
  } while (entropy != 0);

  HashMixer hashmix;
  std::array<uint32_t, kPoolSize> pool{};
  for (int i = 0; i < kPoolSize; ++i) {
    pool[i] = hashmix(i < static_cast<int>(words.size()) ? words[i] : 0);
  }
  for (int src = 0; src < kPoolSize; ++src) {
    for (int dst = 0; dst < kPoolSize; ++dst) {
      if (src != dst) pool[dst] = Mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (size_t src = kPoolSize; src < words.size(); ++src) {
    for (int dst = 0; dst < kPoolSize; ++dst) pool[dst] = Mix(pool[dst], hashmix(words[src]));
  }

  std::vector<uint32_t> state(num_words);
  uint32_t hash_const = kInitB;
  for (int i = 0; i < num_words; ++i) {
    uint32_t value = pool[i % kPoolSize];
    value ^= hash_const;
    hash_const *= kMultB;
    value *= hash_const;
    value ^= value >> kXShift;
    state[i] = value;
  }
  return state;
}

Pcg64::Pcg64(unsigned __int128 initstate, unsigned __int128 initseq) {
  inc_ = (initseq << 1) | 1;
  state_ = 0;
  Step();
  state_ += initstate;
  Step();
}

Pcg64 Pcg64::FromEntropy(unsigned __int128 entropy) {
  const std::vector<uint32_t> w = SeedSequenceState(entropy, 8);
  uint64_t u[4];
  for (int i = 0; i < 4; ++i) u[i] = uint64_t{w[2 * i]} | (uint64_t{w[2 * i + 1]} << 32);
  const unsigned __int128 initstate = (static_cast<unsigned __int128>(u[0]) << 64) | u[1];
  const unsigned __int128 initseq = (static_cast<unsigned __int128>(u[2]) << 64) | u[3];
  return Pcg64(initstate, initseq);
}

void Pcg64::Step() {
  constexpr unsigned __int128 kMultiplier =
      (static_cast<unsigned __int128>(2549297995355413924ULL) << 64) | 4865540595714422341ULL;
  state_ = state_ * kMultiplier + inc_;
}

uint64_t Pcg64::Next64() {
  Step();
  const uint64_t x = static_cast<uint64_t>(state_ >> 64) ^ static_cast<uint64_t>(state_);
  const unsigned rot = static_cast<unsigned>(state_ >> 122);
  return (x >> rot) | (x << ((64 - rot) & 63));
}

uint64_t Pcg64::BoundedBelow(uint64_t high) {
  unsigned __int128 m = static_cast<unsigned __int128>(Next64()) * high;
  uint64_t left = static_cast<uint64_t>(m);
  if (left < high) {
    const uint64_t threshold = (0 - high) % high;  // (2^64 - high) mod high
    while (left < threshold) {
      m = static_cast<unsigned __int128>(Next64()) * high;
      left = static_cast<uint64_t>(m);
    }
  }
  return static_cast<uint64_t>(m >> 64);
}

absl::StatusOr<std::vector<uint64_t>> NumpyIntegers(uint64_t seed, uint64_t high, int count) {
  if (high < 2 || high - 1 <= 0xFFFFFFFFULL) {
    return absl::InvalidArgumentError(absl::StrCat(
        "multiplier range ", high,
        " is too small: numpy would draw it on its 32-bit path, which engram-v1 hashing does not "
        "support (compressed_vocab must be below 2^30)"));
  }
  Pcg64 rng = Pcg64::FromEntropy(seed);
  std::vector<uint64_t> out(count);
  for (auto& v : out) v = rng.BoundedBelow(high);
  return out;
}

}  // namespace engram
