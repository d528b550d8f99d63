#!/usr/bin/python3
"""The CPU twin of the Engram module against a PyTorch re-statement of the paper's equations.

For each case: make a pack with `engramctl pack create --layout` (row dtype, heads, per-head dim,
max_ngram), random weights in a safetensors file (the reference module's state-dict names),
random hidden states and token ids; run `engramctl forward --device cpu`, which hashes, reads the
rows from the pack, dequantizes and runs the module; then
  1. decode the rows it used straight from the pack's row file with the independent numpy decoder
     below and require them bit-equal to the embeddings it dumped (dequantization, gather);
  2. run the module below in float32 and in float64 on those embeddings and require the CPU twin's
     output within 1e-4 (max abs) of both.
Rows are dequantized exactly to f32 for every dtype (bf16, f16 and fp8 values are all f32
values), so the f32 tolerance applies to every row dtype.

Usage: engram_module_test.py ENGRAMCTL WORKDIR
"""
import json
import math
import os
import subprocess
import sys

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # ctest reports exit 77 as skipped; tests/run.sh installs python3-torch
    print("SKIP: PyTorch is not installed for /usr/bin/python3 (apt-get install python3-torch)")
    sys.exit(77)

TOLERANCE = 1e-4
F32_EPS = float(torch.finfo(torch.float32).eps)


# ---- the module, re-stated ------------------------------------------------------------------

def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def engram_module(E, H, W, dilation):
    """E [B,T,M], H [B,T,G,D] -> Y = V + ShortConv(V), [B,T,G,D]."""
    B, T, G, D = H.shape
    value = E @ W["value_proj.weight"].T + W["value_proj.bias"]
    gates = []
    for g in range(G):
        key = rms_norm(E @ W[f"key_projs.{g}.weight"].T + W[f"key_projs.{g}.bias"], W[f"norm1.{g}.weight"], F32_EPS)
        query = rms_norm(H[:, :, g, :], W[f"norm2.{g}.weight"], F32_EPS)
        score = (key * query).sum(dim=-1) / math.sqrt(D)
        score = torch.sign(score) * torch.sqrt(torch.clamp(score.abs(), min=1e-6))
        gates.append(torch.sigmoid(score))
    V = torch.stack(gates, dim=2).unsqueeze(-1) * value.unsqueeze(2)
    normed = torch.cat([rms_norm(V[:, :, g, :], W[f"short_conv.norms.{g}.weight"], 1e-5) for g in range(G)], dim=-1)
    taps = W["short_conv.conv.weight"].shape[-1]
    conv = F.conv1d(normed.transpose(1, 2), W["short_conv.conv.weight"], padding=(taps - 1) * dilation,
                    dilation=dilation, groups=G * D)[..., :T]
    return V + F.silu(conv).transpose(1, 2).reshape(B, T, G, D)


# ---- an independent row decoder ---------------------------------------------------------------

def e4m3_to_float(b):
    b = b.astype(np.int32)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * 2.0 ** -6
    out = sign * np.where(exp == 0, subnormal, normal)
    return np.where((exp == 15) & (man == 7), np.nan, out).astype(np.float32)


def decode_rows(raw, dtype, dim):
    """raw: uint8 [n, row_bytes] -> float32 [n, dim]."""
    if dtype == "f32":
        return raw.view("<f4").reshape(-1, dim)
    if dtype == "f16":
        return raw.view("<f2").astype(np.float32).reshape(-1, dim)
    if dtype == "bf16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(-1, dim)
    assert dtype == "fp8_e4m3_ue8m0x32"
    values = e4m3_to_float(raw[:, :dim])
    scales = np.exp2(raw[:, dim:].astype(np.float64) - 127.0).astype(np.float32)
    return values * np.repeat(scales, 32, axis=1)


# ---- files -------------------------------------------------------------------------------------

def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = np.ascontiguousarray(t.numpy().astype("<f4")).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def random_weights(G, D, M, rng):
    def t(*shape, scale=1.0, mean=0.0):
        return torch.from_numpy((mean + scale * rng.standard_normal(shape)).astype(np.float32))
    W = {}
    for g in range(G):
        W[f"key_projs.{g}.weight"] = t(D, M, scale=1 / math.sqrt(M))
        W[f"key_projs.{g}.bias"] = t(D, scale=0.1)
        W[f"norm1.{g}.weight"] = t(D, scale=0.1, mean=1.0)
        W[f"norm2.{g}.weight"] = t(D, scale=0.1, mean=1.0)
        W[f"short_conv.norms.{g}.weight"] = t(D, scale=0.1, mean=1.0)
    W["value_proj.weight"] = t(D, M, scale=1 / math.sqrt(M))
    W["value_proj.bias"] = t(D, scale=0.1)
    W["short_conv.conv.weight"] = t(G * D, 1, 4, scale=0.5)
    return W


CASES = [
    # name, B, T, G, D, row dtype, per-head dim, max_ngram, heads per order
    ("bf16_prefill", 2, 9, 4, 64, "bf16", 16, 3, 4),
    ("fp8_decode_T1", 1, 1, 2, 32, "fp8_e4m3_ue8m0x32", 32, 3, 2),
    ("f32_shorter_than_conv", 3, 2, 1, 48, "f32", 8, 4, 1),
    ("f16_long", 2, 33, 4, 128, "f16", 32, 2, 4),
    ("fp8_batch", 4, 12, 3, 96, "fp8_e4m3_ue8m0x32", 64, 3, 2),
    ("reference_demo_sizes", 1, 16, 4, 1024, "bf16", 64, 3, 8),
]


