"""Speculative decoding, greedy: every method (n-gram lookup, a draft model, the packed self-draft) gives token-
and logprob-identical output to plain decoding, batched and with staggered arrivals, on the random Llama /
Mistral (sliding window) / Qwen2 test models and on the embedded model (float target, packed self-draft); the KV
cache (the target's and the draft's) is idle afterwards, and proposals were both accepted and rejected."""

from __future__ import annotations

import pytest

from lmgen import LLM, SamplingParams
from lmgen.errors import SpeculativeConfigError
from test_batch_invariance import drive

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The river runs past the mill, and the mill turns the stone, and the stone grinds the grain. "
        "河流经过磨坊。 The river runs past the mill again, and the miller counts the sacks of grain.")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


def prompts(llm: LLM) -> list[list[int]]:
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    return [ids, ids[5:17], ids[:3], ids[20:] + ids[:9]]


def staggered(llm: LLM) -> dict[int, list]:
    p = prompts(llm)
    return {0: [("a", p[0], GREEDY)], 2: [("b", p[1], GREEDY), ("c", p[2], GREEDY)], 7: [("d", p[3], GREEDY)]}


def results(outs) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def assert_idle(llm: LLM) -> None:
    assert llm.engine.block_manager.num_used_blocks == 0
    draft = llm.engine.speculator.draft
    if draft is not None:
        assert draft.block_manager.num_used_blocks == 0 and not draft.shadows


