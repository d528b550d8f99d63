// engramctl: make, check and inspect table packs; hash token files the way engramd does; run an
// Engram layer on files.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engram/engram_layer.h"
#include "service/cli_flags.h"
#include "tiering/engine.h"
#include "tiering/layout/manifest.h"
#include "tiering/hot_set.h"
#include "service/tokenizer_lut.h"
#include "tiering/hf_import.h"
#include "tiering/pack_writer.h"

namespace engram {
namespace {

constexpr char kUsage[] =
    "engramctl: tools for Engram table packs.\n"
    "\n"
    "Usage:\n"
    "  engramctl pack create --preset demo-v1|dsv41-flash [--scale F] [--dtype D] [--seed N]\n"
    "                        [--compress-lut FILE] [--name NAME] --out DIR\n"
    "  engramctl pack create --layout FILE.json --out DIR\n"
    "  engramctl pack verify DIR [--sample-rows N]\n"
    "  engramctl pack checksum DIR\n"
    "  engramctl pack import --hf CHECKPOINT_DIR --out DIR [--layers 1,14] [--name NAME] [--dry-run]\n"
    "  engramctl pack info DIR\n"
    "  engramctl lut --tokenizer tokenizer.json [--vocab-size N] [--expect-compressed N] --out FILE.i32\n"
    "  engramctl hash --pack DIR --tokens FILE.i32 --shape B,T --out FILE.i64\n"
    "  engramctl profile --pack DIR --tokens FILE.i32 --out HOTSET [--fraction 0.1]\n"
    "  engramctl lookup --daemon URI --table NAME --layer L --indices FILE.u32 --out FILE\n"
    "  engramctl forward --pack DIR | --daemon URI --table NAME  --layer L\n"
    "                    --weights FILE.safetensors (demo) | --checkpoint HF_DIR (dsv41)\n"
    "                    --tokens FILE.i32 --shape B,T --hidden FILE --out FILE\n"
    "                    [--variant auto|demo|dsv41] [--stream-dtype f32|bf16] [--device cpu|cuda|auto]\n"
    "\n"
    "Run a command with --help for its flags.";

constexpr char kLutName[] = "deepseek_v3_compress_lut.i32";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "engramctl: %s\n", std::string(s.message()).c_str());
  return 1;
}

// The tokenizer lut for the presets: --compress-lut, else $ENGRAM_DATA_DIR, the install dir, the
// source tree.
absl::StatusOr<std::vector<int32_t>> FindPresetLut(const std::string& flag) {
  if (!flag.empty()) return ReadInt32File(flag);
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("ENGRAM_DATA_DIR")) candidates.push_back(absl::StrCat(env, "/", kLutName));
  candidates.push_back(absl::StrCat(ENGRAM_DATA_INSTALL_DIR, "/", kLutName));
  candidates.push_back(absl::StrCat(ENGRAM_DATA_SOURCE_DIR, "/", kLutName));
  for (const auto& path : candidates) {
    if (std::filesystem::exists(path)) return ReadInt32File(path);
  }
  return absl::NotFoundError(absl::StrCat("cannot find ", kLutName, " (looked in $ENGRAM_DATA_DIR, ",
                                          ENGRAM_DATA_INSTALL_DIR, ", ", ENGRAM_DATA_SOURCE_DIR,
                                          "); pass --compress-lut FILE"));
}