def run_case(engramctl, work, case, seed):
    name, B, T, G, D, dtype, dim, max_ngram, heads_per_ngram = case
    rng = np.random.default_rng(seed)
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    layout = {"format": "engram-pack/1", "name": name,
              "hash": {"kind": "engram-v1", "max_ngram": max_ngram, "heads_per_ngram": heads_per_ngram, "seed": seed,
                       "pad_id": 2, "compressed_vocab": 5000,
                       "vocab_per_ngram": [int(v) for v in rng.integers(3000, 9000, max_ngram - 1)]},
              "layers": [{"id": 3}, {"id": 7}], "row": {"dim": dim, "dtype": dtype}, "synthetic": {"seed": seed}}
    with open(os.path.join(d, "layout.json"), "w") as f:
        json.dump(layout, f)
    pack = os.path.join(d, "pack")
    subprocess.run([engramctl, "pack", "create", "--layout", os.path.join(d, "layout.json"), "--out", pack,
                    "--quiet", "--force"], check=True, stdout=subprocess.DEVNULL)
    heads = (max_ngram - 1) * heads_per_ngram
    M = heads * dim
    W = random_weights(G, D, M, rng)
    write_safetensors(os.path.join(d, "w.safetensors"), W)
    tokens = rng.integers(0, 5000, (B, T)).astype("<i4")
    if T > 4:
        tokens[:, T // 2:T // 2 + 2] = tokens[:, 0:2]  # repeated n-grams: duplicate rows in one batch
    tokens.tofile(os.path.join(d, "tokens.i32"))
    H = rng.standard_normal((B, T, G, D)).astype("<f4")
    H.tofile(os.path.join(d, "hidden.f32"))
    layer = 7
    cmd = [engramctl, "forward", "--pack", pack, "--layer", str(layer), "--weights", os.path.join(d, "w.safetensors"),
           "--tokens", os.path.join(d, "tokens.i32"), "--shape", f"{B},{T}", "--hidden", os.path.join(d, "hidden.f32"),
           "--hc", str(G), "--out", os.path.join(d, "y.f32"), "--device", "cpu",
           "--dump-embeddings", os.path.join(d, "e.f32"), "--dump-indices", os.path.join(d, "idx.u32")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    Y = np.fromfile(os.path.join(d, "y.f32"), "<f4").reshape(B, T, G, D)
    E = np.fromfile(os.path.join(d, "e.f32"), "<f4").reshape(B * T, M)
    idx = np.fromfile(os.path.join(d, "idx.u32"), "<u4").reshape(B * T, heads)

    # 1. The rows it used, decoded here from the row file.
    manifest = json.load(open(os.path.join(pack, "manifest.json")))
    lay = next(l for l in manifest["layers"] if l["id"] == layer)
    head_rows = np.array(lay["head_rows"], dtype=np.int64)
    assert (idx < head_rows[None, :]).all(), f"{name}: an index out of its head's range"
    offsets = np.concatenate([[0], np.cumsum(head_rows)[:-1]])
    row_bytes = manifest["row"]["bytes"]
    table = np.fromfile(os.path.join(pack, lay["file"]), np.uint8).reshape(-1, row_bytes)
    rows = offsets[None, :] + idx.astype(np.int64)
    expected_E = decode_rows(table[rows.reshape(-1)], dtype, dim).reshape(B * T, M)
    if not np.array_equal(expected_E, E):
        bad = np.argwhere(expected_E != E)[0]
        raise AssertionError(f"{name}: dequantized rows differ first at {tuple(bad)}: "
                             f"{E[tuple(bad)]} vs {expected_E[tuple(bad)]}")

    # 2. The module, in float32 and float64, against the twin.
    Et = torch.from_numpy(E).reshape(B, T, M)
    Ht = torch.from_numpy(H)
    errors = {}
    for torch_dtype in (torch.float32, torch.float64):
        ref = engram_module(Et.to(torch_dtype), Ht.to(torch_dtype), {k: v.to(torch_dtype) for k, v in W.items()},
                            dilation=max_ngram)
        errors[str(torch_dtype).split(".")[1]] = float((torch.from_numpy(Y).to(torch_dtype) - ref).abs().max())
    scale = float(np.abs(Y).max())
    print(f"{name:24s} B={B} T={T} G={G} D={D} M={M} dtype={dtype} max_ngram={max_ngram}: "
          f"max|Y|={scale:.3g} max abs err vs torch f32 {errors['float32']:.2e}, vs f64 {errors['float64']:.2e}")
    for k, e in errors.items():
        if not e <= TOLERANCE:
            raise AssertionError(f"{name}: max abs error vs torch {k} is {e:.3g} > {TOLERANCE}")
    return errors


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    engramctl, work = sys.argv[1], sys.argv[2]
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(0)
    for i, case in enumerate(CASES):
        run_case(engramctl, work, case, seed=11 + i)
    print(f"all {len(CASES)} cases within {TOLERANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
