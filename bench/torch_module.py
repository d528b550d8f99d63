#!/usr/bin/python3
"""PyTorch's side of `engram-bench module`: the Engram module as re-stated in
tests/crosscheck/engram_module_test.py, timed with the same shapes, random inputs and thread count
(torch.set_num_threads), in float32 on the CPU, under torch.no_grad(). Prints one JSON line.

Usage: bench/torch_module.py [--batch B] [--seq-len T] [--branches G] [--hidden D] [--embed M]
                             [--dilation N] [--threads N] [--duration S]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "crosscheck"))
from engram_module_test import engram_module  # noqa: E402
from dsv41_module_test import dsv41_module  # noqa: E402


def time_calls(fn, duration):
    times = []
    with torch.no_grad():
        fn()  # untimed first call
        start = time.perf_counter()
        while time.perf_counter() - start < duration or len(times) < 3:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times


def dsv41(a):
    """DeepSeek-V4.1's module as stated in tests/crosscheck/dsv41_module_test.py."""
    B, T, K, D, M = a.batch, a.seq_len, a.branches, a.hidden or 5120, a.embed or 6144
    W = {"wkv": torch.randn((K + 1) * D, M) / math.sqrt(M), "q_weight": 1 + 0.1 * torch.randn(K, D),
         "k_weight": 1 + 0.1 * torch.randn(K, D)}
    E = torch.randn(B * T, M)
    H = torch.randn(B * T, K, D)
    dead = torch.zeros(B * T, dtype=torch.bool)
    times = time_calls(lambda: dsv41_module(E, H, W, dead, 1e-20), a.duration)
    median = times[len(times) // 2]
    print(json.dumps({"tool": "torch_module", "mode": "module", "variant": "dsv41",
                      "impl": f"pytorch-{torch.__version__}", "batch": B, "seq_len": T, "streams": K, "hidden": D,
                      "embed": M, "threads": a.threads, "calls": len(times), "median_ms": median * 1e3,
                      "tokens_per_s": B * T / median}))
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--variant", choices=["demo", "dsv41"], default="demo")
    p.add_argument("--hidden", type=int, default=0, help="D (default 1024; dsv41: 5120)")
    p.add_argument("--embed", type=int, default=0, help="M (default 1024; dsv41: 6144)")
    p.add_argument("--dilation", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--duration", type=float, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    if a.variant == "dsv41":
        return dsv41(a)
    B, T, G, D, M = a.batch, a.seq_len, a.branches, a.hidden or 1024, a.embed or 1024
    W = {}
    for g in range(G):
        W[f"key_projs.{g}.weight"] = torch.randn(D, M) / math.sqrt(M)
        W[f"key_projs.{g}.bias"] = 0.1 * torch.randn(D)
        W[f"norm1.{g}.weight"] = 1 + 0.1 * torch.randn(D)
        W[f"norm2.{g}.weight"] = 1 + 0.1 * torch.randn(D)
        W[f"short_conv.norms.{g}.weight"] = 1 + 0.1 * torch.randn(D)
    W["value_proj.weight"] = torch.randn(D, M) / math.sqrt(M)
    W["value_proj.bias"] = 0.1 * torch.randn(D)
    W["short_conv.conv.weight"] = 0.5 * torch.randn(G * D, 1, 4)
    E = torch.randn(B, T, M)
    H = torch.randn(B, T, G, D)
    times = []
    with torch.no_grad():
        engram_module(E, H, W, a.dilation)  # untimed first call
        start = time.perf_counter()
        while time.perf_counter() - start < a.duration or len(times) < 3:
            t0 = time.perf_counter()
            engram_module(E, H, W, a.dilation)
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"tool": "torch_module", "mode": "module", "impl": f"pytorch-{torch.__version__}",
                      "batch": B, "seq_len": T, "branches": G, "hidden": D, "embed": M, "dilation": a.dilation,
                      "threads": a.threads, "calls": len(times), "median_ms": median * 1e3,
                      "tokens_per_s": B * T / median}))


if __name__ == "__main__":
    main()
