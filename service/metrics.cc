#include "service/metrics.h"

#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace engram {
namespace {

void AtomicAddDouble(std::atomic<uint64_t>& bits, double v) {
  uint64_t old = bits.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t updated = std::bit_cast<uint64_t>(std::bit_cast<double>(old) + v);
    if (bits.compare_exchange_weak(old, updated, std::memory_order_relaxed)) return;
  }
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v == std::floor(v) && std::fabs(v) < 1e15) return absl::StrCat(static_cast<int64_t>(v));
  char buf[32];
  const auto result = std::to_chars(buf, buf + sizeof(buf), v);  // shortest round-trip form
  return std::string(buf, result.ptr);
}

std::string EscapeLabel(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string EscapeHelp(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out.push_back(c);
    }
  }
  return out;
}

std::string Labels(const std::vector<std::string>& names, const std::vector<std::string>& values,
                   const std::string& extra_name = "", const std::string& extra_value = "") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    absl::StrAppend(&out, out.empty() ? "" : ",", names[i], "=\"", EscapeLabel(values[i]), "\"");
  }
  if (!extra_name.empty()) absl::StrAppend(&out, out.empty() ? "" : ",", extra_name, "=\"", extra_value, "\"");
  return out.empty() ? "" : "{" + out + "}";
}

}  // namespace

void Counter::Add(double v) { AtomicAddDouble(bits_, v); }
double Counter::value() const { return std::bit_cast<double>(bits_.load(std::memory_order_relaxed)); }

void Gauge::Set(double v) { bits_.store(std::bit_cast<uint64_t>(v), std::memory_order_relaxed); }
void Gauge::Add(double v) { AtomicAddDouble(bits_, v); }
double Gauge::value() const { return std::bit_cast<double>(bits_.load(std::memory_order_relaxed)); }

Histogram::Histogram(const std::vector<double>* bounds)
    : bounds_(bounds), buckets_(new std::atomic<uint64_t>[bounds->size() + 1]) {
  for (size_t i = 0; i <= bounds_->size(); ++i) buckets_[i].store(0);
}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_->size() && v > (*bounds_)[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.Add(v);
}

std::vector<uint64_t> Histogram::CumulativeCounts() const {
  std::vector<uint64_t> out(bounds_->size() + 1);
  uint64_t running = 0;
  for (size_t i = 0; i <= bounds_->size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    out[i] = running;
  }
  return out;
}

double Histogram::sum() const { return sum_.value(); }

const std::vector<double>& MetricsRegistry::LatencyBucketsSeconds() {
  static const std::vector<double> kBounds = {5e-6, 1e-5,   2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                                              1e-2, 2.5e-2, 5e-2,   0.1,  0.25, 0.5,    1,    2.5,  5,      10};
  return kBounds;
}

MetricsRegistry::Series* MetricsRegistry::GetSeries(const std::string& name, const std::string& help, Type type,
                                                    const std::vector<std::string>& label_names,
                                                    const std::vector<std::string>& label_values,
                                                    const std::vector<double>* bounds) {
  std::lock_guard<std::mutex> lock(mu_);
  Family* family = nullptr;
  for (auto& f : families_) {
    if (f->name == name) family = f.get();
  }
  if (family == nullptr) {
    families_.push_back(std::make_unique<Family>());
    family = families_.back().get();
    family->name = name;
    family->help = help;
    family->type = type;
    family->label_names = label_names;
    if (bounds != nullptr) family->bounds = *bounds;
  }
  if (family->type != type || family->label_names != label_names || label_values.size() != label_names.size()) {
    std::fprintf(stderr, "metrics: family %s used with another type or label set\n", name.c_str());
    std::abort();  // a programming error, caught by any test that touches the metric
  }
  auto [it, inserted] = family->series.try_emplace(label_values);
  Series& series = it->second;
  if (inserted) {
    series.label_values = label_values;
    switch (type) {
      case Type::kCounter:
        series.counter = std::make_unique<Counter>();
        break;
      case Type::kGauge:
        series.gauge = std::make_unique<Gauge>();
        break;
      case Type::kHistogram:
        series.histogram = std::make_unique<Histogram>(&family->bounds);
        break;
    }
  }
  return &series;
}

Counter* MetricsRegistry::GetCounter(const std::string& name, const std::string& help,
                                     const std::vector<std::string>& label_names,
                                     const std::vector<std::string>& label_values) {
  return GetSeries(name, help, Type::kCounter, label_names, label_values, nullptr)->counter.get();
}

Gauge* MetricsRegistry::GetGauge(const std::string& name, const std::string& help,
                                 const std::vector<std::string>& label_names,
                                 const std::vector<std::string>& label_values) {
  return GetSeries(name, help, Type::kGauge, label_names, label_values, nullptr)->gauge.get();
}

Histogram* MetricsRegistry::GetHistogram(const std::string& name, const std::string& help,
                                         const std::vector<std::string>& label_names,
                                         const std::vector<std::string>& label_values,
                                         const std::vector<double>& bounds) {
  return GetSeries(name, help, Type::kHistogram, label_names, label_values, &bounds)->histogram.get();
}

std::string MetricsRegistry::Render() const {
  // The lock is held only to list the series (families and series are never removed and their
  // names never change, so the pointers stay good); values are read and formatted without it,
  // so a scrape never keeps a request that creates a series waiting for the whole rendering.
  std::vector<std::pair<const Family*, std::vector<const Series*>>> snapshot;
  {
    std::lock_guard<std::mutex> lock(mu_);
    snapshot.reserve(families_.size());
    for (const auto& f : families_) {
      std::vector<const Series*> series;
      series.reserve(f->series.size());
      for (const auto& [values, s] : f->series) series.push_back(&s);
      snapshot.emplace_back(f.get(), std::move(series));
    }
  }
  std::string out;
  for (const auto& [f, series] : snapshot) {
    const char* type = f->type == Type::kCounter ? "counter" : f->type == Type::kGauge ? "gauge" : "histogram";
    absl::StrAppend(&out, "# HELP ", f->name, " ", EscapeHelp(f->help), "\n# TYPE ", f->name, " ", type, "\n");
    for (const Series* sp : series) {
      const Series& s = *sp;
      const std::vector<std::string>& values = s.label_values;
      if (s.counter) {
        absl::StrAppend(&out, f->name, Labels(f->label_names, values), " ", FormatValue(s.counter->value()), "\n");
      } else if (s.gauge) {
        absl::StrAppend(&out, f->name, Labels(f->label_names, values), " ", FormatValue(s.gauge->value()), "\n");
      } else {
        const std::vector<uint64_t> counts = s.histogram->CumulativeCounts();
        for (size_t i = 0; i < f->bounds.size(); ++i) {
          absl::StrAppend(&out, f->name, "_bucket", Labels(f->label_names, values, "le", FormatValue(f->bounds[i])),
                          " ", counts[i], "\n");
        }
        absl::StrAppend(&out, f->name, "_bucket", Labels(f->label_names, values, "le", "+Inf"), " ", counts.back(),
                        "\n");
        absl::StrAppend(&out, f->name, "_sum", Labels(f->label_names, values), " ", FormatValue(s.histogram->sum()),
                        "\n");
        absl::StrAppend(&out, f->name, "_count", Labels(f->label_names, values), " ", counts.back(), "\n");
      }
    }
  }
  return out;
}

}  // namespace engram