int PackCreate(int argc, char** argv) {
  std::string preset, layout, dtype, lut, name, out;
  double scale = 1.0;
  int64_t seed = 1234, threads = 0;
  bool force = false, quiet = false;
  FlagSet flags("engramctl pack create",
                "engramctl pack create: writes a table pack of synthetic rows (DESIGN.md formula), from\n"
                "a preset or a layout file (a manifest without head_rows, multipliers, file, xxh3_64).");
  flags.String("preset", &preset, "demo-v1 (layers 1,15; orders 2-3; 8 heads; bf16 x 64) or dsv41-flash "
                                  "(layers 1,14; orders 2-4; 8 heads; fp8 rows of 264 bytes)");
  flags.String("layout", &layout, "layout JSON file instead of a preset");
  flags.Double("scale", &scale, "multiply every order's base table size (presets only)");
  flags.String("dtype", &dtype, "row dtype: f32, bf16, f16 or fp8_e4m3_ue8m0x32 (presets only)");
  flags.Int("seed", &seed, "seed of the synthetic row values");
  flags.String("compress-lut", &lut, "tokenizer lut (int32 raw id -> compressed id) for a preset");
  flags.String("name", &name, "table name (presets only; default: the preset's)");
  flags.String("out", &out, "output directory");
  flags.Bool("force", &force, "write into a non-empty directory");
  flags.Int("threads", &threads, "threads generating rows (0: one per core)");
  flags.Bool("quiet", &quiet, "no progress output");
  ParseOrExit(flags, argc, argv, 3, nullptr);
  if (out.empty()) return Fail(absl::InvalidArgumentError("--out DIR is required"));
  if (preset.empty() == layout.empty()) {
    return Fail(absl::InvalidArgumentError("give exactly one of --preset or --layout"));
  }
  if (seed < 0) return Fail(absl::InvalidArgumentError("--seed must be >= 0"));
  absl::StatusOr<PackManifest> manifest;
  if (!preset.empty()) {
    PackPresetOptions options;
    options.preset = preset;
    options.scale = scale;
    options.seed = static_cast<uint64_t>(seed);
    options.name = name;
    if (!dtype.empty()) {
      auto d = ParseRowDtype(dtype);
      if (!d.ok()) return Fail(d.status());
      options.dtype = *d;
    }
    auto lut_values = FindPresetLut(lut);
    if (!lut_values.ok()) return Fail(lut_values.status());
    options.compress_lut = std::move(*lut_values);
    manifest = PresetManifest(options);
  } else {
    std::ifstream in(layout);
    if (!in) return Fail(absl::NotFoundError(absl::StrCat("cannot open ", layout)));
    std::stringstream text;
    text << in.rdbuf();
    const std::string base = std::filesystem::path(layout).parent_path().string();
    manifest = ParseManifestJson(text.str(), base, layout, /*derive=*/true);
    if (manifest.ok()) {
      if (!manifest->synthetic_seed) manifest->synthetic_seed = static_cast<uint64_t>(seed);
      if (!manifest->compress_lut_file.empty()) manifest->compress_lut_file = "compress_lut.i32";
    }
  }
  if (!manifest.ok()) return Fail(manifest.status());
  PackWriteOptions write;
  write.out_dir = out;
  write.force = force;
  write.threads = static_cast<int>(threads);
  int last_percent = -1;
  if (!quiet) {
    write.progress = [&](uint64_t done, uint64_t all) {
      const int percent = all ? static_cast<int>(100 * done / all) : 100;
      if (percent / 10 != last_percent / 10) {
        std::fprintf(stderr, "  %3d%%  %llu of %llu bytes\n", percent, static_cast<unsigned long long>(done),
                     static_cast<unsigned long long>(all));
        last_percent = percent;
      }
    };
  }
  auto written = CreateSyntheticPack(std::move(*manifest), write);
  if (!written.ok()) return Fail(written.status());
  std::printf("created pack '%s' in %s: %zu layers, %llu bytes\n", written->name.c_str(), out.c_str(),
              written->layers.size(), static_cast<unsigned long long>(written->total_bytes()));
  return 0;
}

int PackVerify(int argc, char** argv) {
  int64_t sample = 64;
  FlagSet flags("engramctl pack verify",
                "engramctl pack verify DIR: checks each row file's size, xxh3_64 and block checksums (naming\n"
                "every block that fails), and samples rows\n"
                "of synthetic packs against the formula. Exit code 0 only when the pack is sound.");
  flags.Int("sample-rows", &sample, "rows per layer checked against the synthetic formula");
  std::vector<std::string> positional;
  ParseOrExit(flags, argc, argv, 3, &positional);
  if (positional.size() != 1) return Fail(absl::InvalidArgumentError("pack verify takes one pack directory"));
  auto report = VerifyPack(positional[0], static_cast<uint64_t>(std::max<int64_t>(0, sample)));
  if (!report.ok()) return Fail(report.status());
  for (const auto& n : report->notes) std::printf("note: %s\n", n.c_str());
  for (const auto& p : report->problems) std::printf("problem: %s\n", p.c_str());
  std::printf("%s: %llu bytes checked, %llu rows sampled, %zu problems\n", positional[0].c_str(),
              static_cast<unsigned long long>(report->bytes_checked),
              static_cast<unsigned long long>(report->rows_sampled), report->problems.size());
  return report->problems.empty() ? 0 : 1;
}

int PackChecksum(int argc, char** argv) {
  FlagSet flags("engramctl pack checksum",
                "engramctl pack checksum DIR: adds block checksums (xxh3_64 of every 4096-byte block) to a\n"
                "pack written before them, so engramd verifies every block it reads from NVMe. Each row file\n"
                "is first checked against its xxh3_64; layers that have block checksums are left as they are.");
  std::vector<std::string> positional;
  ParseOrExit(flags, argc, argv, 3, &positional);
  if (positional.size() != 1) return Fail(absl::InvalidArgumentError("pack checksum takes one pack directory"));
  auto added = AddBlockChecksums(positional[0], [](const std::string& line) {
    std::fprintf(stderr, "engramctl: %s\n", line.c_str());
  });
  if (!added.ok()) return Fail(added.status());
  std::printf("%s: block checksums added to %d layer%s\n", positional[0].c_str(), *added, *added == 1 ? "" : "s");
  return 0;
}

