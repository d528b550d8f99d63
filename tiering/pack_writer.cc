#include "tiering/pack_writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tiering/layout/synthetic.h"
#include "tiering/block_checksums.h"
#include "xxhash.h"

namespace engram {
namespace {

constexpr uint64_t kChunkBytes = 8ull << 20;
constexpr char kLutFile[] = "compress_lut.i32";

}  // namespace

absl::Status WriteAll(int fd, const uint8_t* data, size_t size, const std::string& path) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("writing ", path, ": ", std::strerror(errno)));
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  const std::string tmp = path + ".tmp";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", std::strerror(errno)));
  absl::Status s = WriteAll(fd, reinterpret_cast<const uint8_t*>(contents.data()), contents.size(), tmp);
  if (s.ok() && fsync(fd) != 0) s = absl::InternalError(absl::StrCat("fsync ", tmp, ": ", std::strerror(errno)));
  close(fd);
  if (s.ok() && rename(tmp.c_str(), path.c_str()) != 0) {
    s = absl::InternalError(absl::StrCat("rename ", tmp, ": ", std::strerror(errno)));
  }
  return s;
}

namespace {

// Fills rows [first, first+count) of one layer into buf using `threads` threads.
void FillRows(const PackManifest& m, int layer_id, uint64_t first, uint64_t count, int threads,
              uint8_t* buf) {
  const int64_t row_bytes = m.row.bytes;
  auto work = [&](uint64_t begin, uint64_t end) {
    std::vector<float> scratch(m.row.dim);
    for (uint64_t r = begin; r < end; ++r) {
      SyntheticRow(*m.synthetic_seed, layer_id, first + r, m.row.dim, m.row.dtype, scratch.data(),
                   buf + r * row_bytes);
    }
  };
  if (threads <= 1 || count < 1024) {
    work(0, count);
    return;
  }
  std::vector<std::thread> pool;
  const uint64_t per = (count + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const uint64_t b = std::min(count, t * per), e = std::min(count, b + per);
    if (b < e) pool.emplace_back(work, b, e);
  }
  for (auto& th : pool) th.join();
}

}  // namespace

std::vector<std::string> PresetNames() { return {"demo-v1", "dsv41-flash"}; }

absl::StatusOr<PackManifest> PresetManifest(const PackPresetOptions& options) {
  PackManifest m;
  std::vector<int> layer_ids;
  int64_t base_vocab = 0;
  if (options.preset == "demo-v1") {
    m.name = "demo";
    m.row = {RowDtype::kBf16, 64, 0};
    m.hash.max_ngram = 3;
    base_vocab = 646400;
    layer_ids = {1, 15};
  } else if (options.preset == "dsv41-flash") {
    m.name = "dsv41-flash";
    m.row = {RowDtype::kFp8E4m3Ue8m0x32, 256, 0};
    m.hash.max_ngram = 4;
    m.hash.dead_token_id = -1;  // V4.1 marks positions without text (image spans) with -1
    base_vocab = 16000000;
    layer_ids = {1, 14};
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preset '", options.preset, "' (known: demo-v1, dsv41-flash)"));
  }
  if (!(options.scale > 0) || options.scale > 16) {
    return absl::InvalidArgumentError(absl::StrCat("--scale must be in (0, 16], got ", options.scale));
  }
  if (!options.name.empty()) m.name = options.name;
  if (options.dtype) m.row.dtype = *options.dtype;
  m.row.bytes = RowBytesFor(m.row.dtype, m.row.dim);
  m.hash.heads_per_ngram = 8;
  m.hash.seed = 0;
  m.hash.pad_id = 2;
  const int64_t vocab = std::max<int64_t>(2, std::llround(static_cast<double>(base_vocab) * options.scale));
  m.hash.vocab_per_ngram.assign(m.hash.max_ngram - 1, vocab);
  if (options.compress_lut.empty()) {
    return absl::InvalidArgumentError("the presets need the tokenizer's compress lut");
  }
  m.hash.compress_lut = options.compress_lut;
  m.hash.compressed_vocab =
      int64_t{*std::max_element(m.hash.compress_lut.begin(), m.hash.compress_lut.end())} + 1;
  m.compress_lut_file = kLutFile;
  auto layouts = DeriveLayerLayouts(m.hash, layer_ids);
  if (!layouts.ok()) return layouts.status();
  for (auto& layout : *layouts) {
    PackLayer layer;
    layer.id = layout.layer_id;
    layer.file = absl::StrCat("layer-", layer.id, ".rows");
    layer.layout = std::move(layout);
    m.layers.push_back(std::move(layer));
  }
  m.synthetic_seed = options.seed;
  return m;
}

