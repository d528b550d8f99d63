#!/usr/bin/env bash
# The Kubernetes manifests in deploy/kubernetes against the Kubernetes API schema
# (check_manifests.mjs: kubernetes-models and @kubernetes/client-node from npm), and the check
# shown to reject a misspelled field and a wrong type in a copy of the DaemonSet.
#   tests/deploy/k8s_manifests_test.sh SOURCE_DIR NODE_DIR     (exit 77: no node/npm here)
set -euo pipefail
SRC=$1
NODE_DIR=$2
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { echo "skipped: needs node and npm"; exit 77; }
"$SRC/tests/deploy/install_k8s_validators.sh" "$NODE_DIR"
export ENGRAM_NODE_MODULES="$NODE_DIR/node_modules"
# Both validators must load under this node (Debian 12's is 18); if not, say so and skip.
if ! node --input-type=module -e "
  import path from 'node:path'; import { pathToFileURL } from 'node:url'; import { createRequire } from 'node:module';
  const m = process.env.ENGRAM_NODE_MODULES;
  await import(pathToFileURL(path.join(m, '@kubernetes/client-node/dist/serializer.js')).href);
  createRequire(path.join(m, 'x.js'))('kubernetes-models/apps/v1');" 2>"$NODE_DIR/load-error.txt"; then
  echo "skipped: the validators do not load under node $(node --version): $(head -c 300 "$NODE_DIR/load-error.txt")"
  exit 77
fi
CHECK="node $SRC/tests/deploy/check_manifests.mjs"
$CHECK "$SRC"/deploy/kubernetes/*.yaml
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
expect_refused() {  # NAME SED-EXPRESSION WANTED-TEXT
  sed "$2" "$SRC/deploy/kubernetes/engramd-daemonset.yaml" >"$T/$1.yaml"
  if $CHECK "$T/$1.yaml" >"$T/$1.out" 2>&1; then
    echo "k8s_manifests_test: the $1 copy was accepted"; cat "$T/$1.out"; exit 1
  fi
  grep -q "$3" "$T/$1.out" || { echo "k8s_manifests_test: the $1 copy was refused without '$3':"; cat "$T/$1.out"; exit 1; }
  echo "k8s_manifests_test: $1 refused: $(grep -m1 "$3" "$T/$1.out")"
}
expect_refused misspelled 's/readinessProbe:/readinesProbe:/' "unknown field spec.template.spec.containers\[0\].readinesProbe"
expect_refused wrong-type 's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: soon/' "must be integer"
