"""The KV cache's element type (kv_cache_dtype): float16 by default on the CPU, against the exact float32 cache.

A float16 K/V row keeps 11 significant bits (relative error <= 2^-11). Its effect alone is measured on the float
weights (quantization="none"): (1) the log-probs of the tokens of a text move by less than NEAR_TIE nats
(measured: 0.0044 max), (2) perplexity on tests/data/perplexity.txt stays within 0.1% of the float32 cache's
(measured: 0.001%), (3) greedy tokens on the parity prompts are identical, or part only where the float32
cache's top-2 log-probs were closer than 2 * NEAR_TIE (a change of at most NEAR_TIE per log-prob can swap only
such a pair).  On the packed weights (the default) the packed matmuls round each activation block to 8 bits, so
any perturbation, this one included, moves log-probs by up to ~0.3 nats (as the packed-vs-float comparison of
tests/test_quantized_model.py does); there the bounds are that file's: perplexity within 1%, greedy parting
only where the top-2 were closer than twice the measured drift.

The int8 cache (llama.cpp's q8_0 rows: a float16 scale per 32 values, a step of max|x| / 127) moves a log-prob
by up to INT8_DRIFT (measured 0.097 nats on the float weights) and perplexity by +0.06% (bound 0.5%).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmgen import LLM, SamplingParams
from lmgen.cli import build_parser
from lmgen.errors import InvalidOptionError

from conftest import greedy_parting, prompt_logprobs

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text(encoding="utf-8")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "大语言模型是", "def fibonacci(n):"]
NEAR_TIE = 0.01  # nats: the bound on a float16 cache's change of a log-prob, float weights (measured 0.0044)
INT8_DRIFT = 0.25  # nats: the same for the int8 cache (measured 0.097)


@pytest.fixture(scope="module")
def caches():
    """The embedded model dequantized to float32 weights, with a float32, a float16 and an int8 KV cache."""
    return {name: LLM(quantization="none", dtype="float32", kv_cache_dtype=name)
            for name in ("float32", "float16", "int8")}


@pytest.fixture(scope="module")
def packed_caches():
    """The embedded model as it runs by default (packed weights), with a float32 and a float16 KV cache."""
    return {name: LLM(kv_cache_dtype=name) for name in ("float32", "float16")}


def drift_and_perplexities(exact: LLM, other: LLM, ids: list[int]) -> tuple[float, float, float]:
    """The largest change of a token's log-prob over the text, and both caches' perplexities."""
    a, b = prompt_logprobs(exact, ids), prompt_logprobs(other, ids)
    drift = max(abs(x[t] - y[t]) for x, y, t in zip(a, b, ids[1:]))
    ppl_a, ppl_b = (math.exp(-sum(e[t] for e, t in zip(lp, ids[1:])) / len(lp)) for lp in (a, b))
    return drift, ppl_a, ppl_b


def assert_greedy_parts_only_at_near_ties(exact: LLM, other: LLM, prompt: str, max_tokens: int, gap: float) -> None:
    """`other`'s greedy tokens equal `exact`'s, or part where `exact`'s top-2 log-probs were within `gap`."""
    ids, ref, split = greedy_parting(exact, other, prompt, max_tokens)
    if split is None:
        return
    at = prompt_logprobs(exact, ids + ref[: split + 1])[len(ids) + split - 1]
    top2 = sorted(at.values(), reverse=True)[:2]
    assert top2[0] - top2[1] <= gap, (prompt, split, top2, gap)


