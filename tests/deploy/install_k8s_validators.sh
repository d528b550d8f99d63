#!/usr/bin/env bash
# Installs the npm packages tests/deploy/check_manifests.mjs uses into DIR (idempotent):
#   kubernetes-models@4.5.1        validators generated from the Kubernetes OpenAPI schema
#   @kubernetes/client-node@1.3.0  the official client; its serializer knows every API field
#   js-yaml@4.1.0                  to read the manifests
# Then: ENGRAM_NODE_MODULES=DIR/node_modules node tests/deploy/check_manifests.mjs FILE...
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 2; }
dir=$1
command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1 ||
  { echo "install_k8s_validators.sh: npm and node are required" >&2; exit 1; }
pkgs=("kubernetes-models@4.5.1" "@kubernetes/client-node@1.3.0" "js-yaml@4.1.0")
installed() {
  local pj="$dir/node_modules/$1/package.json"
  [ -f "$pj" ] && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' "$pj" "$2"
}
missing=()
for spec in "${pkgs[@]}"; do
  name=${spec%@*}
  installed "$name" "${spec##*@}" || missing+=("$spec")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_k8s_validators.sh: already installed in $dir/node_modules"
  exit 0
fi
mkdir -p "$dir"
echo "install_k8s_validators.sh: installing ${missing[*]} into $dir"
npm install --prefix "$dir" --no-audit --no-fund --save-exact "${missing[@]}" >/dev/null
