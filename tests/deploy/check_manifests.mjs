// Checks Kubernetes manifests against the Kubernetes API's own schema, two ways:
//  - kubernetes-models (npm): validators generated from the API's OpenAPI schema check every
//    field's type, enums and required fields;
//  - @kubernetes/client-node (npm, the official JavaScript client): its ObjectSerializer, also
//    generated from the OpenAPI schema, keeps only the fields the API defines. A field that does
//    not survive a round trip through it is not part of the API (a misspelling, a wrong level):
//    reported as unknown, as `kubectl apply --validate=strict` would.
// Usage: ENGRAM_NODE_MODULES=DIR/node_modules node check_manifests.mjs FILE.yaml...
// Exit 0 when every document of every file is valid; 1 with one line per problem otherwise.
import path from "node:path";
import fs from "node:fs";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const modules = process.env.ENGRAM_NODE_MODULES;
if (!modules) {
  console.error("check_manifests: set ENGRAM_NODE_MODULES (tests/deploy/install_k8s_validators.sh)");
  process.exit(2);
}
const load = (p) => import(pathToFileURL(path.join(modules, p)).href);
const require = createRequire(path.join(modules, "noop.js"));
const yaml = require("js-yaml");
const { ObjectSerializer } = await load("@kubernetes/client-node/dist/serializer.js");

// apiVersion -> the kubernetes-models module that holds its kinds ("v1", "apps/v1").
const modelModule = (apiVersion) => `kubernetes-models/${apiVersion}`;
// apiVersion + kind -> the client's model name: v1 Pod -> V1Pod, apps/v1 DaemonSet -> V1DaemonSet.
const clientType = (apiVersion, kind) => {
  const version = apiVersion.split("/").pop();
  return version.charAt(0).toUpperCase() + version.slice(1) + kind;
};

// Paths present in `original` and missing from `kept`.
function dropped(original, kept, at, out) {
  if (Array.isArray(original)) {
    original.forEach((v, i) => dropped(v, Array.isArray(kept) ? kept[i] : undefined, `${at}[${i}]`, out));
  } else if (original !== null && typeof original === "object") {
    for (const [k, v] of Object.entries(original)) {
      const here = at ? `${at}.${k}` : k;
      if (kept === null || typeof kept !== "object" || !(k in kept)) out.push(here);
      else dropped(v, kept[k], here, out);
    }
  }
  return out;
}

let problems = 0;
for (const file of process.argv.slice(2)) {
  const before = problems;
  const docs = yaml.loadAll(fs.readFileSync(file, "utf8")).filter((d) => d);
  for (const [n, doc] of docs.entries()) {
    const where = `${file} document ${n + 1} (${doc.kind ?? "no kind"} ${doc.metadata?.name ?? ""})`;
    if (!doc.apiVersion || !doc.kind) {
      console.log(`${where}: no apiVersion or kind`);
      problems++;
      continue;
    }
    let Model;
    try {
      Model = require(modelModule(doc.apiVersion))[doc.kind];
    } catch (e) {
      Model = undefined;
    }
    if (!Model) {
      console.log(`${where}: ${doc.apiVersion} ${doc.kind} is not a Kubernetes API kind`);
      problems++;
      continue;
    }
    try {
      new Model(doc).validate();
    } catch (e) {
      console.log(`${where}: ${e.message}`);
      problems++;
    }
    const type = clientType(doc.apiVersion, doc.kind);
    const kept = ObjectSerializer.serialize(ObjectSerializer.deserialize(doc, type), type);
    for (const p of dropped(doc, kept, "", [])) {
      console.log(`${where}: unknown field ${p}`);
      problems++;
    }
  }
  if (problems === before) console.log(`check_manifests: ${file}: ${docs.length} document(s) valid`);
}
process.exit(problems === 0 ? 0 : 1);