def test_auto_is_float16_on_cpu_and_the_cache_is_paged_per_block_and_head(tiny_model_dirs):
    folder = str(tiny_model_dirs["llama"])
    llm = LLM(folder, dtype="float32", block_size=8, kv_cache_tokens=64)
    cfg, cache = llm.config, llm.engine.kv_cache
    assert cache.dtype == torch.float16 and llm.kv_cache_dtype == "float16"
    k, v = cache.layers[0]
    assert k.dtype == v.dtype == torch.float16
    assert k.shape == (64 // 8 + 1, cfg.num_kv_heads, 8, cfg.head_dim)  # (blocks + null block, kv_heads, bs, D)
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert LLM(folder, dtype="float32", kv_cache_dtype=name).engine.kv_cache.layers[0][0].dtype == dtype
    # a bfloat16 model keeps a bfloat16 cache under auto
    assert LLM(folder, dtype="bfloat16").engine.kv_cache.dtype == torch.bfloat16


def test_int8_cache_rows_hold_their_scales_and_a_head_it_cannot_hold_is_refused(tiny_model_dirs):
    k = LLM(kv_cache_dtype="int8", kv_cache_tokens=64).engine.kv_cache.layers[0][0]  # SmolLM2: head_dim 64
    assert k.dtype == torch.int8 and k.shape[-1] == 64 + 64 // 16  # 64 values, then 2 float16 scales
    with pytest.raises(InvalidOptionError) as e:  # the tiny model's head_dim 16 is not a multiple of 32
        LLM(str(tiny_model_dirs["llama"]), kv_cache_dtype="int8")
    assert e.value.param == "kv_cache_dtype" and "multiple of 32" in str(e.value)


@pytest.mark.parametrize("bad", ["int4", "fp16", "FLOAT16", "", "fp8"])
def test_bad_kv_cache_dtype_is_a_typed_error_naming_it(tiny_model_dirs, bad):
    with pytest.raises(InvalidOptionError) as e:
        LLM(str(tiny_model_dirs["llama"]), kv_cache_dtype=bad)
    assert e.value.param == "kv_cache_dtype" and e.value.value == bad and repr(bad) in str(e.value)
    assert "float16" in e.value.choices


def test_cli_takes_kv_cache_dtype_and_refuses_a_bad_one_in_one_line():
    for cmd in ("generate", "chat", "serve"):
        args = build_parser().parse_args([cmd, *(["hi"] if cmd == "generate" else []), "--kv-cache-dtype", "float32"])
        assert args.kv_cache_dtype == "float32"
    proc = subprocess.run([sys.executable, "-m", "lmgen.cli", "generate", "hi", "--kv-cache-dtype", "fp8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgen: error:") and "'fp8'" in lines[0], proc.stderr


def test_cli_kv_cache_dtype_sets_the_cache():
    """--stats reports the reserved cache: float32 holds twice float16's bytes, int8 17/32 of them (64 values and
    two float16 scales per 64-value row); the default is float16."""
    run = [sys.executable, "-m", "lmgen.cli", "generate", "大语言模型是", "--max-tokens", "4", "--stats"]
    mib = {}
    for dtype in ("float16", "float32", "int8", None):
        proc = subprocess.run([*run, *(["--kv-cache-dtype", dtype] if dtype else [])], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and proc.stdout, proc.stderr
        mib[dtype] = int(re.search(r"KV cache (\d+) MiB reserved \((\w+)\)", proc.stderr).group(1))
        assert f"({dtype or 'float16'})" in proc.stderr
    assert abs(mib["float32"] - 2 * mib["float16"]) <= 1 and mib[None] == mib["float16"]  # MiB rounded
    assert abs(mib["int8"] - mib["float16"] * 17 / 32) <= 1


def test_float16_cache_log_probs_and_perplexity_match_float32(caches):
    ids = caches["float32"].tokenizer.encode(TEXT)
    assert len(ids) > 300
    drift, ppl32, ppl16 = drift_and_perplexities(caches["float32"], caches["float16"], ids)
    assert 0 < drift < NEAR_TIE, drift  # > 0: the float16 cache really is in use
    assert abs(ppl16 - ppl32) / ppl32 < 0.001, (ppl32, ppl16)


def test_int8_cache_log_probs_and_perplexity_stay_near_float32(caches):
    ids = caches["float32"].tokenizer.encode(TEXT)
    drift, ppl32, ppl8 = drift_and_perplexities(caches["float32"], caches["int8"], ids)
    assert NEAR_TIE < drift < INT8_DRIFT, drift  # > NEAR_TIE: coarser than float16, so really int8
    assert abs(ppl8 - ppl32) / ppl32 < 0.005, (ppl32, ppl8)
    for prompt in PROMPTS:  # greedy tokens part only where the float32 cache's top-2 were within 2 * INT8_DRIFT
        assert_greedy_parts_only_at_near_ties(caches["float32"], caches["int8"], prompt, 24, 2 * INT8_DRIFT)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_float16_cache_greedy_tokens_part_only_at_near_ties(caches, prompt):
    assert_greedy_parts_only_at_near_ties(caches["float32"], caches["float16"], prompt, 32, 2 * NEAR_TIE)


def test_long_context_float16_decode_matches_float32(caches):
    """Past several splits of the kernel (512 positions each): a 1,300-token context decoded with either cache,
    the same tokens with log-probs within NEAR_TIE while they agree."""
    ids = (caches["float32"].tokenizer.encode(TEXT) * 4)[:1300]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    a = caches["float32"].generate(ids, params)[0].outputs[0]
    b = caches["float16"].generate(ids, params)[0].outputs[0]
    assert a.token_ids[0] == b.token_ids[0]
    for la, lb, t, u in zip(a.logprobs, b.logprobs, a.token_ids, b.token_ids):
        assert abs(la[t] - lb[t]) < NEAR_TIE
        if t != u:
            break


def test_packed_model_float16_cache_within_the_packed_paths_bounds(packed_caches):
    exact, half = packed_caches["float32"], packed_caches["float16"]
    drift, ppl32, ppl16 = drift_and_perplexities(exact, half, exact.tokenizer.encode(TEXT))
    assert abs(ppl16 - ppl32) / ppl32 < 0.01, (ppl32, ppl16)
    for prompt in PROMPTS:
        assert_greedy_parts_only_at_near_ties(exact, half, prompt, 24, 2 * drift)
