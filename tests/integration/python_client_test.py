#!/usr/bin/python3
"""A peer nobody here wrote: Debian's python3-grpcio talks to the real engramd.

Stubs are generated from proto/engram/v1/engram.proto with grpc_tools at test time. Expected rows
are computed independently here with numpy (splitmix64, then numpy's own float16 rounding), and
`engramctl hash` is checked against every case of hash_vectors.json.
Run with /usr/bin/python3 (Debian's grpc modules load only there).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ARGS = None


def splitmix64(k):
    with np.errstate(over="ignore"):
        z = k + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def synthetic_f16_rows(seed, layer, rows, dim):
    """rows: global row numbers -> bytes of f16 rows, as DESIGN.md defines them."""
    r = np.asarray(rows, dtype=np.uint64)[:, None]
    j = np.arange(dim, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        key = np.uint64(seed) ^ (np.uint64(layer) << np.uint64(56)) ^ (r * np.uint64(dim) + j)
    bits = splitmix64(key)
    v = (bits >> np.uint64(40)).astype(np.float64) / 2.0**23 - 1.0
    return v.astype(np.float32).astype(np.float16).tobytes()


class EngramdPeerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="engram-py-")
        gen = os.path.join(cls.tmp.name, "gen")
        os.makedirs(gen)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ARGS.proto_dir, "--python_out", gen,
                        "--grpc_python_out", gen, "engram/v1/engram.proto"], check=True)
        sys.path.insert(0, gen)
        import grpc
        from engram.v1 import engram_pb2, engram_pb2_grpc
        cls.grpc, cls.pb = grpc, engram_pb2
        cls.pack = os.path.join(cls.tmp.name, "pack")
        subprocess.run([ARGS.engramctl, "pack", "create", "--preset", "demo-v1", "--scale", "0.002", "--dtype", "f16",
                        "--name", "pydemo", "--quiet", "--out", cls.pack], check=True)
        cls.manifest = json.load(open(os.path.join(cls.pack, "manifest.json")))
        ports = os.path.join(cls.tmp.name, "ports.json")
        cls.log = open(os.path.join(cls.tmp.name, "engramd.log"), "w")
        cls.daemon = subprocess.Popen([ARGS.engramd, "--pack", cls.pack, "--listen", "[::1]:0", "--metrics-listen",
                                       "127.0.0.1:0", "--ports-file", ports, "--max-batch-rows", "8192",
                                       "--socket", os.path.join(cls.tmp.name, "engramd.sock"),
                                       "--dedup", "on"],
                                      stdout=cls.log, stderr=cls.log)
        deadline = time.time() + 60
        while not os.path.exists(ports):
            if cls.daemon.poll() is not None or time.time() > deadline:
                raise RuntimeError("engramd did not start: " + open(cls.log.name).read())
            time.sleep(0.05)
        cls.port = json.load(open(ports))["grpc_port"]
        cls.channel = grpc.insecure_channel("[::1]:%d" % cls.port,
                                            options=[("grpc.max_receive_message_length", -1)])
        cls.stub = engram_pb2_grpc.EngramStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.daemon.send_signal(signal.SIGTERM)
        cls.daemon.wait(timeout=30)
        cls.log.close()
        cls.tmp.cleanup()

    def layer(self, layer_id):
        return next(l for l in self.manifest["layers"] if l["id"] == layer_id)

    def expected(self, layer_id, indices):
        head_rows = self.layer(layer_id)["head_rows"]
        offsets = np.concatenate([[0], np.cumsum(head_rows)[:-1]]).astype(np.uint64)
        heads = len(head_rows)
        idx = np.asarray(indices, dtype=np.uint64).reshape(-1, heads)
        rows = (idx + offsets[None, :]).reshape(-1)
        return synthetic_f16_rows(self.manifest["synthetic"]["seed"], layer_id, rows, self.manifest["row"]["dim"])

    def lookup(self, layer, indices, table="pydemo", tokens=None):
        idx = np.asarray(indices, dtype="<u4")
        heads = len(self.layer(1)["head_rows"])
        return self.stub.Lookup(self.pb.LookupRequest(table=table, layer=layer,
                                                      num_tokens=tokens or len(idx) // heads,
                                                      indices=idx.tobytes(), request_id=9), timeout=20)

    def test_table_layout_matches_manifest(self):
        info = self.stub.GetTable(self.pb.GetTableRequest(table="pydemo"), timeout=10)
        self.assertEqual(info.dtype, "f16")
        self.assertEqual(info.row_bytes, 128)
        self.assertEqual([l.id for l in info.layers], [1, 15])
        self.assertEqual(list(info.layers[1].head_rows), self.layer(15)["head_rows"])
        self.assertEqual(list(info.layers[1].multipliers), self.layer(15)["multipliers"])
        tables = self.stub.ListTables(self.pb.ListTablesRequest(), timeout=10)
        self.assertEqual([t.name for t in tables.tables], ["pydemo"])

    def test_rows_equal_independent_formula(self):
        rng = np.random.default_rng(3)
        head_rows = np.array(self.layer(15)["head_rows"])
        tokens = 300
        idx = (rng.random((tokens, len(head_rows))) * head_rows[None, :]).astype(np.uint32)
        idx[0] = head_rows - 1  # the last row of every head
        idx[1] = idx[0]         # a repeated token
        resp = self.lookup(15, idx.reshape(-1))
        self.assertEqual(resp.request_id, 9)
        self.assertEqual(resp.rows, self.expected(15, idx.reshape(-1)))
        self.assertEqual(resp.stats.rows_requested, idx.size)
        # Started with --dedup on: the repeated token's rows were read once.
        self.assertLessEqual(resp.stats.rows_read, idx.size - len(head_rows))
        self.assertEqual(resp.stats.dram_rows, resp.stats.rows_read)

    def test_bad_input_statuses_and_still_serving(self):
        grpc = self.grpc
        heads = len(self.layer(1)["head_rows"])
        with self.assertRaises(grpc.RpcError) as e:
            self.lookup(1, [0] * heads, table="nope")
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as e:
            self.lookup(3, [0] * heads)
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)
        with self.assertRaises(grpc.RpcError) as e:
            self.lookup(1, [0] * (heads - 1), tokens=1)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        bad = [0] * (2 * heads)
        bad[heads + 3] = 10**9
        with self.assertRaises(grpc.RpcError) as e:
            self.lookup(1, bad)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("index 1000000000 for token 1, head 3", e.exception.details())
        with self.assertRaises(grpc.RpcError) as e:
            self.lookup(1, [0] * (513 * heads))  # 8208 rows > --max-batch-rows 8192
        self.assertEqual(e.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        resp = self.lookup(1, list(range(heads)))
        self.assertEqual(resp.rows, self.expected(1, list(range(heads))))
        self.assertIsNone(self.daemon.poll())

    def test_prefetch_on_a_resident_table_skips_every_row(self):
        heads = len(self.layer(1)["head_rows"])
        resp = self.stub.Prefetch(self.pb.PrefetchRequest(table="pydemo", layer=1, num_tokens=2,
                                                          indices=np.arange(2 * heads, dtype="<u4").tobytes()),
                                  timeout=10)
        self.assertEqual((resp.rows_queued, resp.rows_skipped), (0, 2 * heads))  # all rows already in DRAM
        with self.assertRaises(self.grpc.RpcError) as e:
            self.stub.Prefetch(self.pb.PrefetchRequest(table="pydemo", layer=1, num_tokens=3,
                                                       indices=np.zeros(heads, dtype="<u4").tobytes()), timeout=10)
        self.assertEqual(e.exception.code(), self.grpc.StatusCode.INVALID_ARGUMENT)

    def test_lookup_tokens(self):
        tokens = np.fromfile(os.path.join(ARGS.data_dir, "fortunes.deepseek_v3.i32"), dtype="<i4")[:96]
        resp = self.stub.LookupTokens(self.pb.LookupTokensRequest(table="pydemo", layers=[15], batch=2, seq_len=48,
                                                                  token_ids=tokens.tobytes()), timeout=20)
        self.assertEqual(list(resp.layers), [15])
        self.assertEqual(len(resp.rows[0]), 96 * 16 * 128)

    def test_health_and_reflection(self):
        # Standard services, called with hand-encoded protobuf bytes: HealthCheckRequest{} and
        # HealthCheckResponse{status: SERVING} (field 1 = 1) encode as b"" and b"\x08\x01".
        check = self.channel.unary_unary("/grpc.health.v1.Health/Check")
        self.assertEqual(check(b"", timeout=10), b"\x08\x01")
        # ServerReflectionRequest{list_services: ""} is field 7, length 0.
        reflect = self.channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        replies = list(reflect(iter([b"\x3a\x00"]), timeout=10))
        self.assertIn(b"engram.v1.Engram", replies[0])


class EngramctlHashTest(unittest.TestCase):
    """`engramctl hash` against every case of hash_vectors.json (reference semantics)."""

    def test_vectors(self):
        cases = json.load(open(os.path.join(ARGS.data_dir, "hash_vectors.json")))
        with tempfile.TemporaryDirectory(prefix="engram-hash-") as tmp:
            for n, case in enumerate(cases):
                cfg = case["config"]
                pack = os.path.join(tmp, "case%d" % n)
                os.makedirs(pack)
                compress = cfg.get("compress", True)
                if compress:
                    with open(ARGS.lut, "rb") as src, open(os.path.join(pack, "lut.i32"), "wb") as dst:
                        dst.write(src.read())
                # A manifest written by hand from the vectors' own primes and multipliers: the
                # daemon's loader re-derives them and refuses any difference.
                manifest = {
                    "format": "engram-pack/1", "name": "case%d" % n,
                    "row": {"dtype": "f32", "dim": 4, "bytes": 16},
                    "hash": {"kind": "engram-v1", "max_ngram": cfg["max_ngram"], "heads_per_ngram": cfg["heads"],
                             "seed": cfg["seed"], "vocab_per_ngram": cfg["vocab"], "pad_id": cfg["pad_id"],
                             "compressed_vocab": case["compressed_vocab"],
                             "compress_lut": "lut.i32" if compress else None},
                    "layers": [{"id": l, "file": "layer-%d.rows" % l,
                                "head_rows": [p for order in case["primes"][str(l)] for p in order],
                                "multipliers": case["multipliers"][str(l)]} for l in cfg["layers"]],
                }
                json.dump(manifest, open(os.path.join(pack, "manifest.json"), "w"))
                tokens = np.asarray(case["raw_token_ids"], dtype="<i4")
                tokens.tofile(os.path.join(tmp, "t.i32"))
                out = os.path.join(tmp, "h.i64")
                subprocess.run([ARGS.engramctl, "hash", "--pack", pack, "--tokens", os.path.join(tmp, "t.i32"),
                                "--shape", "%d,%d" % (cfg["B"], cfg["T"]), "--out", out], check=True,
                               stdout=subprocess.DEVNULL)
                got = np.fromfile(out, dtype="<i8").reshape(cfg["B"], cfg["T"], len(cfg["layers"]), -1)
                for li, l in enumerate(cfg["layers"]):
                    np.testing.assert_array_equal(got[:, :, li, :], np.asarray(case["hashes"][str(l)]),
                                                  err_msg="%s layer %d" % (cfg["name"], l))


class EngramctlLutTest(unittest.TestCase):
    """`engramctl lut` from DeepSeek-V3's tokenizer.json reproduces the reference table byte for byte,
    and refuses a count it was told to expect when the tokenizer gives another."""

    def test_lut_from_tokenizer(self):
        tokenizer = os.path.join(ARGS.data_dir, "deepseek_v3_tokenizer.json")
        with tempfile.TemporaryDirectory(prefix="engram-lut-") as tmp:
            out = os.path.join(tmp, "lut.i32")
            run = subprocess.run([ARGS.engramctl, "lut", "--tokenizer", tokenizer, "--vocab-size", "129280",
                                  "--expect-compressed", "98627", "--out", out], capture_output=True, text=True)
            self.assertEqual(run.returncode, 0, run.stderr)
            self.assertIn("128815 tokens -> 98627 compressed ids", run.stdout)
            self.assertEqual(open(out, "rb").read(), open(ARGS.lut, "rb").read())
            bad = subprocess.run([ARGS.engramctl, "lut", "--tokenizer", tokenizer, "--expect-compressed", "99092",
                                  "--out", out], capture_output=True, text=True)
            self.assertNotEqual(bad.returncode, 0)
            self.assertIn("compresses to 98627 ids, not the 99092 expected", bad.stderr)


def reference_hash(compressed, mult, primes, pad, max_ngram, heads, dead):
    """HASHING.md sections 4 and 6 stated plainly: per position, walk back s = 0..max_ngram-1; from the
    first slot before the start or on a dead position (when `dead` is not None) every slot is the pad;
    mix = XOR of slot_k * mult[k] in wrapping signed 64-bit; head value = floor mod of the mix."""
    mask = (1 << 64) - 1
    B, T = compressed.shape
    out = np.zeros((B, T, (max_ngram - 1) * heads), dtype=np.int64)
    for b in range(B):
        for t in range(T):
            slots, blocked = [], False
            for s in range(max_ngram):
                if t - s < 0 or (dead is not None and compressed[b, t - s] == dead):
                    blocked = True
                slots.append(pad if blocked else int(compressed[b, t - s]))
            mix = 0
            for k in range(max_ngram):
                mix ^= (slots[k] * mult[k]) & mask
                if k == 0:
                    continue
                signed = mix - (1 << 64) if mix >= (1 << 63) else mix
                n = k + 1
                for j in range(heads):
                    h = (n - 2) * heads + j
                    out[b, t, h] = signed % primes[h]
    return out


class DeadPositionTest(unittest.TestCase):
    """Token id -1 (DeepSeek-V4.1's positions without text) blocks n-grams, for a table whose manifest
    says hash.dead_token_id: -1; `engramctl hash` against the plain statement above, with dead
    positions at the start, in the middle and at the end, and the demo's semantics without the field."""

    def test_dead_positions(self):
        case = json.load(open(os.path.join(ARGS.data_dir, "hash_vectors.json")))[0]
        cfg = case["config"]
        lut = np.fromfile(ARGS.lut, dtype="<i4")
        layer = cfg["layers"][0]
        primes = [p for order in case["primes"][str(layer)] for p in order]
        mult = case["multipliers"][str(layer)]
        raw = np.asarray(case["raw_token_ids"], dtype=np.int64)[:, :24].copy()
        raw[0, 0] = raw[0, 1] = -1      # the start
        raw[0, 10] = -1                 # the middle: n-grams after it must not reach back across it
        raw[1, 12] = raw[1, 13] = -1    # two in the middle
        raw[1, 23] = -1                 # the end
        compressed = np.where(raw >= 0, lut[np.maximum(raw, 0)], raw)
        pad = int(lut[cfg["pad_id"]])
        with tempfile.TemporaryDirectory(prefix="engram-dead-") as tmp:
            for dead in (-1, None):
                pack = os.path.join(tmp, "dead" if dead is not None else "demo")
                os.makedirs(pack)
                with open(ARGS.lut, "rb") as src, open(os.path.join(pack, "lut.i32"), "wb") as dst:
                    dst.write(src.read())
                hash_cfg = {"kind": "engram-v1", "max_ngram": cfg["max_ngram"], "heads_per_ngram": cfg["heads"],
                            "seed": cfg["seed"], "vocab_per_ngram": cfg["vocab"], "pad_id": cfg["pad_id"],
                            "compress_lut": "lut.i32"}
                if dead is not None:
                    hash_cfg["dead_token_id"] = dead
                manifest = {"format": "engram-pack/1", "name": "dead", "row": {"dtype": "f32", "dim": 4},
                            "hash": hash_cfg,
                            "layers": [{"id": layer, "file": "layer-%d.rows" % layer, "head_rows": primes,
                                        "multipliers": mult}]}
                json.dump(manifest, open(os.path.join(pack, "manifest.json"), "w"))
                raw.astype("<i4").tofile(os.path.join(tmp, "t.i32"))
                out = os.path.join(tmp, "h.i64")
                subprocess.run([ARGS.engramctl, "hash", "--pack", pack, "--tokens", os.path.join(tmp, "t.i32"),
                                "--shape", "%d,%d" % raw.shape, "--out", out], check=True, stdout=subprocess.DEVNULL)
                got = np.fromfile(out, dtype="<i8").reshape(raw.shape[0], raw.shape[1], -1)
                want = reference_hash(compressed, mult, primes, pad, cfg["max_ngram"], cfg["heads"], dead)
                np.testing.assert_array_equal(got, want, err_msg="dead_token_id %s" % dead)
                if dead is not None:
                    # A dead position hashes as all-pad, wherever it is.
                    np.testing.assert_array_equal(got[0, 10], got[0, 0])
                    np.testing.assert_array_equal(got[1, 23], got[0, 0])
                    # Right after a dead position, the token hashes as if its sequence started there.
                    np.testing.assert_array_equal(got[0, 11], reference_hash(compressed[:1, 11:12], mult, primes,
                                                  pad, cfg["max_ngram"], cfg["heads"], None)[0, 0])
                else:
                    self.assertFalse(np.array_equal(got[0, 10], got[0, 0]))  # the demo hashes -1 as it is
            # An unknown manifest field is an error, not silently ignored.
            manifest["hash"]["dead_token"] = -1
            json.dump(manifest, open(os.path.join(pack, "manifest.json"), "w"))
            bad = subprocess.run([ARGS.engramctl, "hash", "--pack", pack, "--tokens", os.path.join(tmp, "t.i32"),
                                  "--shape", "%d,%d" % raw.shape, "--out", out], capture_output=True, text=True)
            self.assertNotEqual(bad.returncode, 0)
            self.assertIn("unknown field 'hash.dead_token'", bad.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for flag in ("--engramd", "--engramctl", "--proto-dir", "--data-dir", "--lut"):
        parser.add_argument(flag, required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
