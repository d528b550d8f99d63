// engram_device_check: what the GPU host proves beyond the kernel tests (tests/gpu/device_check.sh
// runs it), against a running engramd serving a synthetic demo pack:
//   - capabilities, reported apart from failures: read-only host registration, CUDA IPC;
//   - LookupToDevice of 1 and 4096 tokens on a CUDA stream, every row copied back and checked
//     against the pack's formula while the daemon's HBM tier promotes and churns; p50/p99 and
//     rows/s, by both paths: the GPU reading misses from the registered mapping (direct) and the
//     CPU staging them (staged);
//   - copy figures, each beside its ceiling in the same run: the gather kernel reading rows from
//     pinned host memory over PCIe vs one large cudaMemcpy H2D; from device memory vs a
//     device-to-device cudaMemcpy.
// Lines: "CAPABILITY name value", "FIGURE name value unit", "FAILED what". Exit 0, 1 on a
// failure, 77 without a device.
//   engram_device_check PACK_DIR URI [SECONDS]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "engram/client.h"
#include "engram/kernels/cuda_kernels.h"
#include "tiering/layout/manifest.h"
#include "tiering/layout/synthetic.h"

namespace engram {
namespace {

using Clock = std::chrono::steady_clock;
int failures = 0;

void Fail(const std::string& what) {
  std::printf("FAILED %s\n", what.c_str());
  ++failures;
}

double Seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}

void Capabilities() {
  int read_only = 0;
  cudaDeviceGetAttribute(&read_only, cudaDevAttrHostRegisterReadOnlySupported, 0);
  std::printf("CAPABILITY host_register_read_only %d\n", read_only);
  void* buffer = nullptr;
  cudaIpcMemHandle_t handle;
  const cudaError_t e =
      cudaMalloc(&buffer, 1 << 20) == cudaSuccess ? cudaIpcGetMemHandle(&handle, buffer) : cudaErrorMemoryAllocation;
  std::printf("CAPABILITY cuda_ipc %s\n", e == cudaSuccess ? "1" : cudaGetErrorString(e));
  cudaGetLastError();
  if (buffer != nullptr) cudaFree(buffer);
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("CAPABILITY device \"%s\" sm_%d%d %.1f GiB\n", prop.name, prop.major, prop.minor,
              static_cast<double>(prop.totalGlobalMem) / (1u << 30));
}

// Rows of `row_bytes` picked at random from a `table_bytes` buffer at `table`, gathered by the
// kernel, against one cudaMemcpy of the same bytes from `ceiling_src`.
void GatherFigures(const char* name, const uint8_t* table, int64_t table_bytes, const void* ceiling_src,
                   cudaMemcpyKind kind) {
  const int64_t row_bytes = 264, rows = table_bytes / row_bytes, n = 1 << 20;
  std::vector<uint64_t> picks(n);
  std::mt19937_64 rng(7);
  for (auto& p : picks) p = rng() % rows;
  uint64_t* d_rows = nullptr;
  uint8_t* d_out = nullptr;
  cudaMalloc(&d_rows, n * 8);
  cudaMalloc(&d_out, n * row_bytes);
  cudaMemcpy(d_rows, picks.data(), n * 8, cudaMemcpyHostToDevice);
  auto time = [](auto&& body) {
    body();  // warm
    cudaDeviceSynchronize();
    std::vector<double> runs;
    for (int i = 0; i < 5; ++i) {
      const auto t0 = Clock::now();
      body();
      cudaDeviceSynchronize();
      runs.push_back(Seconds(t0));
    }
    return Percentile(runs, 0.5);
  };
  const double gather = time([&] { kernels::cuda::GatherRows(table, row_bytes, d_rows, n, d_out, nullptr); });
  const double copy = time([&] { cudaMemcpy(d_out, ceiling_src, n * row_bytes, kind); });
  const double bytes = static_cast<double>(n * row_bytes);
  std::printf("FIGURE %s_gather_264B_rows %.2f GB/s\n", name, bytes / gather / 1e9);
  std::printf("FIGURE %s_memcpy_ceiling %.2f GB/s\n", name, bytes / copy / 1e9);
  std::printf("FIGURE %s_gather_vs_ceiling %.2f x\n", name, copy / gather);
  if (cudaGetLastError() != cudaSuccess) Fail(std::string(name) + " gather figures: a CUDA error");
  cudaFree(d_rows);
  cudaFree(d_out);
}

void CopyFigures() {
  const int64_t bytes = int64_t{1} << 30;  // 1 GiB of rows
  uint8_t* pinned = nullptr;
  if (cudaHostAlloc(reinterpret_cast<void**>(&pinned), bytes, cudaHostAllocMapped) != cudaSuccess) {
    Fail("cudaHostAlloc of 1 GiB");
    return;
  }
  std::memset(pinned, 0x5a, bytes);
  uint8_t* mapped = nullptr;
  cudaHostGetDevicePointer(reinterpret_cast<void**>(&mapped), pinned, 0);
  GatherFigures("pinned_host", mapped, bytes, pinned, cudaMemcpyHostToDevice);
  uint8_t* device = nullptr;
  cudaMalloc(&device, bytes);
  cudaMemset(device, 0x5a, bytes);
  GatherFigures("device", device, bytes, device, cudaMemcpyDeviceToDevice);
  cudaFree(device);
  cudaFreeHost(pinned);
}

void LookupToDeviceChecks(const std::string& pack_dir, const std::string& uri, double seconds) {
  auto manifest = LoadPackManifest(pack_dir);
  if (!manifest.ok() || !manifest->synthetic_seed) {
    Fail("the pack " + pack_dir + " is not a synthetic pack: " + std::string(manifest.status().message()));
    return;
  }
  for (const bool direct : {true, false}) {
    ClientOptions options;
    options.device_direct_gather = direct;  // misses read by the GPU from the mapping, or staged by the CPU
    const std::string path = direct ? "direct" : "staged";
    auto client = Client::Connect(uri, options);
    if (!client.ok()) return Fail("connect " + uri + ": " + std::string(client.status().message()));
    auto table = (*client)->OpenTable(manifest->name);
    if (!table.ok()) return Fail("open table: " + std::string(table.status().message()));
    const auto& layer = manifest->layers.front();
    const int heads = static_cast<int>(layer.layout.head_rows.size());
    const int64_t row_bytes = manifest->row.bytes;
    cudaStream_t stream;
    cudaStreamCreate(&stream);
    std::mt19937 rng(11);
    // A Zipf-ish mix: most indices from a small hot set (which the HBM tier promotes), the rest
    // uniform, so rows come from HBM and from the host while the hot set changes.
    for (int tokens : {1, 4096}) {
      std::vector<double> latencies;
      const uint64_t bytes = static_cast<uint64_t>(tokens) * heads * row_bytes;
      uint8_t* d_out = nullptr;
      cudaMalloc(&d_out, bytes);
      std::vector<uint8_t> back(bytes), want(row_bytes);
      std::vector<float> scratch(manifest->row.dim);
      std::vector<uint32_t> idx(static_cast<size_t>(tokens) * heads);
      int64_t wrong = 0, calls = 0;
      const auto start = Clock::now();
      while (Seconds(start) < seconds / 4) {
        const uint32_t hot_base = static_cast<uint32_t>(Seconds(start) * 4) * 97;  // the hot set moves
        for (size_t i = 0; i < idx.size(); ++i) {
          const uint64_t rows = layer.layout.head_rows[i % heads];
          idx[i] = static_cast<uint32_t>((rng() % 4 ? hot_base + rng() % 64 : rng()) % rows);
        }
        const auto t0 = Clock::now();
        const absl::Status s = (*client)->LookupToDevice(**table, layer.id, tokens, idx, d_out, bytes, stream);
        cudaStreamSynchronize(stream);
        latencies.push_back(Seconds(t0) * 1e6);
        if (!s.ok()) return Fail("LookupToDevice: " + std::string(s.message()));
        cudaMemcpy(back.data(), d_out, bytes, cudaMemcpyDeviceToHost);
        for (size_t i = 0; i < idx.size(); ++i) {
          SyntheticRow(*manifest->synthetic_seed, layer.id, layer.layout.head_offset[i % heads] + idx[i],
                       manifest->row.dim, manifest->row.dtype, scratch.data(), want.data());
          if (std::memcmp(back.data() + i * row_bytes, want.data(), row_bytes) != 0) ++wrong;
        }
        ++calls;
      }
      const char* p = path.c_str();
      std::printf("FIGURE lookup_to_device_%s_%d_tokens_p50 %.1f us\n", p, tokens, Percentile(latencies, 0.5));
      std::printf("FIGURE lookup_to_device_%s_%d_tokens_p99 %.1f us\n", p, tokens, Percentile(latencies, 0.99));
      double total = 0;
      for (double us : latencies) total += us;
      std::printf("FIGURE lookup_to_device_%s_%d_tokens_rows_per_s %.3g rows/s (%lld calls)\n", p, tokens,
                  total > 0 ? static_cast<double>(calls) * static_cast<double>(idx.size()) / (total / 1e6) : 0.0,
                  static_cast<long long>(calls));
      if (wrong != 0) {
        Fail("LookupToDevice (" + path + ") of " + std::to_string(tokens) + " tokens: " + std::to_string(wrong) +
             " wrong rows");
      }
      cudaFree(d_out);
    }
    cudaStreamDestroy(stream);
  }
}

}  // namespace
}  // namespace engram

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACK_DIR URI [SECONDS]\n", argv[0]);
    return 2;
  }
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    return 77;
  }
  engram::Capabilities();
  engram::CopyFigures();
  engram::LookupToDeviceChecks(argv[1], argv[2], argc > 3 ? std::atof(argv[3]) : 20.0);
  std::printf("%s\n", engram::failures == 0 ? "device checks passed" : "device checks FAILED");
  return engram::failures == 0 ? 0 : 1;
}
