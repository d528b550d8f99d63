// engram_device_check: what the GPU host proves beyond the kernel tests (tests/gpu/device_check.sh
// runs it), against a running engramd serving a synthetic demo pack:
//   - capabilities, reported apart from failures: read-only host registration, CUDA IPC;
//   - LookupToDevice of 1 and 4096 tokens on a CUDA stream, every row copied back and checked
//     against the pack's formula while the daemon's HBM tier promotes and churns; p50/p99 and
//     rows/s, by both paths: the GPU reading misses from the registered mapping (direct) and the
//     CPU staging them (staged);
//   - copy figures, each beside its ceiling in the same run: the gather kernel reading rows from
//     pinned host memory over PCIe vs one large cudaMemcpy H2D; from device memory vs a
//     device-to-device cudaMemcpy; a Zipf request's repeats read over PCIe vs copied on the device.
// With --module instead (no daemon): DeepSeek-V4.1's module on the GPU (EngramLayer's CUDA path,
// V4.1-Flash's sizes, 264-byte fp8 rows staged from host memory, f32 streams in device memory),
// tokens/s at a prefill of 4096 tokens and a decode batch of 64, each beside cuBLAS's SGEMM of the
// module's projection alone (the part no module can skip), and its output checked to be finite.
// Lines: "CAPABILITY name value", "FIGURE name value unit", "FAILED what". Exit 0, 1 on a
// failure, 77 without a device.
//   engram_device_check PACK_DIR URI [SECONDS]
//   engram_device_check --module [SECONDS]
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/percentile.h"
#include "client/engram_layer_cuda.h"
#include "engram/client.h"
#include "engram/kernels/cuda_kernels.h"
#include "engram/kernels/hbm_probe.h"
#include "tiering/batch_dedup.h"
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

// The median of `runs` timed runs of `body` (device work, waited for), after one untimed run.
template <typename Body>
double DeviceMedianSeconds(int runs, Body& body) {
  body();  // warm
  cudaDeviceSynchronize();
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    const auto t0 = Clock::now();
    body();
    cudaDeviceSynchronize();
    times.push_back(Seconds(t0));
  }
  return Percentile(times, 0.5);
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
  auto time = [](auto&& body) { return DeviceMedianSeconds(5, body); };
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

