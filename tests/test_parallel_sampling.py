"""n > 1 as admission-time sibling requests: n=2000 returns 2000 samples from the right distribution, the same
one that 2000 separate requests draw, on a random tiny Llama whose next-token distribution transformers gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from lmgen import LLM, SamplingParams

N, TOP_K = 2000, 12


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs, one_thread):
    return LLM(str(tiny_model_dirs["llama"]), quantization="none", kv_cache_tokens=2048)


def oracle_probs(folder, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' next-token distribution restricted to the top-k: (token ids, probabilities)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double()
    top = logits.topk(TOP_K)
    return top.indices.numpy(), torch.softmax(top.values, 0).numpy()


def p_value(tokens: list[int], ids: np.ndarray, probs: np.ndarray) -> float:
    index = {int(t): i for i, t in enumerate(ids)}
    assert all(t in index for t in tokens), "a token outside the top-k was drawn"
    counts = np.bincount([index[t] for t in tokens], minlength=len(ids))
    return float(scipy_stats.chisquare(counts, probs * len(tokens)).pvalue)


def test_n_2000_matches_2000_separate_requests(tiny, tiny_model_dirs):
    prompt = tiny.tokenizer.encode("The weather today is", add_special_tokens=True)
    ids, probs = oracle_probs(tiny_model_dirs["llama"], prompt)
    assert probs.min() * N > 5  # every cell of the chi-square test is well filled
    params = dict(max_tokens=1, temperature=1.0, top_k=TOP_K, ignore_eos=True)
    out = tiny.generate(prompt, SamplingParams(n=N, **params))[0]
    assert [c.index for c in out.outputs] == list(range(N))
    fanned = [c.token_ids[0] for c in out.outputs]
    separate = [o.outputs[0].token_ids[0] for o in tiny.generate([prompt] * N, SamplingParams(**params))]
    assert p_value(fanned, ids, probs) > 1e-3
    assert p_value(separate, ids, probs) > 1e-3
    table = np.array([[fanned.count(int(t)) for t in ids], [separate.count(int(t)) for t in ids]])
    assert scipy_stats.chi2_contingency(table).pvalue > 1e-3  # and the two samples agree with each other
    assert tiny.engine.block_manager.num_used_blocks == 0


def test_seeded_siblings_are_reproducible_and_distinct(tiny):
    a = tiny.generate("Once", SamplingParams(n=6, max_tokens=5, temperature=1.0, seed=11, ignore_eos=True))[0]
    b = tiny.generate("Once", SamplingParams(n=6, max_tokens=5, temperature=1.0, seed=11, ignore_eos=True))[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1