int PackImport(int argc, char** argv) {
  std::string hf, out, name, layers;
  bool dry_run = false, force = false;
  FlagSet flags("engramctl pack import",
                "engramctl pack import --hf CHECKPOINT_DIR --out DIR: turns a Hugging Face checkpoint's Engram tables\n"
                "(config.json, model.safetensors.index.json, the shards, tokenizer.json; DeepSeek-V4.1's layout) into\n"
                "a pack. The hash layout is derived from config.json and checked against the tensors; the token\n"
                "compression table is built from tokenizer.json and checked against engram_compressed_vocab_size.\n"
                "Rows are streamed (constant memory); the manifest is written last, so an interrupted import\n"
                "leaves no pack. --dry-run reads config.json only and prints the layout it derives.");
  flags.String("hf", &hf, "the checkpoint directory");
  flags.String("out", &out, "the pack directory to write");
  flags.String("name", &name, "the table's name (default: engram)");
  flags.String("layers", &layers, "comma-separated Engram layer ids to import (default: all)");
  flags.Bool("dry-run", &dry_run, "print the derived layout and the checks; write nothing");
  flags.Bool("force", &force, "write into a non-empty --out");
  std::vector<std::string> positional;
  ParseOrExit(flags, argc, argv, 3, &positional);
  if (hf.empty()) return Fail(absl::InvalidArgumentError("pack import needs --hf CHECKPOINT_DIR"));
  if (dry_run) {
    auto lines = DescribeHfLayout(hf, /*check_tensors=*/false);
    if (!lines.ok()) return Fail(lines.status());
    for (const auto& line : *lines) std::printf("%s\n", line.c_str());
    return 0;
  }
  if (out.empty()) return Fail(absl::InvalidArgumentError("pack import needs --out DIR (or --dry-run)"));
  HfImportOptions options;
  options.checkpoint_dir = hf;
  options.out_dir = out;
  options.name = name;
  options.force = force;
  for (absl::string_view part : absl::StrSplit(layers, ',', absl::SkipEmpty())) {
    int id = 0;
    if (!absl::SimpleAtoi(part, &id)) return Fail(absl::InvalidArgumentError(absl::StrCat("--layers: '", part, "' is not a layer id")));
    options.layers.push_back(id);
  }
  auto config = ReadHfEngramConfig(hf + "/config.json");
  if (!config.ok()) return Fail(config.status());
  auto lut = BuildCompressLut(hf + "/tokenizer.json", config->vocab_size);
  if (!lut.ok()) return Fail(lut.status());
  std::fprintf(stderr, "engramctl: tokenizer.json: %lld tokens -> %lld compressed ids (%s)\n",
               static_cast<long long>(lut->tokens), static_cast<long long>(lut->compressed_vocab),
               LutUnicodeVersions().c_str());
  options.compress_lut = std::move(lut->lut);
  options.log = [](const std::string& line) { std::fprintf(stderr, "engramctl: %s\n", line.c_str()); };
  const auto start = std::chrono::steady_clock::now();
  auto last = start - std::chrono::seconds(1);
  options.progress = [&](uint64_t done, uint64_t all) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last < std::chrono::milliseconds(500) && done < all) return;
    last = now;
    const double secs = std::max(1e-3, std::chrono::duration<double>(now - start).count());
    const double rate = static_cast<double>(done) / secs;
    std::fprintf(stderr, "\rengramctl: %.2f of %.2f GB, %.0f MB/s, ETA %.0f s   ", done / 1e9, all / 1e9, rate / 1e6,
                 rate > 0 ? static_cast<double>(all - done) / rate : 0.0);
    if (done >= all) std::fputc('\n', stderr);
  };
  auto written = ImportHfCheckpoint(options);
  if (!written.ok()) return Fail(written.status());
  std::printf("imported %zu Engram layer%s into %s: %s x %d, %llu bytes\n", written->layers.size(),
              written->layers.size() == 1 ? "" : "s", out.c_str(), std::string(RowDtypeName(written->row.dtype)).c_str(),
              written->row.dim, static_cast<unsigned long long>(written->total_bytes()));
  return 0;
}

