#!/usr/bin/python3
"""`engramctl pack import --hf`: a small checkpoint written here in exactly DeepSeek-V4.1's released
layout (config.json with the Engram fields under text_config, model.safetensors.index.json, two
shards with the FP8 table and its E8M0 scales as raw bytes among other tensors, tokenizer.json) is
imported and served by a real engramd: every row returned over gRPC and over shared memory equals the
bytes in the shards
(the 64 value bytes, then the 2 scale bytes). The derived layout equals an independent statement of
HASHING.md (a prime search and numpy's own default_rng here). `--dry-run` on V4.1-Flash's real
Engram settings prints the sums and multipliers HASHING.md section 6 gives. Checkpoints whose
engram_num_embeddings disagree, with a truncated shard, a header with out-of-file offsets or
overlapping tensors are refused with an error naming what is wrong, and leave no pack.
Run with /usr/bin/python3 (Debian's numpy and grpc modules load only there).
"""
import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ARGS = None
LAYERS = [1, 3]
MAX_NGRAM, HEADS, DIM, PAD = 3, 2, 64, 2
VOCAB = [50, 60]           # engram_vocab_size as a list (one base size per order)
COMPRESSED = 98627         # the DeepSeek-V3 tokenizer's compressed vocabulary
EMBED_ROWS = 129280


def is_prime(n):
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def head_primes():
    """HASHING.md section 3: one `seen` set over all layers in order, then orders, then heads."""
    seen, out = set(), {}
    for layer in LAYERS:
        primes = []
        for n in range(2, MAX_NGRAM + 1):
            start = VOCAB[n - 2] - 1
            for _ in range(HEADS):
                p = start + 1
                while not is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                primes.append(p)
                start = p
        out[layer] = primes
    return out


