"""Speed at context depth (issue 12), run by cpu_bench.py --depths: decode tok/s after d tokens of context and
prefill tok/s of an n-token prompt, for lmgen and llama.cpp (llama-cpp-python) on the same GGUF, same threads.

Decode at depth d: the d-token context is prefilled once; each repetition then decodes `new_tokens` tokens after
it (lmgen: the context's blocks come back from the prefix cache, one token recomputed; llama.cpp: its KV cache is
cut back to d tokens), timing the decode steps only (the first token, which ends the prefill, is excluded).
Prefill of n: one n-token prompt, a different first token each repetition so no prefix cache serves it.
A depth is capped at the model's window minus the decoded tokens (SmolLM2: 8,192 -> 8,159 for 32 new tokens).
"""

from __future__ import annotations

import statistics
import time

from common import random_ids


def _context(n: int, salt: int = 0) -> list[int]:
    ids = random_ids(max(n, 1))
    ids[0] = 100 + salt
    return ids


def lmgen_depths(llm, depths, prompts, new_tokens: int, repeats: int, profile: bool = False) -> dict:
    """{"decode": {d: tok/s}, "prefill": {n: tok/s}, "profile": {d: stage shares}} for an lmgen LLM."""
    from lmgen import SamplingParams

    window = llm.context_length
    out: dict = {"decode": {}, "prefill": {}, "profile": {}}
    many = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(_context(16), many)  # warm-up
    for d in depths:
        ctx = _context(min(d, window - new_tokens - 1))
        llm.generate(ctx, many)  # prefill once: later repetitions find the context in the prefix cache
        times = []
        for _ in range(repeats):
            s0 = llm.engine.stats.decode_seconds
            llm.generate(ctx, many)
            times.append((llm.engine.stats.decode_seconds - s0) / (new_tokens - 1))
        out["decode"][d] = 1 / statistics.median(times)
        if profile:
            out["profile"][d] = profile_decode(llm, ctx, new_tokens)
    for n in prompts:
        out["prefill"][n] = prefill_tok_s(llm, min(n, window - 1), repeats)
    return out


def prefill_tok_s(llm, n: int, repeats: int, salt: int = 1) -> float:
    """n-token prefill tok/s, the median over `repeats` prompts (max_tokens 1) whose first tokens differ (salt, salt
    + 1, ...), so that none finds another's blocks in the prefix cache."""
    from lmgen import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for r in range(repeats):
        ids = _context(n, salt=salt + r)
        t0 = time.perf_counter()
        llm.generate(ids, one)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


class _Timed:
    """A callable that adds its wall time to stages[stage]."""

    def __init__(self, fn, stages: dict, stage: str):
        self.fn, self.stages, self.stage = fn, stages, stage

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.stages[self.stage] += time.perf_counter() - t0


class _TimedOps:
    """The fused-ops module with its calls timed (norms and SwiGLU as "norm/act")."""

    def __init__(self, ops, stages: dict):
        self._ops, self._stages = ops, stages

    def __getattr__(self, name):
        return _Timed(getattr(self._ops, name), self._stages, "norm/act")


def profile_decode(llm, ctx: list[int], new_tokens: int) -> dict:
    """Where a decode step's time goes after `ctx`: wall-clock timers wrapped, for this call only, around the
    fused decode loop's callables (the packed matmuls, the attention op, the norms / SwiGLU), the lm_head and the
    sampler; "python/other" is the rest of the wall time (scheduler, metadata, embedding, output processing).
    The hot path carries no timers outside this function."""
    from lmgen import SamplingParams

    model, engine = llm.model, llm.engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(ctx, params)  # the context is in the prefix cache: the timed call decodes (and one token)
    stages = {"matmul": 0.0, "attention": 0.0, "norm/act": 0.0, "lm_head": 0.0, "sampling": 0.0}
    saved_fused, saved_logits = model._fused, model.compute_logits
    model._plan = None
    plan = model._layer_plan()
    timed_plan = [(_Timed(q, stages, "matmul"), _Timed(a, stages, "attention"), _Timed(o, stages, "matmul"),
                   _Timed(gu, stages, "matmul"), _Timed(dn, stages, "matmul"), *rest)
                  for q, a, o, gu, dn, *rest in plan[1]]
    try:
        model._plan = (plan[0], timed_plan)
        model._fused = _TimedOps(saved_fused, stages)
        model.compute_logits = _Timed(saved_logits, stages, "lm_head")
        engine.sampler = _Timed(engine.sampler, stages, "sampling")
        t0 = time.perf_counter()
        llm.generate(ctx, params)
        wall = time.perf_counter() - t0
    finally:
        engine.sampler = engine.sampler.fn
        model._fused, model._plan = saved_fused, None
        del model.compute_logits
    shares = {k: v / wall for k, v in stages.items()}
    shares["python/other"] = max(0.0, 1 - sum(shares.values()))
    shares["ms_per_token"] = 1e3 * wall / new_tokens
    return shares


def llama_cpp_depths(path, threads: int, depths, prompts, new_tokens: int, repeats: int) -> dict:
    from llama_cpp import Llama

    n_ctx = max([*depths, *prompts, 512]) + new_tokens + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False, logits_all=False)
    window = llm.n_ctx_train() if hasattr(llm, "n_ctx_train") else n_ctx
    out: dict = {"decode": {}, "prefill": {}}
    for d in depths:
        ctx = _context(min(d, window - new_tokens - 1))
        llm.reset()
        llm.eval(ctx)
        times = []
        for _ in range(repeats):
            llm.n_tokens = len(ctx)  # the next eval drops the KV cache past the context
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):  # like llama-bench's tg: one token per eval, no sampling
                llm.eval([ctx[-1]])
            times.append((time.perf_counter() - t0) / (new_tokens - 1))
        out["decode"][d] = 1 / statistics.median(times)
    for n in prompts:
        n_eff = min(n, window - 1)
        times = []
        for r in range(repeats):
            llm.reset()
            ids = _context(n_eff, salt=r + 1)
            t0 = time.perf_counter()
            llm.eval(ids)
            times.append(time.perf_counter() - t0)
        out["prefill"][n] = n_eff / statistics.median(times)
    return out