int PackInfo(int argc, char** argv) {
  FlagSet flags("engramctl pack info", "engramctl pack info DIR: prints a pack's layout.");
  std::vector<std::string> positional;
  ParseOrExit(flags, argc, argv, 3, &positional);
  if (positional.size() != 1) return Fail(absl::InvalidArgumentError("pack info takes one pack directory"));
  auto m = LoadPackManifest(positional[0]);
  if (!m.ok()) return Fail(m.status());
  std::printf("name:        %s\n", m->name.c_str());
  std::printf("row:         %s x %d = %lld bytes\n", std::string(RowDtypeName(m->row.dtype)).c_str(), m->row.dim,
              static_cast<long long>(m->row.bytes));
  std::printf("hash:        %s, orders 2..%d, %d heads per order (%d per layer), seed %llu, pad id %lld\n",
              m->hash_kind.c_str(), m->hash.max_ngram, m->hash.heads_per_ngram, m->hash.heads_per_layer(),
              static_cast<unsigned long long>(m->hash.seed), static_cast<long long>(m->hash.pad_id));
  std::printf("vocab:       compressed %lld ids%s\n", static_cast<long long>(m->hash.compressed_vocab),
              m->compress_lut_file.empty() ? " (no lut)" : absl::StrCat(" (lut ", m->compress_lut_file, ")").c_str());
  for (const auto& l : m->layers) {
    std::printf("layer %-5d  %llu rows, %llu bytes, file %s, xxh3_64 %s\n", l.id,
                static_cast<unsigned long long>(l.layout.total_rows),
                static_cast<unsigned long long>(l.layout.total_rows * m->row.bytes), l.file.c_str(),
                l.xxh3_64.c_str());
    std::string heads;
    for (int64_t r : l.layout.head_rows) absl::StrAppend(&heads, heads.empty() ? "" : " ", r);
    std::printf("             head rows: %s\n", heads.c_str());
  }
  std::printf("total:       %llu bytes%s\n", static_cast<unsigned long long>(m->total_bytes()),
              m->synthetic_seed ? absl::StrCat(", synthetic seed ", *m->synthetic_seed).c_str() : "");
  return 0;
}

int Lut(int argc, char** argv) {
  std::string tokenizer, out;
  int64_t vocab_size = 0, expect = 0;
  FlagSet flags("engramctl lut",
                "engramctl lut --tokenizer tokenizer.json --out FILE.i32: the Engram token compression table\n"
                "(little-endian int32, raw token id -> compressed id) built from a Hugging Face byte-level BPE\n"
                "tokenizer.json by the reference's rules (HASHING.md): each token's decoded text is normalized\n"
                "(NFKC, NFD, marks removed, lowercase, whitespace collapsed and trimmed) and ids whose normal\n"
                "forms agree share one compressed id.");
  flags.String("tokenizer", &tokenizer, "the tokenizer.json to read");
  flags.Int("vocab-size", &vocab_size,
            "entries to write (the model's embedding rows); ids past the tokenizer take its last token's id.\n"
            "                              0: the tokenizer's length");
  flags.Int("expect-compressed", &expect, "fail unless the table has exactly this many compressed ids (0: any)");
  flags.String("out", &out, "where to write the table");
  std::vector<std::string> positional;
  ParseOrExit(flags, argc, argv, 2, &positional);
  if (tokenizer.empty() || out.empty()) return Fail(absl::InvalidArgumentError("lut needs --tokenizer and --out"));
  if (vocab_size < 0 || expect < 0) return Fail(absl::InvalidArgumentError("--vocab-size and --expect-compressed are counts"));
  auto lut = BuildCompressLut(tokenizer, vocab_size);
  if (!lut.ok()) return Fail(lut.status());
  if (expect != 0 && lut->compressed_vocab != expect) {
    return Fail(absl::FailedPreconditionError(absl::StrCat(tokenizer, " compresses to ", lut->compressed_vocab,
                                                           " ids, not the ", expect, " expected")));
  }
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(lut->lut.data()), static_cast<std::streamsize>(lut->lut.size() * 4));
  if (!f) return Fail(absl::InternalError(absl::StrCat("cannot write ", out)));
  std::printf("%s: %lld tokens -> %lld compressed ids (%.2f%% fewer), %zu entries, %lld keyed raw (lossy decode); %s\n",
              out.c_str(), static_cast<long long>(lut->tokens), static_cast<long long>(lut->compressed_vocab),
              100.0 * (1.0 - static_cast<double>(lut->compressed_vocab) / static_cast<double>(lut->tokens)),
              lut->lut.size(), static_cast<long long>(lut->raw_keys), LutUnicodeVersions().c_str());
  return 0;
}