// What a request's repeats cost the direct gather (LookupToDevice over a mapped table): 65,536
// rows drawn Zipf-like (exponent 1) from `rows` rows of pinned host memory, gathered with every
// position read over PCIe, against the distinct rows read once and the repeats copied on the device
// (kDirectRepeat, what SplitForDeviceDirect hands the kernel), beside the host's cost of finding
// the repeats (FirstPositions, as the client does). Each picked row gets bytes of its own first,
// and both outputs must equal the CPU twin's (kernels::ReplayDirectGather) on the host's copy.
// `host` and `mapped` are the same pinned memory, as the CPU and as the GPU address it.
void RepeatFigures(uint8_t* host, const uint8_t* mapped, int64_t rows) {
  const int64_t row_bytes = 264, n = 65536;
  std::vector<double> cdf(1 << 16);  // Zipf over the first 64k ranks, each rank a random row
  double total = 0;
  for (size_t r = 0; r < cdf.size(); ++r) cdf[r] = total += 1.0 / static_cast<double>(r + 1);
  std::mt19937_64 rng(13);
  std::vector<uint64_t> rank_row(cdf.size());
  for (auto& r : rank_row) r = rng() % rows;
  std::vector<uint64_t> picks(n);
  std::uniform_real_distribution<double> u(0, total);
  for (auto& p : picks) p = rank_row[std::lower_bound(cdf.begin(), cdf.end(), u(rng)) - cdf.begin()];
  std::vector<uint64_t> every(n), once(n);
  FirstPositionScratch scratch;
  std::vector<uint32_t> first;
  std::vector<double> host_us;
  for (int i = 0; i < 20; ++i) {
    const auto t0 = Clock::now();
    FirstPositions(picks, &scratch, &first);
    host_us.push_back(Seconds(t0) * 1e6);
  }
  int64_t repeats = 0;
  for (int64_t i = 0; i < n; ++i) {
    every[i] = kernels::kDirectFromHost | picks[i];
    once[i] = first[i] == i ? every[i] : kernels::kDirectRepeat | first[i];
    repeats += first[i] == i ? 0 : 1;
    for (int64_t b = 0; b < row_bytes; ++b) {
      host[picks[i] * row_bytes + b] = static_cast<uint8_t>(picks[i] * 131 + picks[i] / 251 + b);
    }
  }
  std::vector<uint8_t> want(n * row_bytes);
  kernels::ReplayDirectGather(once.data(), n, nullptr, host, row_bytes, want.data());
  uint64_t *d_every = nullptr, *d_once = nullptr;
  uint8_t *d_a = nullptr, *d_b = nullptr;
  cudaMalloc(&d_every, n * 8);
  cudaMalloc(&d_once, n * 8);
  cudaMalloc(&d_a, n * row_bytes);
  cudaMalloc(&d_b, n * row_bytes);
  cudaMemcpy(d_every, every.data(), n * 8, cudaMemcpyHostToDevice);
  cudaMemcpy(d_once, once.data(), n * 8, cudaMemcpyHostToDevice);
  auto time = [](auto&& body) { return DeviceMedianSeconds(9, body) * 1e6; };
  const double all_us =
      time([&] { kernels::cuda::GatherDirectRows(nullptr, mapped, row_bytes, d_every, n, 0, d_a, nullptr); });
  const double once_us =
      time([&] { kernels::cuda::GatherDirectRows(nullptr, mapped, row_bytes, d_once, n, repeats, d_b, nullptr); });
  std::vector<uint8_t> a(n * row_bytes), b(n * row_bytes);
  cudaMemcpy(a.data(), d_a, a.size(), cudaMemcpyDeviceToHost);
  cudaMemcpy(b.data(), d_b, b.size(), cudaMemcpyDeviceToHost);
  if (cudaGetLastError() != cudaSuccess) Fail("direct gather with repeats: a CUDA error");
  if (a != want) Fail("direct gather, every row over PCIe: rows differ from the CPU twin's");
  if (b != want) Fail("direct gather, repeats copied on the device: rows differ from the CPU twin's");
  std::printf("FIGURE direct_gather_zipf_distinct_share %.3f of %lld rows\n",
              static_cast<double>(n - repeats) / static_cast<double>(n), static_cast<long long>(n));
  std::printf("FIGURE direct_gather_zipf_every_row_over_pcie %.1f us\n", all_us);
  std::printf("FIGURE direct_gather_zipf_repeats_on_device %.1f us\n", once_us);
  std::printf("FIGURE direct_gather_zipf_host_dedup %.1f us\n", Percentile(host_us, 0.5));
  cudaFree(d_every);
  cudaFree(d_once);
  cudaFree(d_a);
  cudaFree(d_b);
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
  RepeatFigures(pinned, mapped, bytes / 264);
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

// Median seconds of `call` (a CUDA call sequence on `stream`), run until `seconds` have passed (at
// least 3 times), after one untimed run.
template <typename Call>
double MedianSeconds(cudaStream_t stream, double seconds, Call call) {
  call();
  cudaStreamSynchronize(stream);
  std::vector<double> times;
  const auto start = Clock::now();
  while (Seconds(start) < seconds || times.size() < 3) {
    const auto t0 = Clock::now();
    call();
    cudaStreamSynchronize(stream);
    times.push_back(Seconds(t0));
  }
  return Percentile(times, 0.5);
}

void ModuleFigures(double seconds) {
  constexpr int kStreams = 4, kHidden = 5120, kHeads = 24, kRowDim = 256, kEmbed = kHeads * kRowDim;
  const int64_t row_bytes = RowBytesFor(RowDtype::kFp8E4m3Ue8m0x32, kRowDim);  // 264
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  kernels::Dsv41Weights w;
  w.streams = kStreams;
  w.hidden = kHidden;
  w.embed = kEmbed;
  w.eps = 1e-6f;
  w.wkv.resize(static_cast<size_t>(kStreams + 1) * kHidden * kEmbed);
  for (float& x : w.wkv) x = normal(rng) / std::sqrt(static_cast<float>(kEmbed));
  w.q_weight.assign(static_cast<size_t>(kStreams) * kHidden, 1.0f);
  w.k_weight.assign(static_cast<size_t>(kStreams) * kHidden, 1.0f);
  auto layer = EngramLayerCuda::CreateDsv41(w, RowDtype::kFp8E4m3Ue8m0x32, kRowDim);
  if (!layer.ok()) {
    Fail("EngramLayerCuda::CreateDsv41: " + std::string(layer.status().message()));
    return;
  }
  cudaStream_t stream = nullptr;
  cudaStreamCreate(&stream);
  cublasHandle_t blas = nullptr;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
    Fail("cublasCreate");
    return;
  }
  cublasSetStream(blas, stream);
  const int width = (kStreams + 1) * kHidden;
  float *d_wkv = nullptr, *d_e = nullptr, *d_proj = nullptr;
  for (const int tokens : {4096, 64}) {
    // Rows: fp8 values of modest size (no NaN codes) and a scale of 2^0 per block of 32.
    std::vector<uint8_t> rows(static_cast<size_t>(tokens) * kHeads * row_bytes);
    for (size_t r = 0; r < rows.size() / row_bytes; ++r) {
      uint8_t* row = rows.data() + r * row_bytes;
      for (int i = 0; i < kRowDim; ++i) row[i] = static_cast<uint8_t>(rng() % 0x70) | (rng() & 0x80);
      for (int b = kRowDim; b < row_bytes; ++b) row[b] = 127;
    }
    const std::vector<uint8_t> dead(static_cast<size_t>(tokens), 0);
    const size_t values = static_cast<size_t>(tokens) * kStreams * kHidden;
    std::vector<float> hidden(values);
    for (float& x : hidden) x = normal(rng);
    float *d_hidden = nullptr, *d_out = nullptr;
    cudaMalloc(&d_hidden, values * sizeof(float));
    cudaMalloc(&d_out, values * sizeof(float));
    cudaMemcpy(d_hidden, hidden.data(), values * sizeof(float), cudaMemcpyHostToDevice);
    absl::Status status;
    const double module = MedianSeconds(stream, seconds, [&] {
      status = (*layer)->ForwardDsv41(rows, tokens * kHeads, dead, d_hidden, d_out, values, /*bf16_streams=*/false,
                                      stream, /*host_buffers=*/false);
    });
    if (!status.ok()) {
      Fail("ForwardDsv41 on the GPU: " + std::string(status.message()));
    } else {
      std::vector<float> out(values);
      cudaMemcpy(out.data(), d_out, values * sizeof(float), cudaMemcpyDeviceToHost);
      if (!std::all_of(out.begin(), out.end(), [](float x) { return std::isfinite(x); })) {
        Fail("ForwardDsv41 on the GPU wrote a value that is not finite");
      }
    }
    // The projection alone, [tokens][M] x [M][(K+1)D], as the module calls it.
    cudaMalloc(&d_wkv, w.wkv.size() * sizeof(float));
    cudaMalloc(&d_e, static_cast<size_t>(tokens) * kEmbed * sizeof(float));
    cudaMalloc(&d_proj, static_cast<size_t>(tokens) * width * sizeof(float));
    cudaMemset(d_e, 0, static_cast<size_t>(tokens) * kEmbed * sizeof(float));
    cudaMemcpy(d_wkv, w.wkv.data(), w.wkv.size() * sizeof(float), cudaMemcpyHostToDevice);
    const float one = 1.0f, zero = 0.0f;
    const double gemm = MedianSeconds(stream, seconds, [&] {
      cublasSgemm(blas, CUBLAS_OP_T, CUBLAS_OP_N, width, tokens, kEmbed, &one, d_wkv, kEmbed, d_e, kEmbed, &zero,
                  d_proj, width);
    });
    std::printf("FIGURE module_dsv41_%d_tokens_gpu %.4g tokens/s (%.3f ms per call)\n", tokens, tokens / module,
                module * 1e3);
    std::printf("FIGURE module_dsv41_%d_tokens_projection_sgemm %.4g tokens/s (%.3f ms, %.1f TFLOP/s)\n", tokens,
                tokens / gemm, gemm * 1e3, 2.0 * tokens * kEmbed * width / gemm / 1e12);
    std::printf("FIGURE module_dsv41_%d_tokens_vs_projection %.2f x\n", tokens, gemm / module);
    cudaFree(d_hidden);
    cudaFree(d_out);
    cudaFree(d_wkv);
    cudaFree(d_e);
    cudaFree(d_proj);
    d_wkv = d_e = d_proj = nullptr;
  }
  if (cudaGetLastError() != cudaSuccess) Fail("module figures: a CUDA error");
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace engram

int main(int argc, char** argv) {
  if (argc >= 2 && std::string(argv[1]) == "--module") {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      std::printf("SKIP: no CUDA device\n");
      return 77;
    }
    engram::ModuleFigures(argc > 2 ? std::atof(argv[2]) : 3.0);
    std::printf("%s\n", engram::failures == 0 ? "module checks passed" : "module checks FAILED");
    return engram::failures == 0 ? 0 : 1;
  }
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s PACK_DIR URI [SECONDS] | --module [SECONDS]\n", argv[0]);
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
