// A small Prometheus registry and text exposition (format 0.0.4). Families are counters, gauges
// or histograms with fixed label names; each labelled series is created on first use and lives
// as long as the registry, so hot paths may keep the returned pointer. Thread-safe: series
// updates are atomic; creating a series takes a mutex, which rendering holds only to list the
// series (not while it formats them). Hot paths resolve their series once and never lock.
#ifndef ENGRAM_SERVICE_METRICS_H_
#define ENGRAM_SERVICE_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"

namespace engram {

class Counter {
 public:
  void Add(double v = 1.0);
  double value() const;

 private:
  std::atomic<uint64_t> bits_{0};  // a double, updated by compare-exchange
};

class Gauge {
 public:
  void Set(double v);
  void Add(double v);
  double value() const;

 private:
  std::atomic<uint64_t> bits_{0};
};

class Histogram {
 public:
  explicit Histogram(const std::vector<double>* bounds);
  void Observe(double v);
  // Cumulative counts per bound, then the +Inf count.
  std::vector<uint64_t> CumulativeCounts() const;
  double sum() const;

 private:
  const std::vector<double>* bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // one per bound, plus +Inf
  Counter sum_;
};

class MetricsRegistry {
 public:
  enum class Type { kCounter, kGauge, kHistogram };

  // Label values must be given in the order of the family's label names.
  Counter* GetCounter(const std::string& name, const std::string& help, const std::vector<std::string>& label_names,
                      const std::vector<std::string>& label_values);
  Gauge* GetGauge(const std::string& name, const std::string& help, const std::vector<std::string>& label_names,
                  const std::vector<std::string>& label_values);
  Histogram* GetHistogram(const std::string& name, const std::string& help, const std::vector<std::string>& label_names,
                          const std::vector<std::string>& label_values, const std::vector<double>& bounds);

  // The whole exposition, families in registration order.
  std::string Render() const;

  // Latency buckets in seconds, from 5 microseconds to 10 seconds.
  static const std::vector<double>& LatencyBucketsSeconds();

 private:
  struct Series {
    std::vector<std::string> label_values;
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
  };
  struct Family {
    std::string name, help;
    Type type;
    std::vector<std::string> label_names;
    std::vector<double> bounds;
    std::map<std::vector<std::string>, Series> series;
  };
  Series* GetSeries(const std::string& name, const std::string& help, Type type,
                    const std::vector<std::string>& label_names, const std::vector<std::string>& label_values,
                    const std::vector<double>* bounds);

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_ ABSL_GUARDED_BY(mu_);
};

}  // namespace engram

#endif  // ENGRAM_SERVICE_METRICS_H_