int Hash(int argc, char** argv) {
  std::string pack, tokens, shape, out;
  FlagSet flags("engramctl hash",
                "engramctl hash: hashes raw token ids [B][T] (little-endian int32) with a pack's layout and\n"
                "writes little-endian int64 [B][T][layers in manifest order][heads] head-local indices.");
  flags.String("pack", &pack, "pack directory (its manifest gives the hash config)");
  flags.String("tokens", &tokens, "raw token ids, little-endian int32");
  flags.String("shape", &shape, "B,T (batch, sequence length); B*T must equal the number of ids");
  flags.String("out", &out, "output file, little-endian int64");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (pack.empty() || tokens.empty() || shape.empty() || out.empty()) {
    return Fail(absl::InvalidArgumentError("--pack, --tokens, --shape and --out are all required"));
  }
  std::vector<std::string> parts = absl::StrSplit(shape, ',');
  int batch = 0, seq_len = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &batch) || !absl::SimpleAtoi(parts[1], &seq_len) ||
      batch < 1 || seq_len < 1) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--shape '", shape, "' is not B,T with B, T >= 1")));
  }
  auto m = LoadPackManifest(pack);
  if (!m.ok()) return Fail(m.status());
  auto ids = ReadInt32File(tokens);
  if (!ids.ok()) return Fail(ids.status());
  std::vector<LayerHashLayout> layouts;
  for (const auto& l : m->layers) layouts.push_back(l.layout);
  auto hasher = NgramHasher::Create(m->hash, layouts);
  if (!hasher.ok()) return Fail(hasher.status());
  std::vector<int64_t> hashes;
  if (absl::Status s = (*hasher)->HashAllLayers(*ids, batch, seq_len, &hashes); !s.ok()) return Fail(s);
  std::ofstream o(out, std::ios::binary);
  o.write(reinterpret_cast<const char*>(hashes.data()), static_cast<std::streamsize>(hashes.size() * 8));
  if (!o) return Fail(absl::InternalError(absl::StrCat("cannot write ", out)));
  std::printf("wrote %zu indices ([%d][%d][%zu][%d]) to %s\n", hashes.size(), batch, seq_len, m->layers.size(),
              (*hasher)->heads_per_layer(), out.c_str());
  return 0;
}

int Profile(int argc, char** argv) {
  std::string pack, tokens, out;
  double fraction = 0.1;
  int64_t seq_len = 4096;
  FlagSet flags("engramctl profile",
                "engramctl profile: counts which rows a token corpus uses (hashed with the pack's layout) and\n"
                "writes each layer's most used rows, hottest first: a hot set for `engramd --warm-from`, so\n"
                "a daemon with an empty cache starts with the rows real text needs most.");
  flags.String("pack", &pack, "pack directory");
  flags.String("tokens", &tokens, "raw token ids, little-endian int32 (e.g. a tokenized corpus)");
  flags.String("out", &out, "hot-set file to write");
  flags.Double("fraction", &fraction, "keep this share of each layer's rows (the most used ones)");
  flags.Int("seq-len", &seq_len, "the corpus is hashed as sequences of this many tokens");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (pack.empty() || tokens.empty() || out.empty()) {
    return Fail(absl::InvalidArgumentError("--pack, --tokens and --out are all required"));
  }
  auto m = LoadPackManifest(pack);
  if (!m.ok()) return Fail(m.status());
  auto ids = ReadInt32File(tokens);
  if (!ids.ok()) return Fail(ids.status());
  auto hot = ProfileTokens(*m, *ids, static_cast<uint32_t>(std::max<int64_t>(1, seq_len)), fraction);
  if (!hot.ok()) return Fail(hot.status());
  if (absl::Status s = WriteHotSetFile(*hot, out); !s.ok()) return Fail(s);
  for (const auto& l : hot->layers) {
    uint64_t total = 0;
    for (const auto& [row, count] : l.rows) total += count;
    std::printf("layer %d: %zu rows kept (the most used %.1f%%), %llu of the corpus's accesses\n", l.layer_id,
                l.rows.size(), 100 * fraction, static_cast<unsigned long long>(total));
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

absl::StatusOr<std::vector<float>> ReadF32File(const std::string& path, size_t expected, const char* what) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  const size_t bytes = static_cast<size_t>(in.tellg());
  if (bytes != expected * 4) {
    return absl::InvalidArgumentError(absl::StrCat(path, " has ", bytes, " bytes; ", what, " needs ", expected,
                                                   " f32 values = ", expected * 4, " bytes"));
  }
  std::vector<float> values(expected);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(values.data()), static_cast<std::streamsize>(bytes));
  if (!in) return absl::DataLossError(absl::StrCat("reading ", path));
  return values;
}

absl::Status WriteFile(const std::string& path, const void* data, size_t bytes) {
  std::ofstream o(path, std::ios::binary);
  o.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  return o ? absl::OkStatus() : absl::InternalError(absl::StrCat("cannot write ", path));
}

