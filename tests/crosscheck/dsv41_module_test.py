#!/usr/bin/python3
"""DeepSeek-V4.1's Engram module: the CPU twin against an independent PyTorch statement of DSV41.md.

For each case a small checkpoint is written here in the released layout (config.json with the
Engram fields under text_config, model.safetensors.index.json, two shards: the FP8 tables with
their E8M0 scales, the FP8 wkv projection with its 32x32-block E8M0 scales, BF16 q_weight and
k_weight), imported with `engramctl pack import --hf` (which must record module dsv41), and run
with `engramctl forward` (variant taken from the pack, weights from the checkpoint). Then:
  1. the rows it used, decoded here straight from the shard bytes, equal its dumped embeddings;
  2. with f32 streams its output is within 1e-4 (max abs) of the statement below in float32 and
     float64;
  3. with bf16 streams (the released model's) every output element is within one bf16 step of
     the statement's f32 update rounded to bf16;
  4. at dead positions (token id -1) the streams come back unchanged, bit for bit;
  5. one case also runs through a real engramd over its Unix socket (the module read from the
     table's info) and must give the same bytes as from the pack.
Cases cover T=1 (decode), batches, dead positions at the start, middle and end, K=2 and K=4
streams, and a hidden size whose wkv rows end in a partial 32-row scale block.

Usage: dsv41_module_test.py ENGRAMCTL ENGRAMD TOKENIZER_JSON WORKDIR
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np

try:
    import torch
except ImportError:  # ctest reports exit 77 as skipped; tests/run.sh installs python3-torch
    print("SKIP: PyTorch is not installed for /usr/bin/python3 (apt-get install python3-torch)")
    sys.exit(77)

TOLERANCE = 1e-4
LAYERS = [1, 3]
MAX_NGRAM, HEADS, DIM = 3, 2, 64      # 4 heads of 64: M = 256
VOCAB = [50, 60]
COMPRESSED = 98627                    # what the DeepSeek-V3 tokenizer compresses to
EPS = 1e-20


# ---- the module, re-stated from DSV41.md -----------------------------------------------------

def dsv41_module(E, H, W, dead, eps):
    """E [N, M], H [N, K, D] (float), dead [N] bool -> updated H."""
    N, K, D = H.shape
    kv = E @ W["wkv"].T                               # [N, (K+1) D]
    value = kv[:, K * D:]
    out = H.clone()
    for k in range(K):
        key = kv[:, k * D:(k + 1) * D]
        h = H[:, k, :]
        a = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * W["q_weight"][k]
        b = key * torch.rsqrt(key.pow(2).mean(-1, keepdim=True) + eps) * W["k_weight"][k]
        d = (a * b).sum(-1) / math.sqrt(D)
        g = torch.sigmoid(torch.sign(d) * torch.sqrt(torch.clamp(d.abs(), min=1e-6)))
        g = torch.where(dead, torch.zeros_like(g), g)
        out[:, k, :] = h + g.unsqueeze(-1) * value
    return out


# ---- independent decoders --------------------------------------------------------------------

def e4m3(b):
    b = b.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, (man / 8.0) * 2.0 ** -6, (1.0 + man / 8.0) * np.exp2(exp - 7.0))
    return (sign * val).astype(np.float64)


def e8m0(b):
    return np.exp2(b.astype(np.float64) - 127.0)


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x):
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


# ---- the checkpoint --------------------------------------------------------------------------

def is_prime(n):
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def head_rows():
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


def write_safetensors(path, tensors):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def fp8_bytes(rng, shape):
    """Random E4M3 bytes, never NaN (0x7f / 0xff)."""
    b = rng.integers(0, 256, size=shape, dtype=np.uint8)
    b[(b & 0x7F) == 0x7F] = 0x3C
    return b


def write_checkpoint(root, K, D, rng):
    os.makedirs(root)
    rows = head_rows()
    M = (MAX_NGRAM - 1) * HEADS * DIM
    config = {"architectures": ["DeepseekV4ForCausalLM"],
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"},
              "text_config": {"engram_layer_ids": LAYERS, "engram_num_embeddings": [sum(rows[l]) for l in LAYERS],
                              "engram_max_ngram_size": MAX_NGRAM, "engram_vocab_size": VOCAB,
                              "engram_n_heads": HEADS, "engram_head_dim": DIM, "engram_pad_token_id": 2,
                              "engram_compressed_vocab_size": COMPRESSED, "hc_mult": K, "hidden_size": D,
                              "rms_norm_eps": EPS, "vocab_size": 129280}}
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump(config, f)
    os.symlink(os.path.abspath(TOKENIZER), os.path.join(root, "tokenizer.json"))
    ck = {"rows": rows, "M": M, "table": {}, "W": {}}
    weight_map = {}
    for i, layer in enumerate(LAYERS):
        n = sum(rows[layer])
        values = fp8_bytes(rng, (n, DIM))
        scales = rng.integers(118, 123, size=(n, DIM // 32), dtype=np.uint8)
        wkv = fp8_bytes(rng, ((K + 1) * D, M))
        wkv_scale = rng.integers(117, 121, size=(-(-(K + 1) * D // 32), M // 32), dtype=np.uint8)
        q = f32_to_bf16(1.0 + 0.1 * rng.standard_normal((K, D)))
        k = f32_to_bf16(1.0 + 0.1 * rng.standard_normal((K, D)))
        p = "layers.%d.engram." % layer
        shard = "model-%05d-of-00002.safetensors" % (i + 1)
        tensors = [("layers.%d.attn.wq.weight" % layer, "BF16", (2, 4), bytes(16)),
                   (p + "embed.weight", "F8_E4M3", values.shape, values.tobytes()),
                   (p + "embed.scale", "F8_E8M0", scales.shape, scales.tobytes()),
                   (p + "wkv.weight", "F8_E4M3", wkv.shape, wkv.tobytes()),
                   (p + "wkv.scale", "F8_E8M0", wkv_scale.shape, wkv_scale.tobytes()),
                   (p + "q_weight", "BF16", q.shape, q.tobytes()),
                   (p + "k_weight", "BF16", k.shape, k.tobytes())]
        write_safetensors(os.path.join(root, shard), tensors)
        for t in tensors:
            weight_map[t[0]] = shard
        ck["table"][layer] = e4m3(values) * np.repeat(e8m0(scales), 32, axis=1)
        block = np.repeat(np.repeat(e8m0(wkv_scale), 32, axis=0), 32, axis=1)[:(K + 1) * D, :M]
        ck["W"][layer] = {"wkv": e4m3(wkv) * block, "q_weight": bf16_to_f32(q).astype(np.float64),
                          "k_weight": bf16_to_f32(k).astype(np.float64)}
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return ck


# ---- the cases -------------------------------------------------------------------------------

CASES = [
    # name, K, D, B, T, dead positions (b, t), through the daemon too
    ("decode_T1", 4, 64, 1, 1, [], True),
    ("prefill_dead_start_middle_end", 4, 64, 2, 9, [(0, 0), (0, 4), (1, 8), (1, 3)], False),
    ("two_streams_ragged_blocks", 2, 80, 1, 16, [(0, 7)], False),
    ("batch_of_decodes", 4, 96, 5, 1, [(2, 0)], False),
]


def run(*args, **kw):
    out = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    return out


def forward(d, source, layer, ck_dir, B, T, hidden, stream_dtype, tag):
    out = os.path.join(d, f"y.{tag}")
    run(ENGRAMCTL, "forward", *source, "--layer", str(layer), "--checkpoint", ck_dir,
        "--tokens", os.path.join(d, "tokens.i32"), "--shape", f"{B},{T}", "--hidden", hidden, "--out", out,
        "--stream-dtype", stream_dtype, "--device", "cpu", "--threads", "2",
        "--dump-embeddings", os.path.join(d, f"e.{tag}"), "--dump-indices", os.path.join(d, f"idx.{tag}"))
    return out


def daemon_forward(d, pack, layer, ck_dir, B, T, hidden):
    sock, ports = os.path.join(d, "engramd.sock"), os.path.join(d, "ports.json")
    log = open(os.path.join(d, "engramd.log"), "w")
    daemon = subprocess.Popen([ENGRAMD, "--pack", pack, "--listen", "127.0.0.1:0", "--metrics-listen", "off",
                               "--ports-file", ports, "--socket", sock], stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while not os.path.exists(ports):
            if daemon.poll() is not None or time.time() > deadline:
                raise AssertionError("engramd did not start: " + open(log.name).read())
            time.sleep(0.05)
        return forward(d, ["--daemon", "unix://" + sock, "--table", "v41"], layer, ck_dir, B, T, hidden, "f32",
                       "daemon")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()


def run_case(work, case, seed):
    name, K, D, B, T, dead_at, via_daemon = case
    rng = np.random.default_rng(seed)
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    ck_dir = os.path.join(d, "checkpoint")
    if os.path.exists(ck_dir):
        subprocess.run(["rm", "-rf", ck_dir], check=True)
    ck = write_checkpoint(ck_dir, K, D, rng)
    pack = os.path.join(d, "pack")
    run(ENGRAMCTL, "pack", "import", "--hf", ck_dir, "--out", pack, "--name", "v41", "--force")
    manifest = json.load(open(os.path.join(pack, "manifest.json")))
    assert manifest.get("module") == "dsv41", f"{name}: the import did not record module dsv41: {manifest.get('module')}"
    layer = LAYERS[1]
    M, N = ck["M"], B * T
    tokens = rng.integers(0, 128000, (B, T)).astype("<i4")
    dead = np.zeros((B, T), dtype=bool)
    for b, t in dead_at:
        tokens[b, t] = -1
        dead[b, t] = True
    tokens.tofile(os.path.join(d, "tokens.i32"))
    H = (2.0 * rng.standard_normal((B, T, K, D))).astype("<f4")
    H.tofile(os.path.join(d, "hidden.f32"))
    Hb = f32_to_bf16(H)
    Hb.tofile(os.path.join(d, "hidden.bf16"))

    y32 = np.fromfile(forward(d, ["--pack", pack], layer, ck_dir, B, T, os.path.join(d, "hidden.f32"), "f32", "f32"),
                      "<f4").reshape(N, K, D)
    E = np.fromfile(os.path.join(d, "e.f32"), "<f4").reshape(N, M)
    idx = np.fromfile(os.path.join(d, "idx.f32"), "<u4").reshape(N, -1)

    # 1. The rows, from the shard bytes.
    hr = ck["rows"][layer]
    offsets = np.concatenate([[0], np.cumsum(hr)[:-1]])
    assert (idx < np.array(hr)[None, :]).all(), f"{name}: an index out of its head's range"
    expected_E = ck["table"][layer][(offsets[None, :] + idx).reshape(-1)].reshape(N, M).astype(np.float32)
    if not np.array_equal(expected_E, E):
        bad = np.argwhere(expected_E != E)[0]
        raise AssertionError(f"{name}: embeddings differ from the shard's rows first at {tuple(bad)}")

    # 2. f32 streams against the statement in float32 and float64.
    W = ck["W"][layer]
    dead_t = torch.from_numpy(dead.reshape(N))
    errors = {}
    for dt in (torch.float32, torch.float64):
        Wt = {k: torch.from_numpy(v).to(dt) for k, v in W.items()}
        ref = dsv41_module(torch.from_numpy(E).to(dt), torch.from_numpy(H.reshape(N, K, D)).to(dt), Wt, dead_t, EPS)
        errors[str(dt).split(".")[1]] = float((torch.from_numpy(y32).to(dt) - ref).abs().max())
    for k, e in errors.items():
        assert e <= TOLERANCE, f"{name}: max abs error vs torch {k} is {e:.3g} > {TOLERANCE}"

    # 3. bf16 streams: within one bf16 step of the f32 statement's update rounded to bf16.
    yb = np.fromfile(forward(d, ["--pack", pack], layer, ck_dir, B, T, os.path.join(d, "hidden.bf16"), "bf16",
                             "bf16"), "<u2").reshape(N, K, D)
    Wt = {k: torch.from_numpy(v).float() for k, v in W.items()}
    ref = dsv41_module(torch.from_numpy(E), torch.from_numpy(bf16_to_f32(Hb).reshape(N, K, D)), Wt, dead_t, EPS)
    ref_b = f32_to_bf16(ref.numpy())
    got, want = bf16_to_f32(yb).astype(np.float64), bf16_to_f32(ref_b).astype(np.float64)
    magnitude = np.maximum(np.abs(got), np.abs(want))
    step = np.exp2(np.floor(np.log2(np.maximum(magnitude, 2.0 ** -126))) - 7)
    steps = float((np.abs(got - want) / step).max())
    assert steps <= 1.0, f"{name}: bf16 streams differ from the statement by {steps:.2f} bf16 steps"
    differing = int(np.sum(yb != ref_b))

    # 4. Dead positions untouched, in both dtypes.
    flat_dead = dead.reshape(N)
    assert np.array_equal(y32[flat_dead], H.reshape(N, K, D)[flat_dead]), f"{name}: a dead position's f32 streams moved"
    assert np.array_equal(yb[flat_dead], Hb.reshape(N, K, D)[flat_dead]), f"{name}: a dead position's bf16 streams moved"
    assert not np.array_equal(y32[~flat_dead], H.reshape(N, K, D)[~flat_dead]), f"{name}: live streams did not move"

    # 5. The same through engramd.
    if via_daemon:
        yd = np.fromfile(daemon_forward(d, pack, layer, ck_dir, B, T, os.path.join(d, "hidden.f32")), "<f4")
        assert yd.tobytes() == y32.tobytes(), f"{name}: engramd's rows gave a different output than the pack's"

    print(f"{name:32s} K={K} D={D} B={B} T={T} M={M} dead={len(dead_at)}: max abs err vs torch f32 "
          f"{errors['float32']:.2e}, f64 {errors['float64']:.2e}; bf16 streams: {differing} of {yb.size} one step "
          f"off, the rest identical{'; engramd: identical' if via_daemon else ''}")


def main():
    global ENGRAMCTL, ENGRAMD, TOKENIZER
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    ENGRAMCTL, ENGRAMD, TOKENIZER, work = sys.argv[1:]
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)
    for i, case in enumerate(CASES):
        run_case(work, case, seed=41 + i)
    print(f"all {len(CASES)} cases within {TOLERANCE} (f32) and one bf16 step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
