"""Beam search inside the engine: a beam request is a group of sequences in the running batch (prompt blocks
shared, blocks forked on expansion, pruned beams freed), batched with sampled requests, and it still returns
exactly what transformers' generate(num_beams=K) returns, scores included."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from lmgen import LLM, SamplingParams

from conftest import tiny_hf_llama

MAX_NEW = 10
PROMPTS = [[1, 17, 42, 5, 63, 900, 31], [1, 8, 8, 91, 30, 12, 4, 77, 640, 2000, 5, 6, 7, 8, 9, 10, 11, 12]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, hf_smol_tokenizer):
    """A random Llama with peaked next-token distributions (wide init), saved with the SmolLM2 tokenizer."""
    folder = tmp_path_factory.mktemp("peaked")
    tok = hf_smol_tokenizer
    model = tiny_hf_llama(len(tok), 3, initializer_range=0.5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # float32 KV cache: compared with transformers to 1e-4 (float16 moves log-probs by ~2e-3)
    return LLM(str(folder), quantization="none", block_size=4, kv_cache_tokens=4096, kv_cache_dtype="float32"), hf


@torch.no_grad()
def hf_beams(hf, prompt, eos: list[int] | None, **kw):
    pad = hf.config.vocab_size - 1  # non-zero: transformers fills with `pad_token_id or eos`
    hf.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False)
    ids = torch.tensor([prompt])
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                      return_dict_in_generate=True, output_scores=True, use_cache=False, **kw)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    return [(out.sequences[i, len(prompt):len(prompt) + n].tolist(), float(out.sequences_scores[i])) for i, n in enumerate(lengths)]


def pick_stop(hf, prompt) -> int:
    """A token the K=3 search generates at its 3rd step: as an extra stop id, hypotheses really finish early."""
    return hf_beams(hf, prompt, None, num_beams=3, num_return_sequences=1)[0][0][2]


@pytest.mark.parametrize("K,lp,es", [(3, 1.0, False), (4, 0.5, True), (2, 2.0, "never")])
def test_engine_beams_equal_transformers_inside_a_sampled_batch(peaked, K, lp, es):
    llm, hf = peaked
    eos = llm.tokenizer.eos_token_id
    stops = [pick_stop(hf, p) for p in PROMPTS]
    beam = [SamplingParams(beam_width=K, n=K, max_tokens=MAX_NEW, length_penalty=lp, early_stopping=es, stop_token_ids=[s])
            for s in stops]
    sampled = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
    outs = llm.generate([PROMPTS[0], [1, 2, 3, 4, 5], PROMPTS[1], [9, 9, 9]], [beam[0], sampled, beam[1], sampled])
    for out, prompt, stop in ((outs[0], PROMPTS[0], stops[0]), (outs[2], PROMPTS[1], stops[1])):
        ref = hf_beams(hf, prompt, [eos, stop], num_beams=K, num_return_sequences=K, length_penalty=lp, early_stopping=es)
        assert [c.token_ids for c in out.outputs] == [t for t, _ in ref]
        for c, (_, score) in zip(out.outputs, ref):
            assert c.score == pytest.approx(score, abs=1e-4)
            assert c.finish_reason == ("stop" if c.token_ids[-1] in (eos, stop) else "length")
    assert len(outs[1].outputs[0].token_ids) == 12  # the sampled neighbours ran to their length
    assert llm.engine.block_manager.num_used_blocks == 0 and not llm.engine.sequences


def test_beams_fork_blocks_and_free_pruned_ones(peaked):
    """While the search runs, its beams share the prompt's blocks (reference counts > 1) and hold no more blocks
    than K private tails need."""
    llm, _ = peaked
    engine = llm.engine
    rid = engine.add_request(PROMPTS[1], SamplingParams(beam_width=4, n=1, max_tokens=MAX_NEW, ignore_eos=True))
    llm.output_processor.add_request(rid, None, PROMPTS[1], SamplingParams(beam_width=4, n=1, max_tokens=MAX_NEW, ignore_eos=True))
    shared, peak = 0, 0
    while engine.has_unfinished():
        llm._step()
        seqs = [engine.sequences[s] for s in engine.requests.get(rid, [])]
        if len(seqs) == 4:
            first = seqs[0].block_table[0]
            shared = max(shared, engine.block_manager.ref_counts[first])
        peak = max(peak, engine.block_manager.num_used_blocks)
    prompt_blocks = len(PROMPTS[1]) // 4
    assert shared == 4  # the prompt's first block is one block, referenced by all 4 beams
    assert peak <= prompt_blocks + 4 * (MAX_NEW // 4 + 2)  # not 4 private copies of the prompt
    assert engine.block_manager.num_used_blocks == 0
