"""Speculative decoding, sampled: the rejection rule (Leviathan et al. / Chen et al. 2023) keeps the target's
distribution. 20,000 (first, second) token pairs drawn with a draft model that differs from the target pass a
chi-square test against the target's own joint distribution at temperature 0.8, top_p 0.9, computed here from
transformers' logits with numpy; seeded requests are reproducible; reported logprobs are the target's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from lmgen import LLM, SamplingParams

from conftest import tiny_hf_llama
from test_spec_greedy import noisy_copy

pytestmark = pytest.mark.usefixtures("one_thread")
N, TEMPERATURE, TOP_P = 20_000, 0.8, 0.9


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_smol_tokenizer):
    """A random Llama over the first 512 ids (the target, with its transformers twin) and a noisy copy of it (the
    draft); a small vocabulary keeps 20,000 sequences quick."""
    root = tmp_path_factory.mktemp("spec_sampling")
    tok = hf_smol_tokenizer
    hf = tiny_hf_llama(512, 5, initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    hf.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    draft = noisy_copy(root / "target", root / "draft", 0.1, seed=1)
    return hf, root / "target", draft


def final_probs(hf, ids: list[int]) -> np.ndarray:
    """The target's next-token distribution after temperature and top-p (lmgen's rule: tokens sorted by logit,
    lower id first on ties, kept while the mass before them is under top_p), float64."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].double().numpy() / TEMPERATURE
    order = np.argsort(-logits, kind="stable")
    p = np.exp(logits[order] - logits[order].max())
    p /= p.sum()
    keep = (np.cumsum(p) - p) < TOP_P
    out = np.zeros_like(logits)
    out[order[keep]] = p[keep] / p[keep].sum()
    return out


def test_20000_pairs_follow_the_target_distribution(models):
    hf, target, draft = models
    # the float32 KV cache: the oracle is transformers' float32 distribution, whose top-p support must match exactly
    # (a float16 cache moves probabilities by ~1e-3, enough to let a token at the nucleus edge in or out)
    llm = LLM(str(target), quantization="none", max_num_seqs=256, kv_cache_tokens=32768, kv_cache_dtype="float32",
              speculative={"method": "draft", "model": str(draft), "num_tokens": 2, "max_batch": 1024, "min_acceptance": 0.0})
    prompt = [1, 504, 450, 370, 288]
    params = SamplingParams(n=N, max_tokens=3, temperature=TEMPERATURE, top_p=TOP_P, ignore_eos=True)
    pairs = [tuple(c.token_ids[:2]) for c in llm.generate(prompt, params)[0].outputs]
    stats = llm.engine.speculator.stats
    assert 0.1 * stats.draft_tokens < stats.accepted_tokens < 0.9 * stats.draft_tokens  # both branches well used
    assert llm.engine.block_manager.num_used_blocks == 0
    p1 = final_probs(hf, prompt)
    expected: dict[tuple[int, int], float] = {}
    for t1 in np.nonzero(p1)[0]:
        p2 = final_probs(hf, prompt + [int(t1)])
        for t2 in np.nonzero(p2)[0]:
            expected[(int(t1), int(t2))] = p1[t1] * p2[t2]
    assert all(p in expected for p in pairs), "a pair outside the target's support was drawn"
    cells = sorted(expected, key=expected.get, reverse=True)
    big = [c for c in cells if expected[c] * N >= 5]
    rest = 1.0 - sum(expected[c] for c in big)
    counts = [sum(1 for p in pairs if p == c) for c in big]
    obs = counts + [N - sum(counts)]
    exp = [expected[c] * N for c in big] + [rest * N]
    if rest * N < 5:  # fold a thin tail into the smallest cell
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    assert len(big) >= 10  # a spread-out joint distribution, not a near-deterministic one
    assert scipy_stats.chisquare(obs, np.array(exp) * sum(obs) / sum(exp)).pvalue > 1e-3


def test_seeded_sampling_is_reproducible_and_logprobs_are_the_targets(models):
    _, target, draft = models
    plain = LLM(str(target), quantization="none")
    llm = LLM(str(target), quantization="none", speculative={"method": "draft", "model": str(draft), "num_tokens": 3})
    params = SamplingParams(max_tokens=16, temperature=TEMPERATURE, top_p=TOP_P, seed=7, ignore_eos=True, logprobs=3)
    prompt = [1, 504, 450, 370, 288]
    a, b = llm.generate(prompt, params)[0].outputs[0], llm.generate(prompt, params)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    # the target's logprobs: score the same tokens with the plain engine (prompt_logprobs of prompt + output)
    scored = plain.generate(prompt + a.token_ids, SamplingParams(max_tokens=1, prompt_logprobs=3, temperature=0))[0]
    for i, entry in enumerate(a.logprobs):
        want = scored.prompt_logprobs[len(prompt) + i]
        assert entry == pytest.approx(want, abs=1e-5)
