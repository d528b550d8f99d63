#!/usr/bin/python3
"""Per-call cost of the `engram` Python package: client.lookup into a preallocated buffer, timed
call by call (time.perf_counter_ns), the way `engram-bench --target unix://` times the C++ client
(same daemon, table, batch size, Zipf 1.0 indices generated before timing). Prints one JSON line
with p50/p90/p99 in microseconds and rows/s. bench/run_python.sh runs both, interleaved.

Usage: bench/py_lookup.py --daemon URI --table NAME [--pack DIR] [--batch-tokens N] [--duration S]
                          [--no-map] [--out numpy|torch] [--batches N] [--workload zipf:ALPHA]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.environ.get("ENGRAM_PYTHONPATH", os.path.join(os.path.dirname(__file__), "..", "build",
                                                                     "python")))
import engram  # noqa: E402


def zipf_indices(table, layer_id, layer_rows, tokens, rng, alpha=1.0):
    """Per-head Zipf(alpha) over each head's rows (alpha 0: uniform), as engram-bench's zipf:ALPHA
    workload draws them (bench/workload.cc): rank r goes to row (r * a + b) mod rows, with the same
    a and b per head and layer, so the hot rows are scattered over the head as hashed n-grams are
    (hot rows side by side would share pages and cache lines, and flatter the gather)."""
    out = np.empty((tokens, table.heads), dtype=np.uint32)
    m64 = (1 << 64) - 1
    for h, rows in enumerate(layer_rows):
        if alpha == 0:
            out[:, h] = rng.integers(0, rows, size=tokens)
            continue
        ranks = np.arange(1, rows + 1, dtype=np.float64)
        p = ranks ** -alpha
        p /= p.sum()
        rank = rng.choice(rows, size=tokens, p=p).astype(np.uint64)
        a = 1 + ((0x9E3779B97F4A7C15 * (h + 1) + layer_id) & m64) % (rows - 1)
        b = ((0xBF58476D1CE4E5B9 * (h + 7)) & m64) % rows
        # rank, a, b < rows < 2**32: rank * a + b fits in 64 bits.
        out[:, h] = ((rank * np.uint64(a) + np.uint64(b)) % np.uint64(rows)).astype(np.uint32)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", required=True)
    p.add_argument("--table", required=True)
    p.add_argument("--batch-tokens", type=int, default=1)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--workload", default="zipf:1.0", help="zipf:ALPHA (zipf:0 is uniform), as engram-bench")
    p.add_argument("--no-map", action="store_true", help="unix://: copy from the arena instead of mapping the table")
    p.add_argument("--out", choices=["numpy", "torch"], default="numpy")
    p.add_argument("--pack", help="the table's pack (for the head sizes); default: from the daemon's layout")
    a = p.parse_args()
    with engram.connect(a.daemon, map_tables=not a.no_map) as client:
        table = client.open_table(a.table)
        # Batches take the layers in turn, as engram-bench's do. Head sizes: from the pack when
        # given, else a safe lower bound (the smallest base size).
        layers = table.layer_ids
        head_rows = {}
        for layer in layers:
            if a.pack:
                manifest = json.load(open(os.path.join(a.pack, "manifest.json")))
                head_rows[layer] = next(l for l in manifest["layers"] if l["id"] == layer)["head_rows"]
            else:
                head_rows[layer] = [min(table.vocab_per_ngram)] * table.heads
        rng = np.random.default_rng(1)
        if not a.workload.startswith("zipf:"):
            p.error("--workload must be zipf:ALPHA")
        alpha = float(a.workload[5:])
        batches = [(layers[i % len(layers)],
                    zipf_indices(table, layers[i % len(layers)], head_rows[layers[i % len(layers)]], a.batch_tokens,
                                 rng, alpha))
                   for i in range(a.batches)]
        if a.out == "torch":
            import torch
            out = torch.empty((a.batch_tokens, table.heads, table.row_bytes), dtype=torch.uint8)
        else:
            out = np.empty((a.batch_tokens, table.heads, table.row_bytes), dtype=np.uint8)
        lookup = client.lookup
        for layer, b in batches:  # warm: first touches, mappings
            lookup(table, layer, b, out)
        times = []
        clock = time.perf_counter_ns
        end = clock() + int(a.duration * 1e9)
        i = 0
        while clock() < end:
            layer, b = batches[i % len(batches)]
            t0 = clock()
            lookup(table, layer, b, out)
            times.append(clock() - t0)
            i += 1
        t = np.array(times, dtype=np.float64) / 1e3
        print(json.dumps({"tool": "py_lookup", "target": a.daemon.split(":")[0], "mapped": client.is_mapped(table),
                          "out": a.out, "batch_tokens": a.batch_tokens, "workload": a.workload, "requests": len(times),
                          "p50_us": float(np.percentile(t, 50)), "p90_us": float(np.percentile(t, 90)),
                          "p99_us": float(np.percentile(t, 99)),
                          "rows_per_s": a.batch_tokens * table.heads * len(times) / (t.sum() / 1e6)}))


if __name__ == "__main__":
    main()