absl::StatusOr<PackManifest> CreateSyntheticPack(PackManifest m, const PackWriteOptions& options) {
  namespace fs = std::filesystem;
  if (!m.synthetic_seed) return absl::InvalidArgumentError("only synthetic packs can be generated");
  std::error_code ec;
  if (fs::exists(options.out_dir, ec) && !fs::is_empty(options.out_dir, ec) && !options.force) {
    return absl::AlreadyExistsError(absl::StrCat(options.out_dir,
                                                 " exists and is not empty (use --force to overwrite)"));
  }
  fs::create_directories(options.out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", options.out_dir, ": ", ec.message()));
  fs::remove(fs::path(options.out_dir) / std::string(kManifestFile), ec);  // no manifest until complete

  if (!m.compress_lut_file.empty()) {
    const std::string lut_path = absl::StrCat(options.out_dir, "/", m.compress_lut_file);
    std::string bytes(reinterpret_cast<const char*>(m.hash.compress_lut.data()),
                      m.hash.compress_lut.size() * sizeof(int32_t));
    if (absl::Status s = WriteFileAtomically(lut_path, bytes); !s.ok()) return s;
  }

  const int threads = options.threads > 0 ? options.threads
                                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  const uint64_t all_bytes = m.total_bytes();
  uint64_t written = 0;
  const uint64_t rows_per_chunk = std::max<uint64_t>(1, kChunkBytes / m.row.bytes);
  std::vector<uint8_t> buf(rows_per_chunk * m.row.bytes);
  for (auto& layer : m.layers) {
    const std::string path = absl::StrCat(options.out_dir, "/", layer.file);
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
    XXH3_state_t* state = XXH3_createState();
    XXH3_64bits_reset(state);
    BlockChecksumBuilder blocks;
    absl::Status s;
    for (uint64_t first = 0; first < layer.layout.total_rows && s.ok(); first += rows_per_chunk) {
      const uint64_t count = std::min(rows_per_chunk, layer.layout.total_rows - first);
      FillRows(m, layer.id, first, count, threads, buf.data());
      const size_t bytes = static_cast<size_t>(count * m.row.bytes);
      XXH3_64bits_update(state, buf.data(), bytes);
      blocks.Update(buf.data(), bytes);
      s = WriteAll(fd, buf.data(), bytes, path);
      written += bytes;
      if (options.progress) options.progress(written, all_bytes);
    }
    layer.xxh3_64 = absl::StrFormat("%016x", XXH3_64bits_digest(state));
    XXH3_freeState(state);
    if (s.ok() && fsync(fd) != 0) s = absl::InternalError(absl::StrCat("fsync ", path, ": ", std::strerror(errno)));
    close(fd);
    if (!s.ok()) return s;
    layer.block_checksums_file = BlockChecksumFileName(layer.file);
    auto sums_hex = WriteBlockChecksums(absl::StrCat(options.out_dir, "/", layer.block_checksums_file), blocks.Finish());
    if (!sums_hex.ok()) return sums_hex.status();
    layer.block_checksums_xxh3_64 = *sums_hex;
  }
  if (absl::Status s = WriteFileAtomically(absl::StrCat(options.out_dir, "/", kManifestFile),
                                           ManifestToJson(m));
      !s.ok()) {
    return s;
  }
  return m;
}

absl::StatusOr<std::string> FileXxh3Hex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  std::vector<char> buf(kChunkBytes);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    XXH3_64bits_update(state, buf.data(), static_cast<size_t>(in.gcount()));
  }
  const uint64_t digest = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return absl::StrFormat("%016x", digest);
}

