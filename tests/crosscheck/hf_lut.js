#!/usr/bin/env node
// Test-side reference for the Engram token compression table ("lut"), built with
// Hugging Face's own `tokenizers` library (npm package `tokenizers`) instead of our
// C++ code, following the rules in shared/docs/HASHING.md ("Lut from a tokenizer.json"):
//   text = decode([tid]) with special tokens kept;
//   key  = id_to_token(tid) if text has U+FFFD, else normalize(text) (or text when empty);
//   lut[tid] = index of key in order of first appearance.
// normalize = HF normalizers NFKC, NFD, StripAccents, Lowercase, Replace(/[ \t\r\n]+/ -> " "),
// then HF Strip unless the string is exactly " ".
//
// Usage: node hf_lut.js TOKENIZER_JSON OUT.i32 [--vocab-size N]
//   --vocab-size N: write N entries (the model's embedding rows); ids past the tokenizer
//   take the last token's id, as `engramctl lut --vocab-size` does. Default: the tokenizer's length.
//   The `tokenizers` module is loaded from $ENGRAM_NODE_MODULES (a node_modules folder,
//   see install_hf_tokenizers.sh) when set, else by normal Node resolution (this script's
//   folder and $NODE_PATH, then the current directory).
// Output: one little-endian int32 per token id, 0 <= tid < vocab size with added tokens (or N).
'use strict';

const fs = require('fs');
const path = require('path');

function loadTokenizers() {
  const dir = process.env.ENGRAM_NODE_MODULES;
  if (dir) {
    return require(path.join(path.resolve(dir), 'tokenizers'));
  }
  try {
    return require('tokenizers'); // next to this script, or $NODE_PATH
  } catch (e) {
    try {
      return require(require.resolve('tokenizers', { paths: [process.cwd()] }));
    } catch (e2) {
      process.stderr.write(
        'hf_lut: cannot load the npm package `tokenizers`; install it with\n' +
          '  tests/crosscheck/install_hf_tokenizers.sh DIR\n' +
          'and set ENGRAM_NODE_MODULES=DIR/node_modules\n',
      );
      process.exit(1);
    }
  }
}

// A normalizer can only be built with a Regex pattern through a tokenizer.json, so
// build a throw-away tokenizer that carries the wanted normalizer and take it back.
function normalizerFromJson(hf, spec) {
  const doc = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [],
    normalizer: spec,
    pre_tokenizer: null,
    post_processor: null,
    decoder: null,
    model: { type: 'WordLevel', vocab: { '[UNK]': 0 }, unk_token: '[UNK]' },
  };
  const n = hf.Tokenizer.fromString(JSON.stringify(doc)).getNormalizer();
  if (!n) throw new Error('tokenizers did not return the normalizer');
  return n;
}

async function main() {
  const args = process.argv.slice(2);
  let rows = 0;
  const vi = args.indexOf('--vocab-size');
  if (vi >= 0) {
    rows = Number(args[vi + 1]);
    args.splice(vi, 2);
  }
  if (args.length !== 2 || !Number.isInteger(rows) || rows < 0) {
    process.stderr.write('usage: node hf_lut.js TOKENIZER_JSON OUT.i32 [--vocab-size N]\n');
    process.exit(2);
  }
  const [tokPath, outPath] = args;
  const hf = loadTokenizers();
  const t0 = Date.now();

  const collapse = normalizerFromJson(hf, {
    type: 'Sequence',
    normalizers: [
      { type: 'NFKC' },
      { type: 'NFD' },
      { type: 'StripAccents' },
      { type: 'Lowercase' },
      { type: 'Replace', pattern: { Regex: '[ \\t\\r\\n]+' }, content: ' ' },
    ],
  });
  const strip = hf.stripNormalizer(true, true);
  const normalize = (s) => {
    const c = collapse.normalizeString(s);
    return c === ' ' ? c : strip.normalizeString(c);
  };

  const tok = hf.Tokenizer.fromFile(tokPath);
  const n = tok.getVocabSize(true);
  const lut = new Int32Array(n);
  const ids = new Map();
  const CHUNK = 8192;
  for (let base = 0; base < n; base += CHUNK) {
    const batch = [];
    for (let tid = base; tid < Math.min(n, base + CHUNK); tid++) batch.push([tid]);
    const texts = await tok.decodeBatch(batch, false);
    for (let i = 0; i < texts.length; i++) {
      const tid = base + i;
      const text = texts[i];
      let key;
      if (text.includes('\uFFFD')) {
        key = tok.idToToken(tid);
        if (key == null) key = text;
      } else {
        const norm = normalize(text);
        key = norm.length > 0 ? norm : text;
      }
      let id = ids.get(key);
      if (id === undefined) {
        id = ids.size;
        ids.set(key, id);
      }
      lut[tid] = id;
    }
  }

  // Ids are expected to be 0..n-1 without holes; say so when a tokenizer breaks that
  // (engramctl refuses such a file, here a hole gets the empty decode as its key).
  let holes = 0;
  for (let tid = 0; tid < n; tid++) if (tok.idToToken(tid) == null) holes++;
  const vocab = tok.getVocab(true);
  let beyond = 0;
  for (const k in vocab) if (vocab[k] >= n) beyond++;

  if (rows === 0) rows = n;
  if (rows < n) throw new Error(`--vocab-size ${rows} is below the tokenizer's ${n} tokens`);
  const buf = Buffer.alloc(rows * 4);
  for (let i = 0; i < rows; i++) buf.writeInt32LE(lut[Math.min(i, n - 1)], i * 4);
  fs.writeFileSync(outPath, buf);
  const secs = ((Date.now() - t0) / 1000).toFixed(1);
  let msg = `hf_lut: ${tokPath}: ${n} tokens, ${ids.size} distinct ids, wrote ${rows} entries to ${outPath} (${secs} s)\n`;
  if (holes) msg += `hf_lut: warning: ${holes} ids below ${n} have no token\n`;
  if (beyond) msg += `hf_lut: warning: ${beyond} tokens have ids >= ${n} and are left out\n`;
  process.stderr.write(msg);
}

main().catch((e) => {
  process.stderr.write(`hf_lut: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
