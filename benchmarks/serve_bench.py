"""Serving benchmark: N concurrent streaming clients against the same requests run one at a time.

Starts the OpenAI-compatible server in this process (uvicorn in a background thread, 127.0.0.1 on a
free port), then:

* sequential: every prompt of the set sent alone, one request at a time (the baseline);
* for each N in --concurrency: N clients at once, each sending the same prompt set one after another
  over a streaming /v1/completions.

Every request is greedy with ignore_eos, so each produces exactly --max-tokens tokens and the work is
identical across modes. Measured on the client from SSE arrival times: output tok/s (all clients
together, over the wall time of the run), time to first token and inter-token latency (p50 / p99).
Ratios are against the sequential baseline.

    python benchmarks/serve_bench.py                          # N = 1, 4, 16
    python benchmarks/serve_bench.py --concurrency 1,8 --max-tokens 64 --model path/to/model.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line(llm) -> str:
    import torch

    return (f"machine: {platform.platform()} | CPU: {cpu_model()} | logical cores: {os.cpu_count()} | "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads | python {platform.python_version()}\n"
            f"model: {llm.model_name} on {llm.device}, {str(llm.dtype).replace('torch.', '')}, "
            f"batch_invariant={getattr(llm.model, 'batch_invariant', None)}")


async def one_request(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError("no tokens arrived")
    return RequestTiming(arrivals[0] - t0, [b - a for a, b in zip(arrivals, arrivals[1:])], tokens, time.perf_counter() - t0)


async def run_clients(base: str, model: str, prompts: list[str], clients: int, max_tokens: int, mode: str) -> RunResult:
    result = RunResult(mode, clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(600), limits=limits) as client:
        async def user() -> None:
            for p in prompts:
                result.timings.append(await one_request(client, model, p, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(clients)))
        result.wall = time.perf_counter() - t0
    return result


def start_server(llm, max_num_seqs: int, max_queue: int):
    import uvicorn

    from lmgen.server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(llm, "bench", max_num_seqs=max_num_seqs, max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


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
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    prompts = PROMPTS[: max(1, min(args.prompts, len(PROMPTS)))]

    from lmgen.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model, quantization=args.quantization, dtype=args.dtype, device=args.device,
              batch_invariant=not args.no_batch_invariant)
    print(machine_line(llm))
    print(f"loaded in {time.perf_counter() - t0:.1f}s; workload per client: {len(prompts)} prompts x {args.max_tokens} "
          f"tokens (greedy, ignore_eos, streamed); max_num_seqs {args.max_num_seqs}", flush=True)
    server, thread, base = start_server(llm, args.max_num_seqs, max(256, max(levels) * 2))
    try:
        asyncio.run(run_clients(base, "bench", prompts[:1], 1, 4, "warmup"))
        results = [asyncio.run(run_clients(base, "bench", prompts, 1, args.max_tokens, "sequential"))]
        for n in levels:
            results.append(asyncio.run(run_clients(base, "bench", prompts, n, args.max_tokens, "concurrent")))
            print(f"  ... {n} clients done in {results[-1].wall:.1f}s", file=sys.stderr, flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=60)

    base_r = results[0]
    header = (f"{'mode':<11} {'clients':>7} {'reqs':>5} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'x tok/s':>8} "
              f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'x ITL50':>8}")
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r.mode:<11} {r.clients:>7} {len(r.timings):>5} {r.tokens:>7} {r.wall:>7.2f} {r.tok_per_s:>7.1f} "
              f"{r.tok_per_s / base_r.tok_per_s:>7.2f}x {r.ttft(50) * 1e3:>7.0f}ms {r.ttft(99) * 1e3:>7.0f}ms "
              f"{r.itl(50) * 1e3:>6.0f}ms {r.itl(99) * 1e3:>6.0f}ms {r.itl(50) / base_r.itl(50):>7.2f}x")
    print("x tok/s: aggregate output throughput relative to the same requests run one at a time; "
          "x ITL50: median inter-token latency relative to sequential (the price each user pays for sharing).")
    if statistics.fmean([t.tokens for t in base_r.timings]) != args.max_tokens:
        print("note: some requests produced fewer tokens than --max-tokens (context window?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