int Forward(int argc, char** argv) {
  std::string pack, weights_path, checkpoint, tokens, shape, hidden_path, out, device = "cpu", dump_embeddings,
      dump_indices;
  std::string daemon_uri, table_name, variant_name = "auto", stream_dtype = "f32";
  int64_t layer_id = -1, hc = 0, threads = 0;
  FlagSet flags("engramctl forward",
                "engramctl forward: runs one Engram layer (EngramLayer: hash, look up, dequantize, gate, fuse)\n"
                "on files, with rows read from the pack itself (no daemon) or from a running engramd.\n"
                "Two modules:\n"
                "  demo   the reference demo's: writes Y = V + ShortConv(V), the module's output before the\n"
                "         block's residual add; weights from --weights (the demo's state-dict names).\n"
                "  dsv41  DeepSeek-V4.1's: writes the updated streams h_k + g_k * v (g_k = 0 where the token\n"
                "         id is the table's dead id, -1); weights from the checkpoint directory --checkpoint\n"
                "         (config.json, the index and the shards holding layers.L.engram.*).\n"
                "Hidden states and output are little-endian [B][T][streams][D], f32 (or bf16 with\n"
                "--stream-dtype bf16, dsv41 only).");
  flags.String("pack", &pack, "pack directory (rows read from it directly)");
  flags.String("daemon", &daemon_uri,
               "instead of --pack: fetch rows from a running engramd (unix:///SOCKET or grpc://HOST:PORT)");
  flags.String("table", &table_name, "with --daemon: the table's name");
  flags.Int("layer", &layer_id, "layer id (as in the pack's manifest)");
  flags.String("variant", &variant_name,
               "demo, dsv41, or auto (the pack's or table's recorded module; demo when it has none)");
  flags.String("weights", &weights_path, "demo: safetensors file with the module's weights (reference names)");
  flags.String("checkpoint", &checkpoint, "dsv41: the Hugging Face checkpoint directory holding the weights");
  flags.String("tokens", &tokens, "raw token ids [B][T], little-endian int32");
  flags.String("shape", &shape, "B,T");
  flags.String("hidden", &hidden_path, "hidden states [B][T][streams][D], little-endian f32 or bf16");
  flags.String("stream-dtype", &stream_dtype, "f32, or bf16 (dsv41: the released model's stream dtype)");
  flags.Int("hc", &hc, "the hyper-connection streams (must match the weights; 0: take the weights')");
  flags.String("out", &out, "output file, [B][T][streams][D] in the stream dtype");
  flags.String("device", &device,
               "cpu (the CPU twin), cuda (fails without a device), or auto (cuda when a device is present)");
  flags.Int("threads", &threads, "CPU twin threads (0: every core)");
  flags.String("dump-embeddings", &dump_embeddings, "also write the dequantized rows E [B*T][M] (f32) here");
  flags.String("dump-indices", &dump_indices, "also write the head-local indices [B*T][heads] (uint32) here");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (pack.empty() == daemon_uri.empty() || (!daemon_uri.empty() && table_name.empty())) {
    return Fail(absl::InvalidArgumentError("give either --pack DIR or --daemon URI with --table NAME"));
  }
  if (tokens.empty() || shape.empty() || hidden_path.empty() || out.empty() || layer_id < 0 || hc < 0) {
    return Fail(absl::InvalidArgumentError("--layer, --tokens, --shape, --hidden and --out are all required"));
  }
  if (stream_dtype != "f32" && stream_dtype != "bf16") {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--stream-dtype '", stream_dtype, "' is not f32 or bf16")));
  }
  std::vector<std::string> parts = absl::StrSplit(shape, ',');
  int batch = 0, seq_len = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &batch) || !absl::SimpleAtoi(parts[1], &seq_len) ||
      batch < 1 || seq_len < 1) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--shape '", shape, "' is not B,T with B, T >= 1")));
  }
  EngramLayerOptions options;
  if (device == "cpu") {
    options.device = EngramDevice::kCpu;
  } else if (device == "cuda") {
    options.device = EngramDevice::kCuda;
  } else if (device == "auto") {
    options.device = EngramDevice::kAuto;
  } else {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--device '", device, "' is not cpu, cuda or auto")));
  }
  options.cpu_threads = static_cast<int>(threads);
  auto ids = ReadInt32File(tokens);
  if (!ids.ok()) return Fail(ids.status());

  // The row source: a daemon through libengram_client, or the pack itself.
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Client> client;
  std::shared_ptr<const TableHandle> handle;
  RowSource source;
  std::string recorded_module = "demo";
  RowDtype dtype = RowDtype::kF32;
  if (!daemon_uri.empty()) {
    auto connected = Client::Connect(daemon_uri);
    if (!connected.ok()) return Fail(connected.status());
    client = std::move(*connected);
    auto opened = client->OpenTable(table_name);
    if (!opened.ok()) return Fail(opened.status());
    handle = *opened;
    auto parsed = ParseRowDtype(handle->dtype());
    if (!parsed.ok()) return Fail(parsed.status());
    dtype = *parsed;
    recorded_module = handle->module();
  } else {
    // Rows straight from the pack: resident when it fits a modest budget, else NVMe with a cache.
    TableOptions table_options;
    table_options.dram_budget_bytes = 4ull << 30;
    auto table = Table::Open(pack, table_options);
    if (!table.ok()) return Fail(table.status());
    dtype = (*table)->manifest().row.dtype;
    recorded_module = (*table)->manifest().module;
    EngineOptions engine_options;
    engine_options.worker_threads = 0;
    engine_options.max_batch_rows = UINT64_MAX;
    engine = std::make_unique<Engine>(engine_options);
    const Table* t = table->get();
    if (absl::Status s = engine->AddTable(std::move(*table)); !s.ok()) return Fail(s);
    source.hasher = &t->hasher();
    source.dtype = dtype;
    source.row_dim = static_cast<int>(t->manifest().row.dim);
    Engine* e = engine.get();
    source.lookup = [e, t](int l, uint32_t n, absl::Span<const uint32_t> idx, absl::Span<uint8_t> rows) {
      return e->Lookup(*t, l, n, idx, rows, nullptr);
    };
  }
  auto variant = ParseEngramVariant(variant_name == "auto" ? recorded_module : variant_name);
  if (!variant.ok()) return Fail(variant.status());
  if (stream_dtype == "bf16" && *variant != EngramVariant::kDsv41) {
    return Fail(absl::InvalidArgumentError("--stream-dtype bf16 is for the dsv41 module"));
  }

  absl::StatusOr<std::unique_ptr<EngramLayer>> layer = absl::UnknownError("unset");
  const int id = static_cast<int>(layer_id);
  if (*variant == EngramVariant::kDemo) {
    if (weights_path.empty() || !checkpoint.empty()) {
      return Fail(absl::InvalidArgumentError("the demo module takes its weights from --weights FILE.safetensors"));
    }
    auto weights = LoadEngramWeights(weights_path);
    if (!weights.ok()) return Fail(weights.status());
    layer = client != nullptr ? EngramLayer::Create(client.get(), handle, id, std::move(*weights), options)
                              : EngramLayer::Create(std::move(source), id, std::move(*weights), options);
  } else {
    if (checkpoint.empty() || !weights_path.empty()) {
      return Fail(absl::InvalidArgumentError("the dsv41 module takes its weights from --checkpoint DIR"));
    }
    auto weights = LoadDsv41Weights(checkpoint, id, 0, static_cast<int>(threads));
    if (!weights.ok()) return Fail(weights.status());
    layer = client != nullptr ? EngramLayer::Create(client.get(), handle, id, std::move(*weights), options)
                              : EngramLayer::Create(std::move(source), id, std::move(*weights), options);
  }
  if (!layer.ok()) return Fail(layer.status());
  EngramLayer& l = **layer;
  if (hc != 0 && l.streams() != hc) {
    return Fail(absl::InvalidArgumentError(absl::StrCat("--hc ", hc, " but the weights have ", l.streams(),
                                                        " streams")));
  }
  const size_t state_values = static_cast<size_t>(batch) * seq_len * l.streams() * l.hidden_size();
  if (stream_dtype == "f32") {
    auto hidden = ReadF32File(hidden_path, state_values, "B x T x streams x D");
    if (!hidden.ok()) return Fail(hidden.status());
    std::vector<float> y(state_values);
    if (absl::Status s = l.ForwardHost(*ids, batch, seq_len, *hidden, absl::MakeSpan(y)); !s.ok()) return Fail(s);
    if (absl::Status s = WriteFile(out, y.data(), y.size() * 4); !s.ok()) return Fail(s);
  } else {
    std::ifstream in(hidden_path, std::ios::binary);
    std::vector<uint16_t> hidden(state_values);
    in.read(reinterpret_cast<char*>(hidden.data()), static_cast<std::streamsize>(state_values * 2));
    if (!in || in.peek() != EOF) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(hidden_path, " must hold exactly B x T x streams x D = ",
                                                          state_values, " bf16 values")));
    }
    std::vector<uint16_t> y(state_values);
    if (absl::Status s = l.ForwardHost(*ids, batch, seq_len, hidden, absl::MakeSpan(y)); !s.ok()) return Fail(s);
    if (absl::Status s = WriteFile(out, y.data(), y.size() * 2); !s.ok()) return Fail(s);
  }
  if (!dump_embeddings.empty()) {
    const auto& e = l.last_embeddings();
    if (absl::Status s = WriteFile(dump_embeddings, e.data(), e.size() * 4); !s.ok()) return Fail(s);
  }
  if (!dump_indices.empty()) {
    const auto& idx = l.last_indices();
    if (absl::Status s = WriteFile(dump_indices, idx.data(), idx.size() * 4); !s.ok()) return Fail(s);
  }
  std::printf("layer %d: %s module, B=%d T=%d streams=%d D=%d M=%d rows=%s streams=%s device=%s -> %s\n", id,
              EngramVariantName(l.variant()), batch, seq_len, l.streams(), l.hidden_size(), l.embed_width(),
              std::string(RowDtypeName(dtype)).c_str(), stream_dtype.c_str(),
              l.device() == EngramDevice::kCuda ? "cuda" : "cpu", out.c_str());
  if (!dump_embeddings.empty() && l.last_embeddings().empty()) {
    std::fprintf(stderr, "engramctl forward: --dump-embeddings: the CUDA path keeps its embeddings on the device\n");
  }
  return 0;
}

