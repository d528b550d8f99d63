#!/usr/bin/env node
// Tokenizes text documents into a token trace for `engram-bench simulate` and `--workload trace:`:
// little-endian int32 token ids, id 0 (BOS) before each document, as tests/data's traces are made.
// The tokenizer is Hugging Face's own (npm package `tokenizers`, see
// tests/crosscheck/install_hf_tokenizers.sh), so the ids are the model's, not an approximation.
//
// Usage: node bench/make_trace.js TOKENIZER_JSON OUT.i32 [--max-tokens N] FILE...
//   Documents are the files, in the order given; with --max-tokens the trace stops after the
//   document that reaches N tokens (whole documents only). Progress goes to stderr.
//   The `tokenizers` module is loaded from $ENGRAM_NODE_MODULES (a node_modules folder) when set.
'use strict';

const fs = require('fs');
const path = require('path');

function usage(msg) {
  if (msg) process.stderr.write(`make_trace: ${msg}\n`);
  process.stderr.write('usage: node bench/make_trace.js TOKENIZER_JSON OUT.i32 [--max-tokens N] FILE...\n');
  process.exit(2);
}

async function main() {
  const args = process.argv.slice(2);
  let maxTokens = Infinity;
  const positional = [];
  for (let i = 0; i < args.length; ++i) {
    if (args[i] === '--max-tokens') {
      maxTokens = Number(args[++i]);
      if (!Number.isInteger(maxTokens) || maxTokens <= 0) usage('--max-tokens wants a positive integer');
    } else if (args[i] === '--help' || args[i] === '-h') {
      usage();
    } else {
      positional.push(args[i]);
    }
  }
  if (positional.length < 3) usage('a tokenizer, an output file and at least one document are needed');
  const [tokPath, outPath, ...files] = positional;
  const dir = process.env.ENGRAM_NODE_MODULES;
  const hf = require(dir ? path.join(path.resolve(dir), 'tokenizers') : 'tokenizers');
  const tok = hf.Tokenizer.fromFile(tokPath);
  const ids = [];
  let docs = 0;
  for (const file of files) {
    const text = fs.readFileSync(file, 'utf8');
    const enc = await tok.encode(text, null, { addSpecialTokens: false });
    ids.push(0);
    for (const id of enc.getIds()) ids.push(id);
    ++docs;
    if (docs % 50 === 0) process.stderr.write(`make_trace: ${docs} documents, ${ids.length} tokens\n`);
    if (ids.length >= maxTokens) break;
  }
  const out = Buffer.alloc(ids.length * 4);
  ids.forEach((id, i) => out.writeInt32LE(id, i * 4));
  fs.writeFileSync(outPath, out);
  process.stderr.write(`make_trace: wrote ${outPath}: ${docs} documents, ${ids.length} tokens\n`);
}

main().catch((e) => {
  process.stderr.write(`make_trace: ${e.message}\n`);
  process.exit(1);
});
