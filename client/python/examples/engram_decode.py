#!/usr/bin/python3
"""An engine's model file in miniature: DeepSeek-V4.1's Engram layers as torch.nn.Modules fed by
engramd, driven by a short decode loop.

How a vLLM or SGLang model would hold them:
  - at step start the token ids of the step are known, so every Engram layer's rows are known:
    the rows of later layers are prefetched (engramd stages them from NVMe while the early
    layers run) and their lookups issued asynchronously;
  - at each Engram layer the rows arrive in a preallocated uint8 tensor, are dequantized
    (engram.dequantize: FP8 values times their block scales) and the module updates the
    residual streams: h_k += g_k * v (no ShortConv; one fused projection gives a key per stream
    and one shared value; the gate is 0 at dead positions, token id -1).
The weights here are random (seeded): the point is the data path. A real model loads wkv, its
block scales, q_weight and k_weight from the checkpoint (engram.EngramLayer does, in C++).

    client/python/examples/engram_decode.py --daemon unix:///run/engram/engramd.sock --table engram
"""
import argparse
import math
import time

import numpy as np
import torch

import engram


class EngramBlock(torch.nn.Module):
    """The Engram module of one decoder layer (DSV41.md): streams [N, K, D], embeddings [N, M]."""

    def __init__(self, hidden_size, hc_mult, embed_width, eps=1e-20, generator=None):
        super().__init__()
        K, D, M = hc_mult, hidden_size, embed_width
        self.hc_mult, self.hidden_size, self.eps = K, D, eps
        self.wkv = torch.nn.Parameter(torch.randn((K + 1) * D, M, generator=generator) / math.sqrt(M),
                                      requires_grad=False)
        self.q_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(K, D, generator=generator), requires_grad=False)
        self.k_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(K, D, generator=generator), requires_grad=False)

    def forward(self, h, embeddings, dead):
        K, D = self.hc_mult, self.hidden_size
        kv = embeddings @ self.wkv.T                          # [N, (K+1) D]
        keys, value = kv[:, :K * D].view(-1, K, D), kv[:, K * D:]
        a = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.q_weight
        b = keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + self.eps) * self.k_weight
        d = (a * b).sum(-1) / math.sqrt(D)                      # [N, K]
        g = torch.sigmoid(torch.sign(d) * torch.sqrt(torch.clamp(d.abs(), min=1e-6)))
        g = g.masked_fill(dead.unsqueeze(-1), 0.0)
        return h + g.unsqueeze(-1) * value.unsqueeze(1)


class EngramModel(torch.nn.Module):
    """Every Engram layer of `table`, with a stand-in (`between`) for the rest of each block."""

    def __init__(self, client, table, hidden_size, hc_mult, seed=0):
        super().__init__()
        self.client, self.table = client, table
        generator = torch.Generator().manual_seed(seed)
        width = table.heads * table.dim
        self.blocks = torch.nn.ModuleDict({str(l): EngramBlock(hidden_size, hc_mult, width, generator=generator)
                                           for l in table.layer_ids})
        self._buffers_for = {}

    @staticmethod
    def between(h):
        """The attention and MLP of the block would run here; a fixed smooth map stands in."""
        return h + 0.25 * torch.tanh(h)

    def _rows_buffer(self, layer, tokens):
        key = (layer, tokens)
        if key not in self._buffers_for:  # preallocated once per shape, reused every step
            self._buffers_for[key] = torch.empty((tokens, self.table.heads, self.table.row_bytes), dtype=torch.uint8)
        return self._buffers_for[key]

    def step(self, token_ids, h):
        """token_ids [B, T] (int32), h [B*T, K, D] float32 -> h after every Engram layer and block."""
        idx = self.table.hash(token_ids)                    # [B, T, layers, heads], int32 (torch in)
        tokens = idx.shape[0] * idx.shape[1]
        idx = idx.reshape(tokens, len(self.table.layer_ids), self.table.heads)
        dead = (token_ids.reshape(-1) == self.table.dead_token_id) if self.table.dead_token_id is not None \
            else torch.zeros(tokens, dtype=torch.bool)
        layers = self.table.layer_ids
        # Step start: later layers' rows are prefetched and fetched while the early layers run.
        pending = {}
        for i, layer in enumerate(layers[1:], start=1):
            self.client.prefetch(self.table, layer, idx[:, i])
            pending[layer] = self.client.lookup_async(self.table, layer, idx[:, i],
                                                      out=self._rows_buffer(layer, tokens))
        for i, layer in enumerate(layers):
            if layer in pending:
                rows = pending.pop(layer).result()
            else:
                rows = self.client.lookup(self.table, layer, idx[:, i], out=self._rows_buffer(layer, tokens))
            embeddings = engram.dequantize(rows, self.table)  # [tokens, heads * dim] float32
            h = self.blocks[str(layer)](h, embeddings, dead)
            h = self.between(h)
        return h


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--daemon", required=True, help="unix:///SOCKET or grpc://HOST:PORT")
    p.add_argument("--table", required=True)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prompt")
    p.add_argument("--hidden", type=int, default=512, help="hidden size D (V4.1-Flash: 5120)")
    p.add_argument("--hc", type=int, default=4, help="hyper-connection streams K")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    with engram.connect(a.daemon) as client:
        table = client.open_table(a.table)
        model = EngramModel(client, table, a.hidden, a.hc)
        rng = np.random.default_rng(0)
        prompt = torch.from_numpy(rng.integers(0, 100000, (1, a.prompt_tokens)).astype(np.int32))
        h = torch.randn(a.prompt_tokens, a.hc, a.hidden)
        t0 = time.perf_counter()
        h = model.step(prompt, h)
        print("prefill: %d tokens in %.2f ms" % (a.prompt_tokens, 1e3 * (time.perf_counter() - t0)))
        context = prompt
        for s in range(a.steps):
            # Decode: the new token's n-grams reach back into the context; hash the recent window
            # and keep the last position.
            token = torch.from_numpy(rng.integers(0, 100000, (1, 1)).astype(np.int32))
            context = torch.cat([context, token], dim=1)[:, -table.max_ngram:]
            t0 = time.perf_counter()
            out = model.step(context, torch.randn(context.shape[1], a.hc, a.hidden))[-1]
            print("step %d: token %d, %.2f ms, |h| %.3f" % (s, int(token), 1e3 * (time.perf_counter() - t0),
                                                           float(out.norm())))


if __name__ == "__main__":
    main()
