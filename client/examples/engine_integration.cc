// A miniature engine integration: takes token ids (no tokenizer here), hashes them with the
// table's Engram layout, prefetches every later layer's rows when a step starts, looks up every
// Engram layer in order, and prints a checksum of each layer's rows.
//
//   engram-example-engine unix:///run/engram/engramd.sock demo tokens.i32 [batch] [seq_len]
//
// The rows would feed the Engram module (gating + fusion) of each layer; here they are checksummed
// so two runs, or two transports, can be compared.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "engram/client.h"

namespace {

uint64_t Fnv1a(const std::vector<uint8_t>& bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (uint8_t b : bytes) h = (h ^ b) * 0x100000001b3ULL;
  return h;
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "engram-example-engine: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s URI TABLE TOKENS.i32 [batch] [seq_len]\n", argv[0]);
    return 2;
  }
  const std::string uri = argv[1], table_name = argv[2], tokens_path = argv[3];
  const uint32_t batch = argc > 4 ? static_cast<uint32_t>(std::atoi(argv[4])) : 2;
  const uint32_t seq_len = argc > 5 ? static_cast<uint32_t>(std::atoi(argv[5])) : 64;
  std::ifstream in(tokens_path, std::ios::binary);
  std::vector<int32_t> tokens(static_cast<size_t>(batch) * seq_len);
  if (!in.read(reinterpret_cast<char*>(tokens.data()), static_cast<std::streamsize>(tokens.size() * 4))) {
    return Fail(absl::InvalidArgumentError(tokens_path + " holds fewer than batch x seq_len token ids"));
  }

  auto client = engram::Client::Connect(uri);
  if (!client.ok()) return Fail(client.status());
  auto table = (*client)->OpenTable(table_name);
  if (!table.ok()) return Fail(table.status());
  const engram::NgramHasher& hasher = (*table)->hasher();

  // Indices for every layer are known before the step: hash once, prefetch the later layers.
  std::vector<int64_t> compressed(tokens.size());
  if (absl::Status s = hasher.Compress(tokens, absl::MakeSpan(compressed)); !s.ok()) return Fail(s);
  const std::vector<int> layers = (*table)->layer_ids();
  std::vector<std::vector<uint32_t>> indices(layers.size());
  std::vector<int64_t> local(tokens.size() * hasher.heads_per_layer());
  for (size_t l = 0; l < layers.size(); ++l) {
    hasher.HashCompressed(compressed, static_cast<int>(batch), static_cast<int>(seq_len), static_cast<int>(l),
                          absl::MakeSpan(local));
    indices[l].assign(local.begin(), local.end());
    if (l > 0) {
      if (absl::Status s = (*client)->Prefetch(**table, layers[l], static_cast<uint32_t>(tokens.size()), indices[l]);
          !s.ok()) {
        return Fail(s);
      }
    }
  }
  for (size_t l = 0; l < layers.size(); ++l) {
    std::vector<uint8_t> rows(indices[l].size() * (*table)->row_bytes());
    engram::ClientLookupStats stats;
    if (absl::Status s = (*client)->Lookup(**table, layers[l], static_cast<uint32_t>(tokens.size()), indices[l],
                                           absl::MakeSpan(rows), &stats);
        !s.ok()) {
      return Fail(s);
    }
    std::printf("layer %d tokens %zu rows %zu checksum %016llx\n", layers[l], tokens.size(), indices[l].size(),
                static_cast<unsigned long long>(Fnv1a(rows)));
  }
  return 0;
}
