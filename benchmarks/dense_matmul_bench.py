"""The float path's matmul: MKL (F.linear) vs lmgen's fixed-order kernel (csrc/dense_gemm.h, batch-invariant),
on SmolLM2-135M's layer shapes at 1, 8, 32 and 512 rows, alternating the two call by call so that a busy
machine's noise hits both alike; median ms per call and the ratio.

    .venv/bin/python benchmarks/dense_matmul_bench.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmgen.layers.kernels import load_extension

    ext = load_extension()
    print(f"machine: {machine()}")
    print(f"{'shape':<20}{'rows':>6}{'MKL ms':>10}{'fixed ms':>10}{'fixed/MKL':>11}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        for m in (1, 8, 32, 512):
            x = torch.randn(m, k)
            reps = max(3, args.repeats // (8 if m * n * k > 2**28 else 1))
            mkl, fixed = [], []
            F.linear(x, w), ext.dense_linear(x, w, None, 0)
            for _ in range(reps):
                t0 = time.perf_counter()
                F.linear(x, w)
                t1 = time.perf_counter()
                ext.dense_linear(x, w, None, 0)
                t2 = time.perf_counter()
                mkl.append(t1 - t0)
                fixed.append(t2 - t1)
            a, b = statistics.median(mkl) * 1e3, statistics.median(fixed) * 1e3
            print(f"{name:<20}{m:>6}{a:>10.3f}{b:>10.3f}{b / a:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
