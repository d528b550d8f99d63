// The text exposition: what Prometheus parses (promtool checks the live endpoint in the
// integration tests; these pin the format details).
#include "service/metrics.h"

#include "gtest/gtest.h"

namespace engram {
namespace {

TEST(MetricsTest, CountersGaugesAndEscaping) {
  MetricsRegistry r;
  r.GetCounter("x_requests_total", "Requests", {"method"}, {"Lookup"})->Add(3);
  r.GetCounter("x_requests_total", "Requests", {"method"}, {"Lookup"})->Add();
  r.GetGauge("x_ready", "Ready", {}, {})->Set(1);
  r.GetGauge("x_label", "Odd label", {"v"}, {"a\"b\\c\nd"})->Set(0.5);
  const std::string text = r.Render();
  EXPECT_NE(text.find("# HELP x_requests_total Requests\n# TYPE x_requests_total counter\n"
                      "x_requests_total{method=\"Lookup\"} 4\n"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("x_ready 1\n"), std::string::npos);
  EXPECT_NE(text.find("x_label{v=\"a\\\"b\\\\c\\nd\"} 0.5\n"), std::string::npos) << text;
}

TEST(MetricsTest, HistogramBucketsAreCumulative) {
  MetricsRegistry r;
  Histogram* h = r.GetHistogram("x_seconds", "Latency", {"m"}, {"a"}, {0.1, 1});
  h->Observe(0.05);
  h->Observe(0.5);
  h->Observe(0.5);
  h->Observe(7);
  const std::string text = r.Render();
  EXPECT_NE(text.find("x_seconds_bucket{m=\"a\",le=\"0.1\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{m=\"a\",le=\"1\"} 3\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_bucket{m=\"a\",le=\"+Inf\"} 4\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_sum{m=\"a\"} 8.05\n"), std::string::npos) << text;
  EXPECT_NE(text.find("x_seconds_count{m=\"a\"} 4\n"), std::string::npos) << text;
}

}  // namespace
}  // namespace engram