int Lookup(int argc, char** argv) {
  std::string daemon_uri, table_name, indices_path, out;
  int64_t layer_id = -1;
  FlagSet flags("engramctl lookup",
                "engramctl lookup: asks a running engramd for rows, as an engine would (libengram_client over\n"
                "gRPC or shared memory), and writes the raw row bytes it returns: for checking what a daemon\n"
                "serves against the pack or checkpoint it came from.");
  flags.String("daemon", &daemon_uri, "unix:///SOCKET (shared memory) or grpc://HOST:PORT");
  flags.String("table", &table_name, "the table's name");
  flags.Int("layer", &layer_id, "layer id");
  flags.String("indices", &indices_path,
               "head-local indices [tokens][heads], little-endian uint32 (as `engramctl hash` gives, narrowed)");
  flags.String("out", &out, "output file: [tokens][heads][row_bytes] raw rows");
  ParseOrExit(flags, argc, argv, 2, nullptr);
  if (daemon_uri.empty() || table_name.empty() || indices_path.empty() || out.empty() || layer_id < 0) {
    return Fail(absl::InvalidArgumentError("--daemon, --table, --layer, --indices and --out are all required"));
  }
  auto raw = ReadInt32File(indices_path);
  if (!raw.ok()) return Fail(raw.status());
  auto client = Client::Connect(daemon_uri);
  if (!client.ok()) return Fail(client.status());
  auto table = (*client)->OpenTable(table_name);
  if (!table.ok()) return Fail(table.status());
  const uint32_t heads = (*table)->heads();
  if (raw->empty() || raw->size() % heads != 0) {
    return Fail(absl::InvalidArgumentError(absl::StrCat(indices_path, " holds ", raw->size(),
                                                        " indices: not a positive multiple of the table's ", heads,
                                                        " heads")));
  }
  std::vector<uint32_t> indices(raw->begin(), raw->end());
  const uint32_t tokens = static_cast<uint32_t>(indices.size() / heads);
  std::vector<uint8_t> rows(indices.size() * (*table)->row_bytes());
  ClientLookupStats stats;
  if (absl::Status s = (*client)->Lookup(**table, static_cast<int>(layer_id), tokens, indices, absl::MakeSpan(rows),
                                         &stats);
      !s.ok()) {
    return Fail(s);
  }
  if (absl::Status s = WriteFile(out, rows.data(), rows.size()); !s.ok()) return Fail(s);
  std::printf("%u tokens x %u heads of layer %lld from %s: %zu bytes -> %s\n", tokens, heads,
              static_cast<long long>(layer_id), daemon_uri.c_str(), rows.size(), out.c_str());
  return 0;
}

