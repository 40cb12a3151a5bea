"""Serving benchmark: N concurrent streaming clients against the same requests run one at a time.

Runs `lmgen serve` as users run it, in its own process on a free loopback port (--server thread: uvicorn in this
process instead, sharing its GIL with the clients), then:

* sequential: every prompt of the set sent alone, one request at a time (the baseline);
* for each N in --concurrency: N clients at once, each sending the same prompt set one after another
  over a streaming /v1/completions.

Every request is greedy with ignore_eos, so each produces exactly --max-tokens tokens and the work is
identical across modes. Measured on the client from SSE arrival times: output tok/s (all clients
together, over the wall time of the run), time to first token and inter-token latency (p50 / p99).
Ratios are against the sequential baseline. The clients are aiohttp's (a C HTTP parser): they share the
server's cores, and httpx's pure-Python stack spent ~0.5 s of CPU per 2,048 streamed tokens (aiohttp ~0.1 s).

The prefill reference: the model's 512-token prefill tok/s measured in this process as cpu_bench.py measures it
(distinct random prompts, max_tokens 1, median of 3), before and after each round's client runs, so "concurrent
tok/s / prefill tok/s" compares figures from the same minutes of a host whose speed drifts; --rounds N repeats
everything and reports medians (one round's ratio moved between 57% and 79% on the 2-vCPU host).

The offline reference: each round also runs the clients' workload through LLM.generate in this process (each
prompt as N sequences at once, no HTTP), so "x offline" separates what serving costs (HTTP, streaming, requests
arriving over several steps) from what the engine's batched steps cost.

    python benchmarks/serve_bench.py                          # N = 1, 4, 16
    python benchmarks/serve_bench.py --concurrency 1,8 --max-tokens 64 --model path/to/model.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import aiohttp

from common import free_port, machine
from depth_bench import prefill_tok_s

PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea:",
    "def quicksort(items):",
    "The three most important ideas in economics are",
    "Once upon a time, in a small village by the mountains,",
    "Photosynthesis is the process by which",
    "To make a good cup of tea, you should",
    "The main differences between TCP and UDP are",
]


@dataclass
class RequestTiming:
    ttft: float
    itl: list[float]
    tokens: int
    latency: float


@dataclass
class RunResult:
    mode: str
    clients: int
    timings: list[RequestTiming] = field(default_factory=list)
    wall: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(t.tokens for t in self.timings)

    @property
    def tok_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    def ttft(self, q: float) -> float:
        return _pct([t.ttft for t in self.timings], q)

    def itl(self, q: float) -> float:
        return _pct([x for t in self.timings for x in t.itl], q)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def machine_line(llm) -> str:
    return (f"machine: {machine()}\nmodel: {llm.model_name} on {llm.device}, {str(llm.dtype).replace('torch.', '')}, "
            f"batch_invariant={getattr(llm.model, 'batch_invariant', None)}")


async def one_request(session: aiohttp.ClientSession, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with session.post("/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")
        pending = b""
        async for data in r.content.iter_any():  # SSE events end with a blank line; one read may hold several
            now = time.perf_counter()
            *events, pending = (pending + data).split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                chunk = json.loads(event[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    arrivals.append(now)
    if not arrivals:
        raise RuntimeError("no tokens arrived")
    return RequestTiming(arrivals[0] - t0, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens, time.perf_counter() - t0)


async def run_clients(base: str, model: str, prompts: list[str], clients: int, max_tokens: int, mode: str) -> RunResult:
    result = RunResult(mode, clients)
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def user() -> None:
            for p in prompts:
                result.timings.append(await one_request(session, model, p, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(clients)))
        result.wall = time.perf_counter() - t0
    return result


def start_thread_server(llm, max_num_seqs: int, max_queue: int):
    """uvicorn in a background thread of this process -> (stop function, base URL)."""
    import uvicorn

    from lmgen.server.app import create_app

    port = free_port()
    app = create_app(llm, "bench", max_num_seqs=max_num_seqs, max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=60)

    return stop, f"http://127.0.0.1:{port}"


def start_process_server(args, max_queue: int):
    """`lmgen serve` in its own process -> (stop function, base URL), once /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmgen", "serve", "--port", str(port), "--served-model-name", "bench",
           "--max-num-seqs", str(args.max_num_seqs), "--max-queue", str(max_queue), "--quantization", args.quantization,
           "--dtype", args.dtype, "--device", args.device] + (["--model", args.model] if args.model else []) + \
        (["--no-batch-invariant"] if args.no_batch_invariant else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=60)

    async def healthy() -> bool:
        try:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/health") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    deadline = time.monotonic() + 180
    while not asyncio.run(healthy()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"lmgen serve did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.25)
    return stop, f"http://127.0.0.1:{port}"


def prefill_reference(llm, run: int) -> float:
    """cpu_bench.py's 512-token prefill figure (depth_bench.prefill_tok_s, median of 3) after one warm-up prompt;
    each run's four prompts have first tokens of their own, so no prefix cache serves them."""
    prefill_tok_s(llm, 512, 1, salt=4 * run + 1)  # warm-up: the clients' runs just left the caches cold
    return prefill_tok_s(llm, 512, 3, salt=4 * run + 2)


def offline_tok_s(llm, prompts: list[str], clients: int, max_tokens: int) -> float:
    """The clients' workload run by the engine in this process, without HTTP: each prompt as `clients` sequences
    at once, one prompt after another -> output tok/s (the server with no serving overhead and every request of a
    wave arriving together); "x offline" is what serving keeps of it."""
    from lmgen import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for p in prompts:
        llm.generate([p] * clients, params)
    return len(prompts) * clients * max_tokens / (time.perf_counter() - t0)


def print_report(rounds: list, levels: list[int], max_tokens: int) -> None:
    """The per-run table, then per concurrency level the medians over the rounds."""
    header = (f"{'mode':<11} {'clients':>7} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x tok/s':>8} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'x ITL50':>8} {'round':>6} {'x prefill':>10} "
              f"{'x offline':>10}")
    print(header)
    print("-" * len(header))
    for k, (results, ref, offline) in enumerate(rounds):
        base_r = results[0]
        for r in results:
            print(f"{r.mode:<11} {r.clients:>7} {len(r.timings):>5} {r.tokens:>7} {r.wall:>7.2f} {r.tok_per_s:>7.1f} "
                  f"{r.tok_per_s / base_r.tok_per_s:>7.2f}x {r.ttft(50) * 1e3:>7.0f}ms {r.ttft(99) * 1e3:>7.0f}ms "
                  f"{r.itl(50) * 1e3:>6.0f}ms {r.itl(99) * 1e3:>6.0f}ms {r.itl(50) / base_r.itl(50):>7.2f}x {k + 1:>6} "
                  f"{r.tok_per_s / ref:>9.0%} " + (f"{r.tok_per_s / offline[r.clients]:>9.0%}" if r.mode == "concurrent" else ""))
    print("x tok/s: aggregate output throughput relative to the same requests run one at a time; "
          "x ITL50: median inter-token latency relative to sequential (the price each user pays for sharing); "
          "x prefill: tok/s relative to the round's 512-token prefill tok/s (measured before and after it, averaged); "
          "x offline: relative to the same workload run by LLM.generate in this process (no HTTP, each wave at once).")
    print("prefill reference per round: " + ", ".join(f"{ref:.1f}" for _, ref, _ in rounds) + " tok/s")
    for i, n in enumerate(levels):
        ratios = [results[i + 1].tok_per_s / ref for results, ref, _ in rounds]
        kept = [results[i + 1].tok_per_s / offline[n] for results, _, offline in rounds]
        print(f"{n} clients: median {statistics.median(r[i + 1].tok_per_s for r, _, _ in rounds):.1f} tok/s, "
              f"median {statistics.median(ratios):.0%} of the prefill (rounds: {', '.join(f'{x:.0%}' for x in ratios)}); "
              f"offline the same workload: median {statistics.median(o[n] for _, _, o in rounds):.1f} tok/s "
              f"({statistics.median(o[n] / ref for _, ref, o in rounds):.0%} of the prefill), the server kept "
              f"{statistics.median(kept):.0%} of it")
    base_r = rounds[0][0][0]
    if statistics.fmean([t.tokens for t in base_r.timings]) != max_tokens:
        print("note: some requests produced fewer tokens than --max-tokens (context window?)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model to serve (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per client (from a fixed set of 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--no-batch-invariant", action="store_true", help="LLM(batch_invariant=False): the faster mode "
                    "whose results may depend on the other requests in a step")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the runs (each with its own prefill reference); "
                    "the summary gives medians")
    ap.add_argument("--server", choices=("process", "thread"), default="process",
                    help="process: `lmgen serve` in its own process (default); thread: uvicorn in this process")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]

    from lmgen.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
              batch_invariant=not args.no_batch_invariant)
    print(machine_line(llm))
    print(f"loaded in {time.perf_counter() - t0:.1f}s; server: {args.server}; workload per client: {len(prompts)} prompts x "
          f"{args.max_tokens} tokens (greedy, ignore_eos, streamed); max_num_seqs {args.max_num_seqs}", flush=True)
    max_queue = max(256, max(levels) * 2)
    stop, base = start_process_server(args, max_queue) if args.server == "process" else \
        start_thread_server(llm, args.max_num_seqs, max_queue)
    # per round: its runs, its prefill reference and the offline tok/s of each concurrency level
    rounds: list[tuple[list[RunResult], float, dict[int, float]]] = []
    try:
        asyncio.run(run_clients(base, "bench", prompts[:1], 1, 4, "warmup"))
        for k in range(args.rounds):
            before = prefill_reference(llm, 2 * k)
            results = [asyncio.run(run_clients(base, "bench", prompts, 1, args.max_tokens, "sequential"))]
            for n in levels:
                results.append(asyncio.run(run_clients(base, "bench", prompts, n, args.max_tokens, "concurrent")))
                print(f"  ... round {k + 1}: {n} clients done in {results[-1].wall:.1f}s", file=sys.stderr, flush=True)
            offline = {n: offline_tok_s(llm, prompts, n, args.max_tokens) for n in levels}
            rounds.append((results, (before + prefill_reference(llm, 2 * k + 1)) / 2, offline))
    finally:
        stop()

    print_report(rounds, levels, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
