"""Structured output cost on the embedded SmolLM2 (issue 13).

1. Decode time per output token with a JSON-schema constraint vs without, at 1 and 8 concurrent requests (one
   offline LLM batch), rounds interleaved (unconstrained, constrained with the mask computed after the forward pass
   (the CPU default), constrained with the mask computed on a worker thread while the model runs) so that a busy
   shared host moves all three alike; ratios per round (wall and process CPU time), then medians.
2. Mask time per step (llguidance, the whole batch's constrained rows): mean and p99.
3. llguidance vs xgrammar on the same SmolLM2 vocabulary: compile time, and mask time per token replaying the
   same accepted tokens (an output lmgen generated under the schema) through each engine's matcher.

    PYTHONPATH=src python benchmarks/structured_bench.py [--rounds 3] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import machine  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 30, "maxItems": 60},
}, "required": ["title", "tags"], "additionalProperties": False}

SCHEMAS = {  # llguidance vs xgrammar
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"}},
               "required": ["name", "age", "email"], "additionalProperties": False},
    "tags": SCHEMA,
    "nested": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 6, "minItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                         "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}},
        "required": ["id", "kind", "ok"], "additionalProperties": False}}}, "required": ["items"],
        "additionalProperties": False},
}


def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def decode_ms_per_token(llm, prompt, params, batch: int) -> tuple[float, float, float]:
    """(wall ms per decode step, process CPU ms per step, output tokens per sequence): every row gets one token per
    step. CPU time (all of this process's threads) moves less than wall time when other processes share the host."""
    st = llm.engine.stats
    steps, dec, gen = st.steps, st.decode_seconds, st.generation_tokens
    cpu0 = time.process_time()
    llm.generate([prompt] * batch, params)
    cpu = time.process_time() - cpu0
    n = max(1, st.steps - steps)
    return 1000 * (st.decode_seconds - dec) / max(1, n - 1), 1000 * cpu / n, (st.generation_tokens - gen) / batch


def offline(args) -> None:
    from lmgen import LLM, SamplingParams
    from lmgen.sampling.structured.spec import StructuredOutput

    llm = LLM()
    backend = llm.engine.grammar_backend
    prompt = llm.render_chat([{"role": "user", "content": "List many tags about cooking as JSON."}])
    spec = StructuredOutput(json_schema=SCHEMA)
    plain = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.tokens, temperature=0.8, seed=1, structured=spec)
    llm.generate([prompt] * 8, constrained)  # warm-up: the llguidance tokenizer, the compiled grammar
    default_overlap = backend.overlap
    print("machine:", machine())
    variants = (("unconstrained", plain, default_overlap), ("constrained", constrained, False),
                ("constrained+overlap", constrained, True))
    for batch in (1, 8):
        wall: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        masks: list[float] = []
        for r in range(args.rounds):
            line = []
            for name, params, overlap in variants:
                backend.overlap = overlap
                backend.mask_times.clear()
                w, c, n = decode_ms_per_token(llm, prompt, params, batch)
                if name == "constrained":
                    masks += [s * 1000 for s, _ in backend.mask_times]
                wall[name].append(w)
                cpu[name].append(c)
                line.append(f"{name} {w:.1f} ms/step wall, {c:.1f} ms/step cpu ({n:.0f} tok)")
            backend.overlap = default_overlap
            print(f"batch {batch} round {r + 1}: " + "; ".join(line))
        for name in ("constrained", "constrained+overlap"):
            rw = statistics.median(a / b for a, b in zip(wall[name], wall["unconstrained"]))
            rc = statistics.median(a / b for a, b in zip(cpu[name], cpu["unconstrained"]))
            print(f"batch {batch}: {name} / unconstrained per token, median of {args.rounds} interleaved rounds: "
                  f"{rw:.3f}x wall, {rc:.3f}x cpu")
        print(f"batch {batch}: mask per step ({batch} constrained rows, serial) mean {statistics.mean(masks):.3f} ms, "
              f"p99 {p99(masks):.3f} ms; unconstrained step median {statistics.median(wall['unconstrained']):.1f} ms")
    engines(llm, prompt, args)


def engines(llm, prompt, args) -> None:
    import llguidance
    import llguidance.torch as llg_torch
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    from lmgen import SamplingParams
    from lmgen.sampling.structured.spec import JSON_OPTIONS, StructuredOutput, grammar_limits

    vocab = llm.config.vocab_size
    ll_tok = llm.engine.grammar_backend.ll_tokenizer()
    hf = PreTrainedTokenizerFast(tokenizer_object=llm.tokenizer.backend_tokenizer)
    xinfo = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=sorted(llm.eos_token_ids))
    xcomp = xgr.GrammarCompiler(xinfo, cache_enabled=False)
    print("llguidance", llguidance.__version__, "vs xgrammar", xgr.__version__ if hasattr(xgr, "__version__") else "?")
    for name, schema in SCHEMAS.items():
        spec = StructuredOutput(json_schema=schema)
        out = llm.generate(prompt, SamplingParams(max_tokens=200, temperature=0.8, seed=3, structured=spec))[0]
        tokens = [t for t in out.outputs[0].token_ids if t not in llm.eos_token_ids]
        figures = {}
        for engine in ("llguidance", "xgrammar"):
            compile_s, mask_ms = [], []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                if engine == "llguidance":
                    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
                    m = llguidance.LLMatcher(ll_tok, grammar, log_level=0, limits=grammar_limits())
                    bitmask = llg_torch.allocate_token_bitmask(1, vocab)
                else:
                    m = xgr.GrammarMatcher(xcomp.compile_json_schema(schema, any_whitespace=False,
                                                                     separators=(", ", ": ")))
                    bitmask = xgr.allocate_token_bitmask(1, vocab)
                compile_s.append(time.perf_counter() - t0)
                accepted = 0
                for t in tokens:
                    t0 = time.perf_counter()
                    if engine == "llguidance":
                        llg_torch.fill_next_token_bitmask(m, bitmask)
                    else:
                        m.fill_next_token_bitmask(bitmask)
                    mask_ms.append(1000 * (time.perf_counter() - t0))
                    ok = m.consume_token(t) if engine == "llguidance" else m.accept_token(t)
                    if not ok:
                        break
                    accepted += 1
            figures[engine] = (statistics.median(compile_s) * 1000, statistics.mean(mask_ms), p99(mask_ms), accepted)
        (lc, lm, lp, la), (xc, xm, xp, xa) = figures["llguidance"], figures["xgrammar"]
        print(f"schema {name} ({len(tokens)} tokens; accepted llg {la}, xgr {xa}): compile llguidance {lc:.1f} ms, "
              f"xgrammar {xc:.1f} ms; mask mean llguidance {lm:.3f} ms, xgrammar {xm:.3f} ms ({xm / lm:.2f}x); "
              f"p99 llguidance {lp:.3f} ms, xgrammar {xp:.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per request")
    offline(ap.parse_args())


if __name__ == "__main__":
    main()