int Main(int argc, char** argv) {
  const std::string a1 = argc > 1 ? argv[1] : "", a2 = argc > 2 ? argv[2] : "";
  if (a1 == "pack" && a2 == "create") return PackCreate(argc, argv);
  if (a1 == "pack" && a2 == "verify") return PackVerify(argc, argv);
  if (a1 == "pack" && a2 == "info") return PackInfo(argc, argv);
  if (a1 == "pack" && a2 == "checksum") return PackChecksum(argc, argv);
  if (a1 == "pack" && a2 == "import") return PackImport(argc, argv);
  if (a1 == "hash") return Hash(argc, argv);
  if (a1 == "lut") return Lut(argc, argv);
  if (a1 == "profile") return Profile(argc, argv);
  if (a1 == "forward") return Forward(argc, argv);
  if (a1 == "lookup") return Lookup(argc, argv);
  if (a1.empty() || a1 == "--help" || a1 == "-h" || a1 == "help") {
    std::puts(kUsage);
    return a1.empty() ? 2 : 0;
  }
  std::fprintf(stderr, "engramctl: unknown command '%s%s%s'\n\n%s\n", a1.c_str(), a2.empty() ? "" : " ", a2.c_str(),
               kUsage);
  return 2;
}

}  // namespace
}  // namespace engram

int main(int argc, char** argv) { return engram::Main(argc, argv); }