absl::StatusOr<PackVerifyReport> VerifyPack(const std::string& dir, uint64_t sample_rows) {
  constexpr uint64_t kMaxBlocksNamed = 32;
  auto manifest = LoadPackManifest(dir);
  if (!manifest.ok()) return manifest.status();
  const PackManifest& m = *manifest;
  PackVerifyReport report;
  std::mt19937_64 rng(42);
  std::vector<float> scratch(m.row.dim);
  std::vector<uint8_t> want(m.row.bytes), have(m.row.bytes);
  for (const auto& layer : m.layers) {
    const std::string path = absl::StrCat(dir, "/", layer.file);
    const uint64_t expected = layer.layout.total_rows * m.row.bytes;
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
      report.problems.push_back(absl::StrCat("layer ", layer.id, ": ", path, " is missing"));
      continue;
    }
    if (static_cast<uint64_t>(st.st_size) != expected) {
      report.problems.push_back(absl::StrCat("layer ", layer.id, ": ", path, " has ", st.st_size,
                                             " bytes, expected ", expected));
      continue;
    }
    std::string digest;
    auto sums = ComputeBlockChecksums(path, &digest);
    if (!sums.ok()) return sums.status();
    report.bytes_checked += expected;
    if (layer.xxh3_64.empty()) {
      report.problems.push_back(absl::StrCat("layer ", layer.id, ": the manifest has no xxh3_64"));
    } else if (digest != layer.xxh3_64) {
      report.problems.push_back(absl::StrCat("layer ", layer.id, ": xxh3_64 of ", path, " is ", digest,
                                             ", the manifest says ", layer.xxh3_64));
    }
    if (layer.block_checksums_file.empty()) {
      report.notes.push_back(absl::StrCat("layer ", layer.id, ": no block checksums; engramd serves it from NVMe ",
                                          "unverified (`engramctl pack checksum ", dir, "` adds them)"));
    } else {
      const std::string sums_path = absl::StrCat(dir, "/", layer.block_checksums_file);
      auto want = LoadBlockChecksums(sums_path, expected, layer.block_checksums_xxh3_64);
      if (!want.ok()) {
        report.problems.push_back(absl::StrCat("layer ", layer.id, ": ", want.status().message()));
      } else {
        uint64_t bad = 0;
        for (uint64_t b = 0; b < sums->size(); ++b) {
          if ((*sums)[b] == (*want)[b]) continue;
          if (++bad > kMaxBlocksNamed) continue;
          const uint64_t begin = b * kChecksumBlockBytes;
          const uint64_t end = std::min(expected, begin + kChecksumBlockBytes);
          report.problems.push_back(absl::StrCat(
              "layer ", layer.id, ": block ", b, " of ", path, " (bytes ", begin, "..", end - 1, ", rows ",
              begin / m.row.bytes, "..", (end - 1) / m.row.bytes, ") fails its block checksum"));
        }
        if (bad > kMaxBlocksNamed) {
          report.problems.push_back(absl::StrCat("layer ", layer.id, ": ", bad - kMaxBlocksNamed,
                                                 " more blocks fail their checksums"));
        }
      }
    }
    if (!m.synthetic_seed || sample_rows == 0) continue;
    std::ifstream in(path, std::ios::binary);
    for (uint64_t i = 0; i < sample_rows; ++i) {
      const uint64_t r = i == 0 ? 0 : (i == 1 ? layer.layout.total_rows - 1 : rng() % layer.layout.total_rows);
      SyntheticRow(*m.synthetic_seed, layer.id, r, m.row.dim, m.row.dtype, scratch.data(), want.data());
      in.seekg(static_cast<std::streamoff>(r * m.row.bytes));
      in.read(reinterpret_cast<char*>(have.data()), m.row.bytes);
      ++report.rows_sampled;
      if (!in || have != want) {
        report.problems.push_back(absl::StrCat("layer ", layer.id, ": row ", r,
                                               " differs from the synthetic formula"));
        break;
      }
    }
  }
  return report;
}

}  // namespace engram

namespace engram {

absl::StatusOr<int> AddBlockChecksums(const std::string& dir, const std::function<void(const std::string&)>& progress) {
  auto manifest = LoadPackManifest(dir);
  if (!manifest.ok()) return manifest.status();
  PackManifest m = std::move(*manifest);
  int added = 0;
  for (auto& layer : m.layers) {
    if (!layer.block_checksums_file.empty()) continue;
    const std::string path = absl::StrCat(dir, "/", layer.file);
    if (progress) progress(absl::StrCat("layer ", layer.id, ": reading ", path));
    std::string digest;
    auto sums = ComputeBlockChecksums(path, &digest);
    if (!sums.ok()) return sums.status();
    const uint64_t expected = layer.layout.total_rows * static_cast<uint64_t>(m.row.bytes);
    if (sums->size() != ChecksumBlocks(expected)) {
      return absl::DataLossError(absl::StrCat(path, " is not ", expected, " bytes long as the manifest says"));
    }
    // Checksums vouch for bytes; never write them for a file that already fails its own xxh3_64.
    if (layer.xxh3_64.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layer ", layer.id, ": the manifest has no xxh3_64 to check ", path, " against before checksumming it"));
    }
    if (digest != layer.xxh3_64) {
      return absl::DataLossError(absl::StrCat("layer ", layer.id, ": xxh3_64 of ", path, " is ", digest,
                                              ", the manifest says ", layer.xxh3_64, "; not checksumming a corrupt file"));
    }
    layer.block_checksums_file = BlockChecksumFileName(layer.file);
    auto hex = WriteBlockChecksums(absl::StrCat(dir, "/", layer.block_checksums_file), *sums);
    if (!hex.ok()) return hex.status();
    layer.block_checksums_xxh3_64 = *hex;
    ++added;
  }
  if (added > 0) {
    if (absl::Status s = WriteFileAtomically(absl::StrCat(dir, "/", kManifestFile), ManifestToJson(m)); !s.ok()) {
      return s;
    }
  }
  return added;
}

}  // namespace engram