def multipliers(layer, compressed_vocab, seed=0):
    """HASHING.md section 2, with numpy's own generator."""
    half_bound = max(1, ((2**63 - 1) // compressed_vocab) // 2)
    r = np.random.default_rng(seed + 10007 * layer).integers(0, half_bound, size=MAX_NGRAM, dtype=np.int64)
    return [int(x) * 2 + 1 for x in r]


def write_safetensors(path, tensors, corrupt=None):
    """tensors: list of (name, dtype, shape, bytes). `corrupt` may rewrite the header dict."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    if corrupt:
        corrupt(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


class Checkpoint:
    """A V4.1-layout checkpoint in `root`: layer 1's table in shard 1, layer 3's in shard 2."""

    def __init__(self, root, rng, rows_delta=0, corrupt_shard2=None):
        os.makedirs(root)
        self.root = root
        primes = head_primes()
        self.rows = {l: sum(primes[l]) for l in LAYERS}
        config = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                  "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"},
                  "text_config": {"engram_layer_ids": LAYERS,
                                  "engram_num_embeddings": [self.rows[1], self.rows[3] + rows_delta],
                                  "engram_max_ngram_size": MAX_NGRAM, "engram_vocab_size": VOCAB,
                                  "engram_n_heads": HEADS, "engram_head_dim": DIM, "engram_pad_token_id": PAD,
                                  "engram_compressed_vocab_size": COMPRESSED, "hc_mult": 4, "hidden_size": 128,
                                  "rms_norm_eps": 1e-20, "vocab_size": EMBED_ROWS}}
        dump_json(config, os.path.join(root, "config.json"))
        os.symlink(os.path.abspath(os.path.join(ARGS.data_dir, "deepseek_v3_tokenizer.json")), os.path.join(root, "tokenizer.json"))
        self.values, self.scales = {}, {}
        shards = {}
        for i, layer in enumerate(LAYERS):
            n = self.rows[layer]
            self.values[layer] = rng.integers(0, 256, size=(n, DIM), dtype=np.uint8)
            self.scales[layer] = rng.integers(110, 140, size=(n, DIM // 32), dtype=np.uint8)
            other = rng.integers(0, 256, size=(4, 16), dtype=np.uint8).tobytes()
            shards["model-%05d-of-00002.safetensors" % (i + 1)] = [
                ("layers.%d.attn.wq.weight" % layer, "BF16", (4, 8), other),
                ("layers.%d.engram.embed.weight" % layer, "F8_E4M3", (n, DIM), self.values[layer].tobytes()),
                ("layers.%d.engram.embed.scale" % layer, "F8_E8M0", (n, DIM // 32), self.scales[layer].tobytes()),
                ("layers.%d.engram.q_weight" % layer, "BF16", (4, 8), other),
            ]
        weight_map = {}
        for i, (file, tensors) in enumerate(sorted(shards.items())):
            write_safetensors(os.path.join(root, file), tensors, corrupt_shard2 if i == 1 else None)
            for name, _, _, _ in tensors:
                weight_map[name] = file
        dump_json({"metadata": {"total_size": 0}, "weight_map": weight_map},
                  os.path.join(root, "model.safetensors.index.json"))

    def row_bytes(self, layer, row):
        return self.values[layer][row].tobytes() + self.scales[layer][row].tobytes()


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def run(*args):
    return subprocess.run([ARGS.engramctl] + list(args), capture_output=True, text=True)


class HfImportTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="engram-hf-")
        self.rng = np.random.default_rng(7)

    def tearDown(self):
        self.tmp.cleanup()

    def path(self, *parts):
        return os.path.join(self.tmp.name, *parts)

    def test_dry_run_prints_v41_flash_layout(self):
        os.makedirs(self.path("v41"))
        config = {"text_config": {"engram_layer_ids": [1, 14], "engram_num_embeddings": [384006168, 384016682],
                                  "engram_max_ngram_size": 4, "engram_vocab_size": 16000000, "engram_n_heads": 8,
                                  "engram_head_dim": 256, "engram_pad_token_id": 2,
                                  "engram_compressed_vocab_size": 99092, "hc_mult": 4, "hidden_size": 5120,
                                  "rms_norm_eps": 1e-20, "vocab_size": 129280}}
        dump_json(config, self.path("v41", "config.json"))
        out = run("pack", "import", "--hf", self.path("v41"), "--dry-run")  # config.json alone
        self.assertEqual(out.returncode, 0, out.stderr)
        # HASHING.md section 6, as the spec states them.
        self.assertIn("layer 1: multipliers [76632096046245, 4839876093313, 35959672319349, 73987337458391]", out.stdout)
        self.assertIn("layer 14: multipliers [67716810739261, 51510806800915, 30921347202721, 82619226485591]",
                      out.stdout)
        self.assertIn("layer 1: rows 384006168 addressed, engram_num_embeddings 384006168 (equal: ok)", out.stdout)
        self.assertIn("layer 14: rows 384016682 addressed, engram_num_embeddings 384016682 (equal: ok)", out.stdout)
        primes1 = out.stdout.split("layer 1: head primes ")[1].split(" (")[0].split()
        primes14 = out.stdout.split("layer 14: head primes ")[1].split(" (")[0].split()
        self.assertEqual((primes1[0], primes1[-1], len(primes1)), ("16000057", "16000463", 24))
        self.assertEqual((primes14[0], primes14[-1], len(primes14)), ("16000477", "16000889", 24))

    def test_import_serves_the_checkpoints_bytes(self):
        ck = Checkpoint(self.path("ckpt"), self.rng)
        pack = self.path("pack")
        out = run("pack", "import", "--hf", ck.root, "--out", pack, "--name", "v41small")
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("98627 compressed ids", out.stderr)
        manifest = load_json(os.path.join(pack, "manifest.json"))
        self.assertEqual(manifest["row"], {"dtype": "fp8_e4m3_ue8m0x32", "dim": DIM, "bytes": DIM + DIM // 32})
        self.assertEqual(manifest["hash"]["dead_token_id"], -1)
        self.assertEqual(manifest["hash"]["compressed_vocab"], COMPRESSED)
        primes = head_primes()
        for layer in manifest["layers"]:
            self.assertEqual(layer["head_rows"], primes[layer["id"]])
            self.assertEqual(layer["multipliers"], multipliers(layer["id"], COMPRESSED))
            self.assertIn("block_checksums", layer)
        self.assertEqual(read_bytes(os.path.join(pack, "compress_lut.i32")), read_bytes(ARGS.lut))
        verify = run("pack", "verify", pack)
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)

        # Served: every row of every head over gRPC equals the shard's bytes.
        gen = self.path("gen")
        os.makedirs(gen)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ARGS.proto_dir, "--python_out", gen,
                        "--grpc_python_out", gen, "engram/v1/engram.proto"], check=True)
        sys.path.insert(0, gen)
        import grpc
        from engram.v1 import engram_pb2, engram_pb2_grpc
        ports = self.path("ports.json")
        log = open(self.path("engramd.log"), "w")
        daemon = subprocess.Popen([ARGS.engramd, "--pack", pack, "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                                   "--ports-file", ports, "--socket", self.path("engramd.sock"),
                                   "--require-verified"], stdout=log, stderr=log)
        try:
            deadline = time.time() + 60
            while not os.path.exists(ports):
                if daemon.poll() is not None or time.time() > deadline:
                    self.fail("engramd did not start: " + read_bytes(log.name).decode())
                time.sleep(0.05)
            channel = grpc.insecure_channel("127.0.0.1:%d" % load_json(ports)["grpc_port"],
                                            options=[("grpc.max_receive_message_length", -1)])
            stub = engram_pb2_grpc.EngramStub(channel)
            row_bytes = DIM + DIM // 32
            heads = (MAX_NGRAM - 1) * HEADS
            for layer in LAYERS:
                head_rows = primes[layer]
                offsets = np.concatenate([[0], np.cumsum(head_rows)[:-1]])
                tokens = max(head_rows)
                idx = np.array([[t % head_rows[h] for h in range(heads)] for t in range(tokens)], dtype="<u4")
                reply = stub.Lookup(engram_pb2.LookupRequest(table="v41small", layer=layer, num_tokens=tokens,
                                                             indices=idx.tobytes()), timeout=30)
                got = np.frombuffer(reply.rows, dtype=np.uint8).reshape(tokens, heads, row_bytes)
                # The same rows over shared memory (libengram_client through `engramctl lookup`).
                idx.tofile(self.path("idx.u32"))
                out = run("lookup", "--daemon", "unix://" + self.path("engramd.sock"), "--table", "v41small",
                          "--layer", str(layer), "--indices", self.path("idx.u32"), "--out", self.path("rows.shm"))
                self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
                shm = np.fromfile(self.path("rows.shm"), dtype=np.uint8).reshape(tokens, heads, row_bytes)
                for t in range(tokens):
                    for h in range(heads):
                        want = ck.row_bytes(layer, int(offsets[h] + idx[t, h]))
                        self.assertEqual(got[t, h].tobytes(), want, "gRPC: layer %d token %d head %d" % (layer, t, h))
                        self.assertEqual(shm[t, h].tobytes(), want, "shm: layer %d token %d head %d" % (layer, t, h))
            channel.close()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
            log.close()

    def test_layer_subset_is_explicit_and_keeps_the_full_derivation(self):
        ck = Checkpoint(self.path("ckpt"), self.rng)
        pack = self.path("pack3")
        out = run("pack", "import", "--hf", ck.root, "--out", pack, "--layers", "3")
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        manifest = load_json(os.path.join(pack, "manifest.json"))
        self.assertEqual(manifest["hash"]["kind"], "explicit")
        self.assertEqual([l["id"] for l in manifest["layers"]], [3])
        self.assertEqual(manifest["layers"][0]["head_rows"], head_primes()[3])  # after layer 1's primes

    def assert_refused(self, ck, needles):
        pack = self.path("refused")
        out = run("pack", "import", "--hf", ck.root, "--out", pack)
        self.assertNotEqual(out.returncode, 0, out.stdout)
        for needle in needles:
            self.assertIn(needle, out.stderr)
        self.assertFalse(os.path.exists(os.path.join(pack, "manifest.json")), "a refused import left a pack")

    def test_num_embeddings_that_disagree_are_refused(self):
        ck = Checkpoint(self.path("ckpt"), self.rng, rows_delta=5)
        rows = ck.rows[3]
        self.assert_refused(ck, ["layer 3", "engram_num_embeddings[1] says %d" % (rows + 5), "has %d rows" % rows])

    def test_truncated_shard_is_refused(self):
        ck = Checkpoint(self.path("ckpt"), self.rng)
        shard = os.path.join(ck.root, "model-00002-of-00002.safetensors")
        os.truncate(shard, os.path.getsize(shard) - 1000)
        self.assert_refused(ck, ["model-00002-of-00002.safetensors", "outside the file"])

    def test_header_with_out_of_file_offsets_is_refused(self):
        def stretch(header):
            header["layers.3.engram.embed.scale"]["data_offsets"][1] += 10**9
        ck = Checkpoint(self.path("ckpt"), self.rng, corrupt_shard2=stretch)
        self.assert_refused(ck, ["tensor layers.3.engram.embed.scale", "outside the file"])

    def test_overlapping_tensors_are_refused(self):
        def overlap(header):
            w = header["layers.3.engram.embed.weight"]["data_offsets"]
            header["layers.3.attn.wq.weight"]["data_offsets"] = [w[0], w[0] + 64]
        ck = Checkpoint(self.path("ckpt"), self.rng, corrupt_shard2=overlap)
        self.assert_refused(ck, ["overlap"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--engramd", "--engramctl", "--proto-dir", "--data-dir", "--lut"):
        parser.add_argument(flag, required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
