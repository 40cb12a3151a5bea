"""Tensor and pipeline parallelism on this machine: the cost of one collective, and prefill / decode speed and
weight memory of rank 0 for the embedded SmolLM2 (packed, as served) at TP=1, TP=3 (its 9 heads / 3 KV heads allow
1, 3 and 9; exact layout and Megatron's) and PP=2, one run.

    python benchmarks/parallel_bench.py [--repeats 3] [--prompt-tokens 512] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lmgen  # noqa: F401  before torch: torch then loads with OpenMP's passive wait, as users get it
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, machine  # noqa: E402


def collective_child(rank: int, world: int, url: str, shapes: list, repeats: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    rows = []
    for shape in shapes:
        x = torch.randn(*shape)
        for name, op in (("all_reduce", lambda: dist.all_reduce(x)),
                         ("all_gather", lambda: dist.all_gather([torch.empty_like(x) for _ in range(world)], x))):
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                times.append(time.perf_counter() - t0)
            rows.append((name, tuple(shape), statistics.median(times) * 1e6))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def collectives(world: int, hidden: int) -> list:
    import torch.multiprocessing as mp

    url = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    shapes = [(1, hidden), (16, hidden), (512, hidden)]
    procs = [ctx.Process(target=collective_child, args=(r, world, url, shapes, 50, out)) for r in range(world)]
    for p in procs:
        p.start()
    rows = out.get(timeout=300)
    for p in procs:
        p.join()
    return rows


def speed(tp: int, pp: int, invariant: bool, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    from lmgen import LLM, SamplingParams

    with LLM(quantization="auto", threads=1, tensor_parallel_size=tp, pipeline_parallel_size=pp,
             batch_invariant=invariant, enable_prefix_caching=False) as llm:
        prompt = (list(range(1000, 1000 + prompt_tokens)))
        pre, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
            pre.append(prompt_tokens / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            out = llm.generate([prompt[:8]], SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True))
            dec.append(len(out[0].outputs[0].token_ids) / (time.perf_counter() - t0))
        return {"prefill": statistics.median(pre), "decode": statistics.median(dec),
                "weights_mib": llm.model.weight_bytes() / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print("gloo collectives, 2 ranks x 1 thread, median of 50 (microseconds):")
    for name, shape, us in collectives(2, 576):
        print(f"  {name:<11} {str(shape):<12} {us:9.1f}")
    print(f"SmolLM2-135M Q4_1, 1 thread per rank, prefill {args.prompt_tokens} tokens, decode {args.new_tokens}, "
          f"median of {args.repeats}:")
    print(f"  {'config':<28}{'prefill tok/s':>14}{'decode tok/s':>14}{'weights/rank MiB':>18}")
    for tp, pp, invariant in ((1, 1, True), (3, 1, True), (3, 1, False), (1, 2, True)):
        r = speed(tp, pp, invariant, args.prompt_tokens, args.new_tokens, args.repeats)
        label = f"PP={pp}" if pp > 1 else f"TP={tp}" + ("" if tp == 1 else (" exact (default)" if invariant
                                                                          else " Megatron all-reduce"))
        print(f"  {label:<28}{r['prefill']:>14.1f}{r['decode']:>14.1f}{r['weights_mib']:>18.1f}")


if __name__ == "__main__":
    main()
