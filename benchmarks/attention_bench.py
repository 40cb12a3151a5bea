"""The attention kernel alone (csrc/attention.h through `paged_attention`): ns per (position, head) and GMAC/s for a
decode token at depth and for a causal prefill chunk, per KV cache dtype and thread count.

    .venv/bin/python benchmarks/attention_bench.py            # SmolLM2's and Gemma 3's head shapes
"""

from __future__ import annotations

import time

import torch

from lmgen.layers.attention import to_cache_dtype
from lmgen.layers.kernels import fused_ops


def bench(ops, heads: int, kv_heads: int, D: int, depth: int, T: int, dtype: torch.dtype, threads: int,
          reps: int) -> str:
    """T new tokens of one sequence after `depth` cached ones (T=1: a decode step), the cache of random rows."""
    torch.set_num_threads(threads)
    bs, n = 16, depth + T
    blocks = n // bs + 2
    k = to_cache_dtype(torch.randn(blocks, kv_heads, bs, D), dtype)  # (blocks, kv_heads, block_size, row)
    v = to_cache_dtype(torch.randn(blocks, kv_heads, bs, D), dtype)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D)
    cos, sin = torch.ones(T, D), torch.zeros(T, D)
    kv_index, slots = torch.arange(n)[None], torch.arange(depth, n)
    seq, start = torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long)
    lens = torch.arange(depth + 1, n + 1)  # causal: token t sees positions [0, depth + t]

    def call():
        return ops.paged_attention(qkv, cos, sin, k, v, slots, kv_index, seq, start, lens, heads, kv_heads, D ** -0.5)

    for _ in range(3):
        call()
    t0 = time.perf_counter()
    for _ in range(reps):
        call()
    dt = (time.perf_counter() - t0) / reps
    pos_heads = heads * int(lens.sum())
    return (f"heads {heads}/{kv_heads} D {D:3d} depth {depth:5d} T {T:4d} {str(dtype)[6:]:8s} {threads} thr: "
            f"{dt * 1e3:8.3f} ms {dt / pos_heads * 1e9:7.2f} ns/position-head {2 * D * pos_heads / dt / 1e9:6.1f} GMAC/s")


def main() -> None:
    ops = fused_ops()
    if ops is None:
        raise SystemExit("the compiled kernels are unavailable here")
    for dtype in (torch.float16, torch.int8, torch.float32):
        for threads in (1, 2):
            print(bench(ops, 9, 3, 64, 2048, 1, dtype, threads, reps=100), flush=True)  # SmolLM2 decode at 2,048
    for threads in (1, 2):
        print(bench(ops, 9, 3, 64, 0, 512, torch.float16, threads, reps=5), flush=True)  # SmolLM2 prefill 512
        print(bench(ops, 4, 1, 256, 0, 512, torch.float16, threads, reps=5), flush=True)  # Gemma 3 prefill 512


if __name__ == "__main__":
    main()
