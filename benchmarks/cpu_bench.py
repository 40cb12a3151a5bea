"""CPU side by side on one GGUF file (the embedded SmolLM2-135M-Instruct Q4_1, or --model PATH, e.g. the Gemma 3
270M of the test extras): lmgen (each quantization mode), transformers (gguf_file=, fp32) and llama.cpp
(llama-cpp-python, `pip install -e .[bench]`, built from source) — prefill of a 512-token prompt, decode of 128
tokens at depth 0 (after a 16-token prompt) and at depth 512 (after the 512-token prompt), 2 threads, median of 5,
peak RSS.

    .venv/bin/python benchmarks/cpu_bench.py [--model FILE.gguf] [--repeats 5] [--threads 2]
                                             [--engines lmgen:none,lmgen:auto,...] [--no-batch-invariant]
    .venv/bin/python benchmarks/cpu_bench.py --depths 0,512,2048,8192 --prefills 512,2048,8192 [--rounds 3]
        [--profile] [--baseline-src /work/main/src]      context depth (depth_bench.py): engines lmgen:auto (the
        default float16 KV cache), lmgen:auto:float32 (float32 cache), main:auto (lmgen from --baseline-src) and
        llama.cpp, interleaved round by round; medians over the rounds

Each engine runs in its own subprocess (one after the other, same machine state) so that its peak RSS is
its own; "+model" is the peak minus the RSS after importing the engine's runtime (torch etc.), i.e. what the
weights, the KV cache in use and the activations cost. The script also measures the memory bandwidth, and prints each decode figure against the
bandwidth limit: decode must read every weight once per token, so tok/s <= bandwidth / weight bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import embedded_gguf, machine, random_ids, workload_args  # noqa: E402
from depth_bench import llama_cpp_depths, lmgen_depths  # noqa: E402

ENGINES = ["lmgen:none", "lmgen:auto", "lmgen:int8", "lmgen:int4", "transformers", "llama.cpp"]


def _prompts(n_prompt: int) -> tuple[list[int], list[int]]:
    prompt = random_ids(n_prompt)
    return prompt, prompt[:16]


def run_lmgen(mode: str, prompt, short, new_tokens: int, repeats: int, batch_invariant: bool = True,
              path: Path | None = None) -> dict:
    from lmgen import LLM, SamplingParams

    llm = LLM(None if path is None else str(path), quantization=mode, enable_prefix_caching=False,
              batch_invariant=batch_invariant, context_length=2 * (len(prompt) + new_tokens),
              kv_cache_tokens=2 * (len(prompt) + new_tokens))
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    prefill, decode, deep = [], [], []
    llm.generate(prompt, one)
    llm.generate(short, many)  # warm-up (first calls build kernels / caches)
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompt, one)
        prefill.append(time.perf_counter() - t0)
        for context, out in ((short, decode), (prompt, deep)):
            s0 = llm.engine.stats.decode_seconds
            llm.generate(context, many)
            out.append((llm.engine.stats.decode_seconds - s0) / (new_tokens - 1))
    return {"prefill": len(prompt) / statistics.median(prefill), "decode": 1 / statistics.median(decode),
            "decode_deep": 1 / statistics.median(deep), "weight_bytes": llm.model.weight_bytes()}


def run_transformers(prompt, short, new_tokens: int, repeats: int, path: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids, sid = torch.tensor([prompt]), torch.tensor([short])
    prefill, decode = [], []
    with torch.inference_mode():
        model(ids)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            prefill.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(sid)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            model.generate(sid, attention_mask=torch.ones_like(sid), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=2)
            decode.append((time.perf_counter() - t0 - first) / (new_tokens - 1))
    return {"prefill": len(prompt) / statistics.median(prefill), "decode": 1 / statistics.median(decode),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def run_llama_cpp(prompt, short, new_tokens: int, repeats: int, threads: int, path: Path) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=False)
    prefill, decode, deep = [], [], []
    llm.reset()
    llm.eval(prompt)
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill.append(time.perf_counter() - t0)
        for context, out in ((short, decode), (prompt, deep)):
            llm.reset()
            llm.eval(context)
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):  # like llama-bench's tg: one token per eval, no sampling
                llm.eval([context[-1]])
            out.append((time.perf_counter() - t0) / (new_tokens - 1))
    return {"prefill": len(prompt) / statistics.median(prefill), "decode": 1 / statistics.median(decode),
            "decode_deep": 1 / statistics.median(deep), "weight_bytes": path.stat().st_size}


def _vm_kib(field: str) -> int:
    """VmHWM (peak) / VmRSS of this process. Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child(engine: str, args) -> None:
    if engine.startswith("lmgen:"):
        # the runtime's own footprint, before any model; first, as an application would import it: then torch
        # loads with OpenMP's passive wait (lmgen/openmp_wait.py)
        import lmgen  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    if not engine.startswith("lmgen:"):
        import transformers  # noqa: F401
    base = _vm_kib("VmRSS")
    prompt, short = _prompts(args.prompt_tokens)
    path = Path(args.model) if args.model else embedded_gguf()
    if args.depths:
        depths, prefills = _ints(args.depths), _ints(args.prefills)
        if engine == "llama.cpp":
            res = llama_cpp_depths(path, args.threads, depths, prefills, args.new_tokens, args.repeats)
        else:
            from lmgen import LLM

            parts = engine.split(":")  # lmgen:QUANT[:KV_DTYPE] or main:QUANT (the baseline tree: no kv option)
            kw = {"kv_cache_dtype": parts[2]} if len(parts) > 2 else {}
            llm = LLM(str(path), quantization=parts[1], batch_invariant=not args.no_batch_invariant, **kw)
            res = lmgen_depths(llm, depths, prefills, args.new_tokens, args.repeats, args.profile)
    elif engine.startswith("lmgen:"):
        res = run_lmgen(engine.split(":", 1)[1], prompt, short, args.new_tokens, args.repeats,
                        not args.no_batch_invariant, path if args.model else None)
    elif engine == "transformers":
        res = run_transformers(prompt, short, args.new_tokens, args.repeats, path)
    elif engine == "llama.cpp":
        res = run_llama_cpp(prompt, short, args.new_tokens, args.repeats, args.threads, path)
    else:
        raise SystemExit(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    res["peak_rss_mib"] = _vm_kib("VmHWM") / 1024
    res["model_rss_mib"] = (_vm_kib("VmHWM") - base) / 1024
    print("RESULT " + json.dumps(res))


def bandwidth_gbs(size_mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth: summing a buffer much larger than the caches (torch, all threads)."""
    import torch

    x = torch.ones(size_mib * 2**20 // 4)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _run_child(engine: str, args, extra: list[str], env=None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", engine, "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), *extra]
    cmd += ["--no-batch-invariant"] if args.no_batch_invariant else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{engine:<22} skipped: {tail}", flush=True)
        return None
    return json.loads(line[0][7:])


def depth_main(args) -> None:
    """Decode after each depth and prefill of each length, every engine once per round, medians over rounds."""
    import os

    engines = args.engines.split(",") if args.engines != ",".join(ENGINES) else \
        ["lmgen:auto", "lmgen:auto:float32", "llama.cpp"] + (["main:auto"] if args.baseline_src else [])
    extra = ["--depths", args.depths, "--prefills", args.prefills] + (["--profile"] if args.profile else [])
    print(f"machine: {machine()}")
    print(f"load average before: {os.getloadavg()} | {args.threads} threads | decode {args.new_tokens} tokens, "
          f"median of {args.repeats} per round, {args.rounds} round(s)", flush=True)
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for r in range(args.rounds):
        for engine in engines:
            env = None
            if engine.startswith("main:"):
                env = dict(os.environ, PYTHONPATH=args.baseline_src)
            res = _run_child(engine, args, extra, env)
            if res:
                runs[engine].append(res)
                print(f"round {r + 1} {engine}: {json.dumps({k: res[k] for k in ('decode', 'prefill')})}", flush=True)
    print(f"load average after: {os.getloadavg()}")
    med = {e: {kind: {k: statistics.median(x[kind][k] for x in rs) for k in rs[0][kind]}
               for kind in ("decode", "prefill")} for e, rs in runs.items() if rs}
    ref = med.get("llama.cpp")
    for kind, label in (("decode", "decode tok/s after depth"), ("prefill", "prefill tok/s of prompt")):
        keys = list(next(iter(med.values()))[kind]) if med else []
        print(f"\n{label:<28}" + "".join(f"{k:>16}" for k in keys))
        for e, m in med.items():
            cells = "".join(f"{m[kind][k]:>9.1f}" + (f" ({m[kind][k] / ref[kind][k]:.2f}x)" if ref and e != "llama.cpp"
                                                     else " " * 8) for k in keys)
            print(f"{e:<28}{cells}")
    for e, rs in runs.items():
        for d, shares in (rs[-1].get("profile") or {}).items() if rs else ():
            parts = ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if k != "ms_per_token")
            print(f"profile {e} depth {d}: {shares['ms_per_token']:.2f} ms/token: {parts}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--no-batch-invariant", action="store_true",
                    help="lmgen engines with LLM(batch_invariant=False) (the faster non-invariant mode)")
    ap.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--depths", default=None, help="context depths to decode after, e.g. 0,512,2048,8192")
    ap.add_argument("--prefills", default="512,2048,8192", help="prompt lengths to prefill (with --depths)")
    ap.add_argument("--rounds", type=int, default=1, help="with --depths: rounds of all engines, interleaved")
    ap.add_argument("--profile", action="store_true", help="with --depths: lmgen's per-stage decode time per depth")
    ap.add_argument("--baseline-src", default=None, help="with --depths: engine main:auto runs lmgen from this src/")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args)
    if args.depths:
        return depth_main(args)
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    bw = bandwidth_gbs()
    model = Path(args.model) if args.model else embedded_gguf()
    gguf_mib = model.stat().st_size / 2**20
    print(f"memory read bandwidth: {bw:.1f} GB/s | model file {model.name} {gguf_mib:.1f} MiB | prompt {args.prompt_tokens} tokens, "
          f"decode {args.new_tokens} tokens, {args.threads} threads, median of {args.repeats}, "
          f"lmgen batch_invariant={not args.no_batch_invariant}")
    results = {}
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        cmd += ["--no-batch-invariant"] if args.no_batch_invariant else []
        cmd += ["--model", args.model] if args.model else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{engine:<22} skipped: {tail}")
            continue
        results[engine] = json.loads(line[0][7:])
    ref = results.get("llama.cpp")
    print(f"{'engine':<22}{'prefill tok/s':>14}{'decode tok/s':>14}{'@512 tok/s':>12}{'peak RSS MiB':>14}{'+model MiB':>12}"
          f"{'weights MiB':>13}{'x llama.cpp pp':>16}{'x llama.cpp tg':>16}{'tg@512':>8}{'% bw limit':>12}")
    for engine, r in results.items():
        limit = bw * 1e9 / r["weight_bytes"]
        rp = f"{r['prefill'] / ref['prefill']:.2f}" if ref else "-"
        rd = f"{r['decode'] / ref['decode']:.2f}" if ref else "-"
        deep = r.get("decode_deep")
        rdd = f"{deep / ref['decode_deep']:.2f}" if ref and deep else "-"
        print(f"{engine:<22}{r['prefill']:>14.1f}{r['decode']:>14.1f}{deep or 0:>12.1f}{r['peak_rss_mib']:>14.0f}"
              f"{r['model_rss_mib']:>12.0f}{r['weight_bytes'] / 2**20:>13.1f}{rp:>16}{rd:>16}{rdd:>8}"
              f"{100 * r['decode'] / limit:>11.0f}%")


if __name__ == "__main__":
    main()
