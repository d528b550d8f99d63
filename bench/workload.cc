#include "bench/workload.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/match.h"
#include "tiering/layout/manifest.h"

namespace engram {

ZipfSampler::ZipfSampler(uint64_t n, double alpha) : n_(n), alpha_(alpha) {
  h_integral_x1_ = H(1.5) - 1.0;
  h_integral_n_ = H(static_cast<double>(n_) + 0.5);
  s_ = 2.0 - HInverse(H(2.5) - h(2.0));
}

double ZipfSampler::h(double x) const { return std::exp(-alpha_ * std::log(x)); }

// H(x) = integral of t^-alpha: (x^(1-alpha) - 1) / (1 - alpha), log(x) at alpha = 1.
double ZipfSampler::H(double x) const {
  const double log_x = std::log(x);
  const double t = (1.0 - alpha_) * log_x;
  return std::fabs(t) > 1e-8 ? std::expm1(t) / (1.0 - alpha_) : log_x * (1.0 + t / 2.0);
}

double ZipfSampler::HInverse(double x) const {
  double t = x * (1.0 - alpha_);
  if (t < -1.0) t = -1.0;
  const double l = std::fabs(t) > 1e-8 ? std::log1p(t) / (1.0 - alpha_) : x * (1.0 - t / 2.0);
  return std::exp(l);
}

uint64_t ZipfSampler::Sample(std::mt19937_64& rng) const {
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (;;) {
    const double u = h_integral_n_ + unit(rng) * (h_integral_x1_ - h_integral_n_);
    const double x = HInverse(u);
    double k = std::floor(x + 0.5);
    if (k < 1) k = 1;
    if (k > static_cast<double>(n_)) k = static_cast<double>(n_);
    if (k - x <= s_ || u >= H(k + 0.5) - h(k)) return static_cast<uint64_t>(k);
  }
}

absl::StatusOr<WorkloadSpec> ParseWorkload(const std::string& text) {
  WorkloadSpec spec;
  spec.text = text;
  if (absl::StartsWith(text, "zipf:")) {
    if (!absl::SimpleAtod(text.substr(5), &spec.alpha) || spec.alpha < 0 || spec.alpha > 10) {
      return absl::InvalidArgumentError(absl::StrCat("--workload '", text, "': zipf:ALPHA needs ALPHA in [0, 10]"));
    }
    return spec;
  }
  if (absl::StartsWith(text, "trace:") && text.size() > 6) {
    spec.is_trace = true;
    spec.trace_path = text.substr(6);
    return spec;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--workload '", text, "' is neither zipf:ALPHA nor trace:FILE.i32"));
}

absl::StatusOr<std::vector<Batch>> MakeBatches(const WorkloadSpec& spec, const NgramHasher& hasher,
                                               uint32_t batch_tokens, int max_batches, uint64_t seed) {
  const auto& layers = hasher.layers();
  const int heads = hasher.heads_per_layer();
  std::vector<Batch> batches;
  std::mt19937_64 rng(seed);
  if (!spec.is_trace) {
    // One sampler per head; rank r maps to row (r * a + b) mod p, a bijection since p is prime,
    // so the hot rows are scattered over the head like hashed n-grams are.
    for (int i = 0; i < max_batches; ++i) {
      const LayerHashLayout& layer = layers[i % layers.size()];
      Batch batch{layer.layer_id, batch_tokens, std::vector<uint32_t>(static_cast<size_t>(batch_tokens) * heads)};
      for (int h = 0; h < heads; ++h) {
        const uint64_t p = static_cast<uint64_t>(layer.head_rows[h]);
        const uint64_t a = 1 + (0x9E3779B97F4A7C15ULL * (h + 1) + layer.layer_id) % (p - 1);
        const uint64_t b = (0xBF58476D1CE4E5B9ULL * (h + 7)) % p;
        if (spec.alpha == 0) {
          std::uniform_int_distribution<uint64_t> uniform(0, p - 1);
          for (uint32_t t = 0; t < batch_tokens; ++t) batch.indices[static_cast<size_t>(t) * heads + h] = static_cast<uint32_t>(uniform(rng));
        } else {
          ZipfSampler zipf(p, spec.alpha);
          for (uint32_t t = 0; t < batch_tokens; ++t) {
            const uint64_t rank = zipf.Sample(rng) - 1;
            batch.indices[static_cast<size_t>(t) * heads + h] =
                static_cast<uint32_t>((static_cast<unsigned __int128>(rank) * a + b) % p);
          }
        }
      }
      batches.push_back(std::move(batch));
    }
    return batches;
  }
  auto tokens = ReadInt32File(spec.trace_path);
  if (!tokens.ok()) return tokens.status();
  const size_t windows = tokens->size() / batch_tokens;
  if (windows == 0) {
    return absl::InvalidArgumentError(absl::StrCat(spec.trace_path, " has ", tokens->size(),
                                                   " tokens, fewer than one batch of ", batch_tokens));
  }
  std::vector<int64_t> compressed(batch_tokens);
  std::vector<int64_t> local(static_cast<size_t>(batch_tokens) * heads);
  for (int i = 0; i < max_batches && static_cast<size_t>(i) < windows * layers.size(); ++i) {
    // Each window of the trace is one sequence; every layer of it becomes one batch.
    const size_t window = static_cast<size_t>(i) / layers.size();
    const int layer_index = i % static_cast<int>(layers.size());
    absl::Span<const int32_t> raw(tokens->data() + window * batch_tokens, batch_tokens);
    if (absl::Status s = hasher.Compress(raw, absl::MakeSpan(compressed)); !s.ok()) return s;
    hasher.HashCompressed(compressed, 1, static_cast<int>(batch_tokens), layer_index, absl::MakeSpan(local));
    batches.push_back(Batch{layers[layer_index].layer_id, batch_tokens,
                            std::vector<uint32_t>(local.begin(), local.end())});
  }
  return batches;
}

}  // namespace engram