def noisy_copy(folder, out, scale: float, seed: int = 0):
    """Another checkpoint with the same vocabulary: `folder`'s weights plus Gaussian noise (a draft that mostly,
    not always, agrees with its target)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_llms(tiny_model_dirs):
    cache = {}

    def get(kind: str, spec: dict | None) -> LLM:
        key = (kind, repr(spec))
        if key not in cache:
            cache[key] = LLM(str(tiny_model_dirs[kind]), quantization="none", block_size=4, kv_cache_tokens=4096,
                             speculative=spec)
        return cache[key]
    return get


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["ngram", "draft", "self"])
def test_greedy_identical_batched_and_staggered(tiny_llms, tiny_model_dirs, tmp_path, kind, method):
    spec = {"method": method, "num_tokens": 3, "max_batch": 64}  # speculate in batched steps too (no step-back)
    if method == "ngram":
        spec["ngram_min"] = 1  # random models repeat short patterns: match from one token, so proposals are made
    if method == "draft":  # another model with the same vocabulary
        spec["model"] = str(noisy_copy(tiny_model_dirs[kind], tmp_path / "draft", 0.3))
    plain, fast = tiny_llms(kind, None), tiny_llms(kind, spec)
    want = results(plain.generate(prompts(plain), GREEDY))
    assert results(fast.generate(prompts(fast), GREEDY)) == want
    assert_idle(fast)
    # staggered arrivals through the engine (steps mixing prefill chunks, drafts and plain decodes), prefix cache warm
    got = drive(fast.engine, staggered(fast))
    assert [got[n] for n in "abcd"] == want
    assert_idle(fast)
    stats = fast.engine.speculator.stats
    assert stats.accepted_tokens > 0 and stats.draft_tokens > stats.accepted_tokens  # accepted and rejected both


def test_embedded_float_target_packed_self_draft(smol_llm):
    fast = LLM(quantization="none", dtype="float32", speculative={"method": "self", "num_tokens": 4, "max_batch": 64},
               block_size=8, kv_cache_dtype=smol_llm.kv_cache_dtype)  # the fixture's cache (float32: parity tests)
    ids = smol_llm.tokenizer.encode(TEXT, add_special_tokens=False)
    batch = [ids, ids[:12], smol_llm.tokenizer.encode("用一句话介绍长城。", add_special_tokens=False)]
    want = results(smol_llm.generate(batch, GREEDY))
    assert results(fast.generate(batch, GREEDY)) == want
    arrivals = {0: [("a", batch[0], GREEDY)], 3: [("b", batch[1], GREEDY), ("c", batch[2], GREEDY)]}
    got = drive(fast.engine, arrivals)
    assert [got[n] for n in "abc"] == [tuple(w) for w in want]
    assert_idle(fast)
    stats = fast.engine.speculator.stats
    assert stats.accepted_tokens > stats.draft_tokens // 2  # the packed weights mostly agree with the float ones


def test_bad_speculative_config_is_refused_by_name(tiny_model_dirs):
    cases = [({"method": "medusa"}, "speculative.method"), ({"method": "ngram", "num_tokens": 0}, "speculative.num_tokens"),
             ({"method": "draft"}, "speculative.model"), ({"method": "ngram", "k": 3}, "speculative.k"),
             ("ngram", "speculative")]
    for spec, param in cases:
        with pytest.raises(SpeculativeConfigError) as e:
            LLM(str(tiny_model_dirs["llama"]), quantization="none", speculative=spec)
        assert e.value.param == param
    with pytest.raises(SpeculativeConfigError) as e:  # self-draft needs a float target
        LLM(str(tiny_model_dirs["llama"]), quantization="int8", speculative={"method": "self"})
    assert e.value.param == "quantization"


def test_step_back_large_batch_and_low_acceptance(tiny_model_dirs):
    """Speculation pauses for a step whose batch exceeds max_batch, and for a sequence whose rolling acceptance
    falls under min_acceptance (an unrelated draft: nearly every proposal rejected); the output stays exact."""
    folder = str(tiny_model_dirs["llama"])
    plain = LLM(folder, quantization="none")
    batched = LLM(folder, quantization="none", speculative={"method": "ngram", "num_tokens": 3, "max_batch": 2,
                                                                   "ngram_min": 1})
    ids = prompts(plain)
    assert results(batched.generate(ids, GREEDY)) == results(plain.generate(ids, GREEDY))
    stats = batched.engine.speculator.stats
    assert stats.stepped_back > 0  # 4 sequences > max_batch 2: plain steps
    before = stats.stepped_back
    assert results(batched.generate(ids[:2], GREEDY)) == results(plain.generate(ids[:2], GREEDY))
    assert stats.draft_tokens > 0 and stats.stepped_back == before  # 2 sequences: speculating
    unrelated = LLM(folder, quantization="none", speculative={
        "method": "draft", "model": str(tiny_model_dirs["llama_bias"]), "num_tokens": 3, "cooldown": 16})
    assert results(unrelated.generate(ids[0], GREEDY)) == results(plain.generate(ids[0], GREEDY))
    s = unrelated.engine.speculator.stats
    # without the step-back every one of the ~24 steps would propose 3 tokens; with it, a few steps then a pause
    assert s.accepted_tokens < s.draft_tokens <= 3 * 8


def test_prompt_logprobs_and_sampled_requests_next_to_speculating_ones(tiny_llms):
    """A request with prompt_logprobs that speculates from its first step still reports them; greedy requests
    speculate next to seeded sampled ones, each result equal to the plain engine's for greedy ones."""
    plain = tiny_llms("llama", None)
    fast = tiny_llms("llama", {"method": "ngram", "num_tokens": 3, "max_batch": 64, "ngram_min": 1})
    ids = prompts(plain)
    with_prompt_lp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=2)
    want, got = plain.generate(ids[0], with_prompt_lp)[0], fast.generate(ids[0], with_prompt_lp)[0]
    assert got.prompt_logprobs == want.prompt_logprobs and got.outputs[0].token_ids == want.outputs[0].token_ids
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
    mixed = fast.generate(ids, [GREEDY, sampled, GREEDY, sampled])
    ref = plain.generate([ids[0], ids[2]], GREEDY)
    assert [results([mixed[0]]), results([mixed[2]])] == [results([ref[0]]), results([ref[1]])]
    again = fast.generate(ids, [GREEDY, sampled, GREEDY, sampled])  # seeded: reproducible with the same settings
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in mixed]
    assert_idle(fast)


def test_draft_with_another_vocabulary_is_refused(tiny_model_dirs, tmp_path, hf_smol_tokenizer):
    from conftest import tiny_hf_llama

    tok = hf_smol_tokenizer
    tiny_hf_llama(len(tok) + 64, 0, initializer_range=0.02).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(SpeculativeConfigError) as e:
        LLM(str(tiny_model_dirs["llama"]), quantization="none",
            speculative={"method": "draft", "model": str(tmp_path / "other")})
    assert e.value.param == "speculative.model" and "vocabulary" in str(e.value)
