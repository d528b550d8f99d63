// `engram-bench health`: the latency of /healthz or /readyz probes, kubelet's way (a fresh
// connection, 1 s timeout), on an otherwise quiet metrics port and while N idle connections are
// held on it (reopened whenever engramd closes one, as a port scanner or a stuck scraper would),
// in interleaved rounds.
#ifndef ENGRAM_BENCH_HEALTH_H_
#define ENGRAM_BENCH_HEALTH_H_

namespace engram {

int HealthBench(int argc, char** argv);

}  // namespace engram

#endif  // ENGRAM_BENCH_HEALTH_H_
