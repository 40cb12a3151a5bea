"""lmgen's forward pass against Hugging Face transformers: logits to 1e-4 and identical greedy tokens.

Oracles: random-initialised transformers checkpoints (Llama with GQA + llama3 RoPE + tied embeddings,
Llama with biases + explicit head_dim + linear RoPE, Mistral, Qwen2 with q/k/v biases) saved with
save_pretrained, and the embedded SmolLM2 GGUF as transformers itself reads it.
"""

from __future__ import annotations

import pytest
import torch

from lmgen import LLM, SamplingParams
from lmgen.engine.request import Request

from conftest import TINY_CONFIGS, hf_greedy


def lmgen_logits_per_step(llm: LLM, prompt: list[int], continuation: list[int]) -> list[torch.Tensor]:
    """Drives lmgen's scheduler/runner/model by hand: logits of every prompt position (one prefill call),
    then of each decode step feeding `continuation` one token at a time through the KV cache."""
    eng = llm.engine
    req = Request("parity", prompt, SamplingParams(max_tokens=len(continuation) + 1))
    eng.scheduler.add(req)
    results = []
    try:
        sched = eng.scheduler.schedule()
        assert sched.scheduled == [(req, len(prompt))]  # the whole prompt in one prefill call
        input_ids, positions, meta = eng.runner.prepare(sched)
        with torch.inference_mode():
            hidden = llm.model(input_ids, positions, eng.kv_cache.layers, meta)
            results.append(llm.model.compute_logits(hidden))  # (prompt_len, vocab)
        req.num_computed_tokens = len(prompt)
        for tok in continuation:
            req.output_token_ids.append(tok)
            sched = eng.scheduler.schedule()
            assert sched.scheduled == [(req, 1)]  # one decode token, the rest read from the cache
            out = eng.runner.run(sched)
            req.num_computed_tokens += 1
            results.append(out.logits)  # (1, vocab)
    finally:
        eng.scheduler.finish(req, req.status.FINISHED_ABORTED)
    return results


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_random_checkpoint_logits_and_greedy_match_transformers(kind, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dirs[kind]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(str(folder), dtype="float32", kv_cache_dtype="float32")  # exact: 1e-4 (float16: test_kv_cache_dtype)
    assert llm.config.architecture == TINY_CONFIGS[kind]["architectures"][0]
    gen = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, llm.config.vocab_size, (24,), generator=gen).tolist()

    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, 24, dtype=torch.long))
    hf_tokens = hf_out[0, 24:].tolist()
    assert len(hf_tokens) == 32

    # logits at every prompt position and at each of 16 decode steps
    steps = lmgen_logits_per_step(llm, prompt, hf_tokens[:16])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + hf_tokens[:16]])).logits[0]  # (24+16, vocab)
    torch.testing.assert_close(steps[0], ref[:24], atol=1e-4, rtol=0)
    for i, step in enumerate(steps[1:]):
        torch.testing.assert_close(step[0], ref[24 + i], atol=1e-4, rtol=0)

    ours = llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert ours.outputs[0].token_ids == hf_tokens
    assert ours.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])  # mistral: sliding window, batched and padded
def test_batched_prompts_of_different_lengths_match_single_runs(tiny_model_dirs, kind):
    llm = LLM(str(tiny_model_dirs[kind]), dtype="float32")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (5, 17, 40, 1)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params)[0].outputs[0].token_ids for p in prompts]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert together == alone


@pytest.fixture(scope="module")
def smol_greedy_reference(hf_smol_model, hf_smol_tokenizer):
    prompts = ["The capital of France is", "Once upon a time, in a small village,", "大语言模型是"]
    return hf_greedy(hf_smol_model, hf_smol_tokenizer, prompts, pad_token_id=2)


def test_embedded_gguf_greedy_tokens_match_transformers(smol_llm, smol_greedy_reference):
    for prompt, (ids, hf_tokens) in smol_greedy_reference.items():
        assert smol_llm.tokenizer.encode(prompt) == ids
        ours = smol_llm.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        assert ours.prompt_token_ids == ids
        assert ours.outputs[0].token_ids == hf_tokens, prompt


def test_embedded_gguf_logits_match_transformers(smol_llm, hf_smol_model, smol_greedy_reference):
    ids, hf_tokens = smol_greedy_reference["大语言模型是"]
    steps = lmgen_logits_per_step(smol_llm, ids, hf_tokens[:4])
    with torch.no_grad():
        ref = hf_smol_model(torch.tensor([ids + hf_tokens[:4]])).logits[0]
    torch.testing.assert_close(steps[0], ref[: len(ids)], atol=2e-3, rtol=1e-4)
    for i, step in enumerate(steps[1:]):
        torch.testing.assert_close(step[0], ref[len(ids) + i], atol=2e-3, rtol=1e-4)


def test_chat_answers_paris(smol_llm):
    out = smol_llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=40, temperature=0))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"  # ended by <|im_end|>, which is not in the text
    assert "<|im_end|>" not in out[0].outputs[0].text


def test_bfloat16_runs_and_agrees_with_float32(tiny_model_dirs):
    folder = str(tiny_model_dirs["llama"])
    f32, bf16 = LLM(folder, dtype="float32"), LLM(folder, dtype="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    prompt = list(range(100, 124))
    a = lmgen_logits_per_step(f32, prompt, [5, 6])
    b = lmgen_logits_per_step(bf16, prompt, [5, 6])
    for x, y in zip(a, b):
        assert torch.isfinite(y).all()
        assert (x - y).abs().max() < 0.1  # bf16 keeps ~3 significant digits


def test_compiled_layers_match_eager(tiny_model_dirs):
    """LLM(compile=True) runs the layers through torch.compile: same greedy tokens and log-probs as the eager
    path, over prefill, batched decode and a mixed step (two prompts of different lengths)."""
    folder = str(tiny_model_dirs["llama"])
    eager, compiled = LLM(folder), LLM(folder, compile=True)
    assert compiled.model._compiled is not None and compiled.model._fused is None
    prompts = [list(range(300, 320)), list(range(40, 45))]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    for a, b in zip(eager.generate(prompts, params), compiled.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for ea, eb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert ea.keys() == eb.keys()
            assert all(abs(ea[t] - eb[t]) < 1e-4 for t in ea)


def test_sliding_window_frees_blocks_and_keeps_the_tokens(tiny_model_dirs):
    """With 4-token blocks and a window of 8, a sequence holds at most 4 blocks however long it runs (blocks
    that fell out of the window go back), and its tokens equal transformers' (which keeps the full cache)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dirs["mistral"]
    llm = LLM(str(folder), dtype="float32", block_size=4)
    assert llm.config.sliding_window == 8
    prompt = list(range(300, 330))
    peak = 0
    for _ in llm.stream_outputs(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)):
        peak = max(peak, llm.engine.block_manager.num_used_blocks)
    assert peak <= 4 and llm.engine.block_manager.num_used_blocks == 0
    ours = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert ours == ref
    # n > 1 forks the prompt's blocks after the window already released some of them
    twins = llm.generate(prompt, SamplingParams(n=2, max_tokens=12, temperature=0, ignore_eos=True))[0].outputs
    assert [c.token_ids for c in twins] == [ref[:12], ref[:12]]
    assert llm.engine.block_manager.num_used_blocks == 0
