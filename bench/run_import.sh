#!/usr/bin/env bash
# `engramctl pack import --hf` against `cp` of the same shard bytes to the same disk (the disk's
# limit for reading plus writing), the page cache dropped before each, interleaved REPEATS times;
# and the import's peak resident memory (it reads with pread: no file is mapped, so this is its
# anonymous memory). The checkpoint is written here in DeepSeek-V4.1's layout: two Engram layers
# of FP8 rows (256 values + 8 scales) of about GB/2 each, random bytes, row counts from the layout
# `--dry-run` derives.
# Usage: bench/run_import.sh WORK_DIR [GB] [REPEATS]   (root, to drop the page cache). Prints JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: bench/run_import.sh WORK_DIR [GB] [REPEATS]}
GB=${2:-4}
REPEATS=${3:-3}
CTL=${BUILD_DIR:-build}/service/engramctl
CKPT="$WORK/ckpt"
rm -rf "$WORK"
mkdir -p "$CKPT"
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# Per-order base size V gives 24 primes a little above V per layer: rows ~ 24 V.
V=$(/usr/bin/python3 -c "print(int($GB * 1e9 / 2 / 264 / 24))")
cat > "$CKPT/config.json" <<EOF
{"quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"},
 "text_config": {"engram_layer_ids": [1, 14], "engram_num_embeddings": [1000000000000, 1000000000000], "engram_max_ngram_size": 4,
  "engram_vocab_size": $V, "engram_n_heads": 8, "engram_head_dim": 256, "engram_pad_token_id": 2,
  "engram_compressed_vocab_size": 98627, "vocab_size": 129280, "hc_mult": 4, "hidden_size": 5120}}
EOF
ln -s "$(readlink -f tests/data/deepseek_v3_tokenizer.json)" "$CKPT/tokenizer.json"
# The row counts the hash addresses (the dry run needs config.json only), then the real config.
ROWS=$("$CTL" pack import --hf "$CKPT" --dry-run | sed -nE 's/^layer [0-9]+: rows ([0-9]+) addressed.*/\1/p' | paste -sd,)
sed -i "s/\"engram_num_embeddings\": \[1000000000000, 1000000000000\]/\"engram_num_embeddings\": [$ROWS]/" "$CKPT/config.json"
/usr/bin/python3 - "$CKPT" "$ROWS" <<'PY'
import json, os, struct, sys
import numpy as np
ckpt, rows = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
rng = np.random.default_rng(1)
weight_map = {}
for i, (layer, n) in enumerate(zip([1, 14], rows)):
    name = "model-%05d-of-00002.safetensors" % (i + 1)
    tensors = [("layers.%d.engram.embed.weight" % layer, "F8_E4M3", [n, 256], n * 256),
               ("layers.%d.engram.embed.scale" % layer, "F8_E8M0", [n, 8], n * 8)]
    header, off = {}, 0
    for t, dt, shape, size in tensors:
        header[t] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}
        off += size
        weight_map[t] = name
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(ckpt, name), "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _, _, _, size in tensors:
            left = size
            while left > 0:
                chunk = min(left, 64 << 20)
                f.write(rng.bytes(chunk))
                left -= chunk
with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)
PY
SHARD_BYTES=$(cat "$CKPT"/*.safetensors | wc -c)
for r in $(seq 1 "$REPEATS"); do
  rm -rf "$WORK/cp" "$WORK/pack"
  mkdir -p "$WORK/cp"
  drop_caches
  start=$(date +%s.%N)
  cp "$CKPT"/*.safetensors "$WORK/cp/" && sync
  cp_s=$(echo "$(date +%s.%N) - $start" | bc)
  rm -rf "$WORK/cp"
  drop_caches
  start=$(date +%s.%N)
  /usr/bin/time -f "%M" -o "$WORK/rss_kb" "$CTL" pack import --hf "$CKPT" --out "$WORK/pack" >/dev/null 2>"$WORK/import.log"
  sync
  import_s=$(echo "$(date +%s.%N) - $start" | bc)
  printf '{"round": %d, "shard_bytes": %d, "cp_s": %.3f, "import_s": %.3f, "import_vs_cp": %.3f, "import_peak_rss_mb": %.1f}\n' \
    "$r" "$SHARD_BYTES" "$cp_s" "$import_s" "$(echo "$cp_s / $import_s" | bc -l)" "$(echo "$(cat "$WORK/rss_kb") / 1024" | bc -l)"
done
