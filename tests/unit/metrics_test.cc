// The text exposition: what Prometheus parses (promtool checks the live endpoint in the
// integration tests; these pin the format details).
#include "service/metrics.h"

#include <atomic>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "service/daemon_metrics.h"

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

// Requests recorded from many threads while the exposition is rendered in a loop and new
// series keep appearing: every request is counted exactly once, and each status code gets its
// own series when it first occurs.
TEST(MetricsTest, RequestsRecordedDuringScrapesAreAllCounted) {
  MetricsRegistry r;
  DaemonMetrics metrics(&r);
  RequestMetrics* lookup = metrics.Requests("shm", "Lookup");
  EXPECT_EQ(metrics.Requests("shm", "Lookup"), lookup);  // resolved once, the same series after
  std::atomic<bool> done{false};
  std::thread scraper([&] {
    for (int i = 0; i < 100000 && !done.load(); ++i) (void)r.Render();
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < 4; ++t) {
    workers.emplace_back([&, t] {
      for (int i = 0; i < 20000; ++i) {
        lookup->Record(i % 1000 == 0 ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kOk, 1e-6);
        if (i % 5000 == 0) r.GetGauge("x_new_series", "Created while scraping", {"n"}, {std::to_string(t * 10 + i)});
      }
    });
  }
  for (auto& w : workers) w.join();
  done = true;
  scraper.join();
  const std::string text = r.Render();
  EXPECT_NE(text.find("engram_requests_total{transport=\"shm\",method=\"Lookup\",code=\"OK\"} 79920\n"),
            std::string::npos) << text;
  EXPECT_NE(text.find("engram_requests_total{transport=\"shm\",method=\"Lookup\",code=\"INVALID_ARGUMENT\"} 80\n"),
            std::string::npos) << text;
  EXPECT_NE(text.find("engram_request_duration_seconds_count{transport=\"shm\",method=\"Lookup\"} 80000\n"),
            std::string::npos) << text;
  EXPECT_EQ(text.find("code=\"NOT_FOUND\""), std::string::npos);  // codes that never occurred have no series
}

}  // namespace
}  // namespace engram
