"""The `engram` Python package against a real engramd (a temporary Unix socket and loopback gRPC).

What a PyTorch engine relies on: rows land in numpy arrays, CPU torch tensors, buffer-protocol
objects and DLPack producers and equal the pack's synthetic formula (computed here with numpy);
a bad `out` is refused with a clear error and nothing written; hashing equals `engramctl hash`
(dead positions too); 8 Python threads share one client; a daemon restart is UnavailableError and
then works again; a future's callback runs once; dequantize, EngramLayer and the example module
equal independent PyTorch statements; and the package imports from an installed prefix.

Run by ctest (tests/CMakeLists.txt) with /usr/bin/python3 -m pytest; the environment names the
binaries: ENGRAMD, ENGRAMCTL, ENGRAM_PYTHONPATH (BUILD/python), ENGRAM_BUILD_DIR, ENGRAM_SOURCE_DIR.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

sys.path.insert(0, os.environ["ENGRAM_PYTHONPATH"])
SOURCE = os.environ["ENGRAM_SOURCE_DIR"]
sys.path.insert(0, os.path.join(SOURCE, "tests", "crosscheck"))
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
sys.path.insert(0, os.path.join(SOURCE, "client", "python", "examples"))

import engram  # noqa: E402
import torch  # noqa: E402

ENGRAMD, ENGRAMCTL = os.environ["ENGRAMD"], os.environ["ENGRAMCTL"]


# The synthetic formula (DESIGN.md), as the grpcio peer test states it with numpy.
from python_client_test import synthetic_f16_rows  # noqa: E402


class Daemon:
    def __init__(self, root, pack, name="engramd"):
        self.root, self.pack, self.name = root, pack, name
        self.socket = os.path.join(root, name + ".sock")
        self.start()

    def start(self):
        ports = os.path.join(self.root, self.name + ".ports")
        if os.path.exists(ports):
            os.remove(ports)
        self.log = open(os.path.join(self.root, self.name + ".log"), "a")
        self.proc = subprocess.Popen([ENGRAMD, "--pack", self.pack, "--listen", "127.0.0.1:0", "--metrics-listen",
                                      "off", "--ports-file", ports, "--socket", self.socket],
                                     stdout=self.log, stderr=self.log)
        deadline = time.time() + 60
        while not os.path.exists(ports):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("engramd did not start: " + open(self.log.name).read())
            time.sleep(0.05)
        self.grpc = "grpc://127.0.0.1:%d" % json.load(open(ports))["grpc_port"]
        self.unix = "unix://" + self.socket

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("engram-py"))
    pack = os.path.join(root, "pack")
    subprocess.run([ENGRAMCTL, "pack", "create", "--preset", "demo-v1", "--scale", "0.002", "--dtype", "f16",
                    "--name", "pydemo", "--quiet", "--out", pack], check=True)
    d = Daemon(root, pack)
    d.manifest = json.load(open(os.path.join(pack, "manifest.json")))
    yield d
    d.stop()


TRANSPORTS = ["unix-mapped", "unix-arena", "grpc"]


def connect(d, transport, **kw):
    if transport == "grpc":
        return engram.connect(d.grpc, **kw)
    return engram.connect(d.unix, map_tables=(transport == "unix-mapped"), **kw)


def random_indices(manifest, layer, tokens, seed):
    head_rows = np.array(next(l for l in manifest["layers"] if l["id"] == layer)["head_rows"])
    rng = np.random.default_rng(seed)
    idx = (rng.random((tokens, len(head_rows))) * head_rows[None, :]).astype(np.uint32)
    idx[0] = head_rows - 1  # every head's last row
    return idx


def expected_rows(manifest, layer, idx):
    head_rows = next(l for l in manifest["layers"] if l["id"] == layer)["head_rows"]
    offsets = np.concatenate([[0], np.cumsum(head_rows)[:-1]]).astype(np.uint64)
    rows = (idx.astype(np.uint64) + offsets[None, :]).reshape(-1)
    return synthetic_f16_rows(manifest["synthetic"]["seed"], layer, rows, manifest["row"]["dim"])


class DlpackOnly:
    """A DLPack producer that is nothing else (no buffer protocol, not a tensor)."""

    def __init__(self, tensor):
        self._t = tensor

    def __dlpack__(self, stream=None):
        return self._t.__dlpack__()

    def __dlpack_device__(self):
        return self._t.__dlpack_device__()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rows_land_in_every_kind_of_buffer_and_equal_the_formula(demo, transport):
    with connect(demo, transport) as client:
        table = client.open_table("pydemo")
        assert (table.name, table.dtype, table.dim, table.heads) == ("pydemo", "f16", 64, 16)
        assert table.layer_ids == [1, 15] and table.module == "demo" and table.dead_token_id is None
        assert client.is_mapped(table) == (transport == "unix-mapped")
        idx = random_indices(demo.manifest, 15, 37, seed=1)
        want = expected_rows(demo.manifest, 15, idx)
        need = idx.size * table.row_bytes

        fresh = client.lookup(table, 15, idx)
        assert fresh.dtype == np.uint8 and fresh.shape == (37, 16, table.row_bytes)
        assert fresh.tobytes() == want

        arr = np.zeros(need + 100, dtype=np.uint8)  # larger than needed: the rest stays untouched
        assert client.lookup(table, 15, idx, out=arr) is arr
        assert arr[:need].tobytes() == want and not arr[need:].any()

        t = torch.zeros((37, 16 * table.row_bytes), dtype=torch.uint8)
        assert client.lookup(table, 15, torch.from_numpy(idx.view(np.int32)), out=t) is t
        assert t.numpy().tobytes() == want

        buf = bytearray(need)
        client.lookup(table, 15, idx.reshape(-1), out=buf)
        assert bytes(buf) == want

        backing = torch.zeros(need, dtype=torch.uint8)
        client.lookup(table, 15, idx, out=DlpackOnly(backing))
        assert backing.numpy().tobytes() == want

        rows = client.lookup_tokens(table, 1, np.array([[5, 6, 7, 8]], dtype=np.int32))
        assert rows.tobytes() == expected_rows(demo.manifest, 1, table.hash(np.array([[5, 6, 7, 8]]), 1).reshape(4, 16))
        client.prefetch(table, 15, idx, timeout=5)


def test_bad_out_is_refused_and_nothing_written(demo):
    with engram.connect(demo.unix) as client:
        table = client.open_table("pydemo")
        idx = random_indices(demo.manifest, 1, 8, seed=2)
        need = idx.size * table.row_bytes
        cases = {
            "too small": np.full(need - 1, 0xAB, dtype=np.uint8),
            "wrong dtype": np.full(need // 4, 7, dtype=np.float32),
            "not contiguous": np.full((need, 2), 0xAB, dtype=np.uint8)[:, 0],
            "torch not contiguous": torch.full((need, 2), 0xAB, dtype=torch.uint8)[:, 0],
            "torch wrong dtype": torch.full((need,), 3, dtype=torch.int16),
        }
        readonly = np.full(need, 0xAB, dtype=np.uint8)
        readonly.flags.writeable = False
        cases["read-only"] = readonly
        cases["read-only bytes"] = bytes(need)
        messages = {}
        for name, out in cases.items():
            before = bytes(np.asarray(out).tobytes()) if not isinstance(out, bytes) else out
            with pytest.raises(engram.InvalidArgumentError) as e:
                client.lookup(table, 1, idx, out=out)
            assert isinstance(e.value, ValueError) and e.value.code == "INVALID_ARGUMENT"
            messages[name] = str(e.value)
            after = bytes(np.asarray(out).tobytes()) if not isinstance(out, bytes) else out
            assert after == before, name + ": the buffer was written"
        assert "holds %d bytes; the rows need %d" % (need - 1, need) in messages["too small"]
        assert "must be uint8" in messages["wrong dtype"]
        assert "not C-contiguous" in messages["not contiguous"] and "not contiguous" in messages["torch not contiguous"]
        assert "read-only" in messages["read-only"]
        with pytest.raises(TypeError):
            client.lookup(table, 1, idx, out=object())
        with pytest.raises(engram.InvalidArgumentError, match="not a positive multiple of the table's 16 heads"):
            client.lookup(table, 1, np.zeros(15, dtype=np.uint32))
        with pytest.raises(engram.InvalidArgumentError, match="timeout"):
            client.lookup(table, 1, idx, timeout=-1)


def test_daemon_errors_are_typed_and_carry_its_message(demo):
    with engram.connect(demo.grpc) as client:
        with pytest.raises(engram.NotFoundError) as e:
            client.open_table("no-such-table")
        assert "no-such-table" in str(e.value) and e.value.code == "NOT_FOUND" and isinstance(e.value, engram.Error)
        table = client.open_table("pydemo")
        with pytest.raises(engram.NotFoundError, match="layer 7"):
            client.lookup(table, 7, random_indices(demo.manifest, 1, 2, seed=3))
        bad = random_indices(demo.manifest, 1, 2, seed=3)
        bad[1, 3] = 1 << 30
        with pytest.raises(engram.Error) as e:
            client.lookup(table, 1, bad)
        assert e.value.code in ("INVALID_ARGUMENT", "OUT_OF_RANGE") and "head 3" in str(e.value)
    assert client.closed
    with pytest.raises(engram.FailedPreconditionError, match="closed"):
        client.open_table("pydemo")
    with pytest.raises(engram.InvalidArgumentError, match="unix:///SOCKET"):
        engram.connect("http://localhost:1")


def test_hash_equals_engramctl_hash_with_dead_positions(tmp_path):
    pack = str(tmp_path / "v41")
    subprocess.run([ENGRAMCTL, "pack", "create", "--preset", "dsv41-flash", "--scale", "0.0001", "--name", "v41",
                    "--quiet", "--out", pack], check=True)
    d = Daemon(str(tmp_path), pack)
    try:
        with engram.connect(d.unix) as client:
            table = client.open_table("v41")
            assert table.dead_token_id == -1 and table.heads == 24 and table.row_bytes == 264
            ids = np.random.default_rng(4).integers(0, 128000, (2, 11)).astype(np.int32)
            ids[0, 0] = ids[0, 5] = ids[1, 10] = -1  # dead at the start, middle and end
            ids.tofile(str(tmp_path / "ids.i32"))
            subprocess.run([ENGRAMCTL, "hash", "--pack", pack, "--tokens", str(tmp_path / "ids.i32"), "--shape",
                            "2,11", "--out", str(tmp_path / "idx.i64")], check=True, stdout=subprocess.DEVNULL)
            want = np.fromfile(str(tmp_path / "idx.i64"), dtype="<i8").reshape(2, 11, 2, 24)
            got = table.hash(ids)
            assert got.dtype == np.uint32 and got.shape == (2, 11, 2, 24)
            assert np.array_equal(got, want)
            one = table.hash(torch.from_numpy(ids), layer=14)
            assert one.dtype == torch.int32 and one.shape == (2, 11, 24)
            assert np.array_equal(one.numpy(), want[:, :, 1, :])
            assert np.array_equal(table.hash(ids[1], layer=1), want[1, :, 0, :])
            assert np.array_equal(table.hash(ids.astype(np.int64).tolist()), want)  # any integer input
            with pytest.raises(engram.InvalidArgumentError, match="fit in int32"):
                table.hash(np.array([1, 2**40], dtype=np.int64))
            with pytest.raises(engram.InvalidArgumentError, match="200000"):  # outside the tokenizer
                table.hash(np.array([5, 200000], dtype=np.int32), layer=1)
    finally:
        d.stop()


def test_eight_python_threads_share_one_client(demo):
    with engram.connect(demo.unix, map_tables=False) as client:
        table = client.open_table("pydemo")
        errors = []

        def worker(seed):
            try:
                out = np.empty((29, 16, table.row_bytes), dtype=np.uint8)
                for i in range(25):
                    idx = random_indices(demo.manifest, 15 if i % 2 else 1, 29, seed * 1000 + i)
                    client.lookup(table, 15 if i % 2 else 1, idx, out=out)
                    if out.tobytes() != expected_rows(demo.manifest, 15 if i % 2 else 1, idx):
                        errors.append("thread %d call %d: wrong rows" % (seed, i))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        assert errors == []


def test_a_daemon_restart_is_unavailable_then_works_again(demo, tmp_path):
    d = Daemon(str(tmp_path), demo.pack, name="restart")
    try:
        for transport in ("unix-arena", "unix-mapped", "grpc"):
            uri = d.grpc if transport == "grpc" else d.unix
            client = engram.connect(uri, connect_timeout=1, reconnect_backoff=0.02, timeout=5,
                                    map_tables=(transport == "unix-mapped"))
            table = client.open_table("pydemo")
            idx = random_indices(demo.manifest, 1, 4, seed=5)
            assert client.lookup(table, 1, idx).tobytes() == expected_rows(demo.manifest, 1, idx)
            d.stop()
            # A mapped table gathers here without the daemon; it notices the daemon is gone at its
            # next report (about once a second). Every row it returns meanwhile is still right.
            deadline = time.time() + 10
            with pytest.raises(engram.UnavailableError) as e:
                while time.time() < deadline:
                    assert client.lookup(table, 1, idx).tobytes() == expected_rows(demo.manifest, 1, idx)
                    time.sleep(0.05)
            assert isinstance(e.value, ConnectionError), transport
            d.start()
            if transport == "grpc":  # the daemon came back on another port: a new client
                client.close()
                client = engram.connect(d.grpc, connect_timeout=1, reconnect_backoff=0.02, timeout=5)
                table = client.open_table("pydemo")
            assert client.lookup(table, 1, idx).tobytes() == expected_rows(demo.manifest, 1, idx), transport
            client.close()
    finally:
        d.stop()


def test_lookup_async_future_and_callback_run_once(demo):
    with engram.connect(demo.unix) as client:
        table = client.open_table("pydemo")
        idx = random_indices(demo.manifest, 15, 64, seed=6)
        calls, done = [], threading.Event()
        out = torch.empty((64, 16, table.row_bytes), dtype=torch.uint8)
        future = client.lookup_async(table, 15, idx, out=out, timeout=10)
        future.add_done_callback(lambda f: (calls.append(f.result() is out), done.set()))
        assert future.result(timeout=30) is out
        assert done.wait(10) and calls == [True]
        assert future.done() and out.numpy().tobytes() == expected_rows(demo.manifest, 15, idx)
        time.sleep(0.05)
        assert calls == [True]  # once
        failed = client.lookup_async(table, 9, idx)
        with pytest.raises(engram.NotFoundError):
            failed.result(timeout=30)
        # Calls run in order on one worker: the last one done means every earlier one is.
        futures = [client.lookup_async(table, 1, random_indices(demo.manifest, 1, 8, s)) for s in range(20)]
        futures[-1].result(timeout=30)
        assert all(f.done() for f in futures)
    # A done-callback may close its own client (it runs on the client's worker thread).
    client = engram.connect(demo.unix)
    table = client.open_table("pydemo")
    closed = threading.Event()
    f = client.lookup_async(table, 1, random_indices(demo.manifest, 1, 4, seed=11))
    f.add_done_callback(lambda _: (client.close(), closed.set()))
    assert closed.wait(30) and client.closed


def test_a_cuda_destination_without_a_gpu_is_a_clear_error(demo):
    class FakeDeviceBuffer:  # what a CUDA array library hands over
        def __init__(self, n):
            self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (0, False), "version": 3,
                                             "strides": None}

    with engram.connect(demo.unix) as client:
        table = client.open_table("pydemo")
        idx = random_indices(demo.manifest, 1, 2, seed=7)
        with pytest.raises(engram.FailedPreconditionError) as e:
            client.lookup(table, 1, idx, out=FakeDeviceBuffer(idx.size * table.row_bytes))
        assert "CUDA" in str(e.value)
        with pytest.raises(engram.InvalidArgumentError, match="holds 10 bytes"):
            client.lookup(table, 1, idx, out=FakeDeviceBuffer(10))
        with pytest.raises(engram.InvalidArgumentError, match="host memory"):
            client.lookup_async(table, 1, idx, out=FakeDeviceBuffer(idx.size * table.row_bytes))


def test_dequantize_equals_the_rows_values(demo):
    with engram.connect(demo.unix) as client:
        table = client.open_table("pydemo")
        idx = random_indices(demo.manifest, 1, 5, seed=8)
        rows = client.lookup(table, 1, idx)
        values = engram.dequantize(rows, table)
        assert isinstance(values, torch.Tensor) and values.dtype == torch.float32 and values.shape == (5, 16 * 64)
        want = np.frombuffer(expected_rows(demo.manifest, 1, idx), dtype=np.float16).astype(np.float32)
        assert np.array_equal(values.numpy().reshape(-1), want)
        half = engram.dequantize(torch.from_numpy(rows), table, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, values.to(torch.bfloat16))
        with pytest.raises(engram.InvalidArgumentError, match="multiple of heads x row_bytes"):
            engram.dequantize(rows.reshape(-1)[:100], table)


def test_engram_layer_equals_the_pytorch_statement(demo, tmp_path):
    from engram_module_test import engram_module, random_weights, write_safetensors
    rng = np.random.default_rng(9)
    G, D, M = 4, 32, 16 * 64
    W = random_weights(G, D, M, rng)
    write_safetensors(str(tmp_path / "w.safetensors"), W)
    with engram.connect(demo.unix) as client:
        table = client.open_table("pydemo")
        layer = engram.EngramLayer(client, table, 15, str(tmp_path / "w.safetensors"), device="cpu", threads=2)
        assert (layer.variant, layer.device, layer.streams, layer.hidden_size) == ("demo", "cpu", G, D)
        ids = torch.from_numpy(rng.integers(0, 5000, (2, 9)).astype(np.int32))
        H = torch.from_numpy(rng.standard_normal((2, 9, G, D)).astype(np.float32))
        Y = layer.forward(ids, H)
        E = engram.dequantize(client.lookup(table, 15, table.hash(ids, 15)), table).reshape(2, 9, M)
        ref = engram_module(E, H, W, dilation=table.max_ngram)
        assert Y.shape == H.shape and float((Y - ref).abs().max()) <= 1e-4
        with pytest.raises(engram.InvalidArgumentError, match="hidden states hold"):
            layer.forward(ids, H[:, :8])
        # Two Python threads on one layer take turns (no deadlock between its lock and the GIL).
        results = []
        threads = [threading.Thread(target=lambda: results.append(layer.forward(ids, H))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(results) == 2 and all(torch.equal(r, Y) for r in results)


def test_example_module_equals_the_statement_on_the_packs_rows(tmp_path):
    """The example engine module (client/python/examples/engram_decode.py) on a V4.1-shaped table,
    against DSV41.md's equations on rows read straight from the pack's row file."""
    import engram_decode
    from dsv41_module_test import dsv41_module, e4m3, e8m0
    pack = str(tmp_path / "v41")
    subprocess.run([ENGRAMCTL, "pack", "create", "--preset", "dsv41-flash", "--scale", "0.0001", "--name", "v41",
                    "--quiet", "--out", pack], check=True)
    manifest = json.load(open(os.path.join(pack, "manifest.json")))
    d = Daemon(str(tmp_path), pack)
    try:
        with engram.connect(d.unix) as client:
            table = client.open_table("v41")
            K, D = 4, 64
            model = engram_decode.EngramModel(client, table, hidden_size=D, hc_mult=K, seed=3)
            ids = torch.from_numpy(np.random.default_rng(10).integers(0, 128000, (1, 6)).astype(np.int32))
            ids[0, 2] = -1
            h = torch.randn(6, K, D)
            got = model.step(ids, h.clone())
            # The statement: every Engram layer in turn, rows from the file, no daemon.
            ref = h.clone().double()
            idx_all = table.hash(ids.numpy())  # [1, 6, layers, heads]
            dead = torch.from_numpy(ids.numpy().reshape(-1) == -1)
            for li, lay in enumerate(manifest["layers"]):
                raw = np.fromfile(os.path.join(pack, lay["file"]), dtype=np.uint8).reshape(-1, 264)
                offsets = np.concatenate([[0], np.cumsum(lay["head_rows"])[:-1]])
                rows = raw[(idx_all[0, :, li, :].astype(np.int64) + offsets[None, :]).reshape(-1)]
                E = (e4m3(rows[:, :256]) * np.repeat(e8m0(rows[:, 256:]), 32, axis=1)).reshape(6, -1)
                block = model.blocks[str(lay["id"])]
                W = {"wkv": block.wkv.detach().double(), "q_weight": block.q_weight.detach().double(),
                     "k_weight": block.k_weight.detach().double()}
                ref = dsv41_module(torch.from_numpy(E), ref, W, dead, block.eps)
                ref = model.between(ref.float()).double()  # the stand-in for the rest of the block
            assert float((got.double() - ref).abs().max()) <= 1e-3 * max(1.0, float(ref.abs().max()))
            assert torch.equal(got[2], model.between(model.between(h[2:3])).reshape(K, D))  # dead: only the blocks
    finally:
        d.stop()


def test_imports_from_an_installed_prefix_and_the_build_tree(tmp_path):
    prefix = str(tmp_path / "prefix")
    subprocess.run(["cmake", "--install", os.environ["ENGRAM_BUILD_DIR"], "--prefix", prefix], check=True,
                   stdout=subprocess.DEVNULL)
    site = os.path.join(prefix, "lib", "python3", "dist-packages")
    for path, where in ((site, site), (os.environ["ENGRAM_PYTHONPATH"], os.environ["ENGRAM_PYTHONPATH"])):
        out = subprocess.run(["/usr/bin/python3", "-c", "import engram, sys; print(engram.__file__); "
                              "print(engram.Client.lookup.__doc__.count('timeout'))"],
                             env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0].startswith(os.path.realpath(where)) or \
            out.stdout.splitlines()[0].startswith(where)
        assert int(out.stdout.splitlines()[1]) >= 1
    assert os.path.exists(os.path.join(site, "engram", "_engram.pyi"))
