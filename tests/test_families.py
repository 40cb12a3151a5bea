"""Gemma 3, Qwen3 and GPT-2 against transformers: random-initialised checkpoints saved with save_pretrained, fp32
logits within 1e-4 at every position of a 40-token prompt and 16 decode steps, batched too, 32 greedy tokens
identical; batch invariance on Gemma 3 (sliding and global layers).

Every weight is random, norms included (Gemma's (1 + w) norms start at w = 0 in transformers, which would hide
an off-by-one), so a dropped or misplaced tensor shows."""

from __future__ import annotations

import pytest
import torch

from lmgen import LLM, SamplingParams

from test_model_parity import lmgen_logits_per_step

PROMPT_LEN, DECODE, GREEDY = 40, 16, 32

FAMILIES = {
    # sliding (window 8 < the prompt) and global layers, each with its RoPE base; head_dim != hidden / heads;
    # query_pre_attn_scalar != head_dim; final logit soft-capping
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64, intermediate_size=128,
                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   query_pre_attn_scalar=24, final_logit_softcapping=30.0, max_position_embeddings=256,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # q/k RMSNorm per head, explicit head_dim, no biases, untied
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                  max_position_embeddings=256, tie_word_embeddings=False),
    # learned positions, LayerNorm, GELU MLP, fused c_attn in Conv1D layout, tied
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def make_family_model(kind: str, folder, tokenizer, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[kind])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=0, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.3)
            elif "norm" in name or ".ln_" in name:  # Gemma applies 1 + w: centre its weights at 0, the others at 1
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, hf_smol_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {kind: (root / kind, make_family_model(kind, root / kind, hf_smol_tokenizer, seed=i))
            for i, kind in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def family_llms(family_dirs, one_thread):
    return {kind: LLM(str(folder), dtype="float32", kv_cache_tokens=4096, kv_cache_dtype="float32") for kind, (folder, _) in family_dirs.items()}


def random_prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_logits_and_greedy_match_transformers(kind, family_dirs, family_llms):
    _, hf = family_dirs[kind]
    llm = family_llms[kind]
    assert llm.config.architecture == FAMILIES[kind]["architectures"][0]
    prompt = random_prompt(llm.config.vocab_size, PROMPT_LEN, 7)
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long))
    hf_tokens = hf_out[0, PROMPT_LEN:].tolist()
    assert len(hf_tokens) == GREEDY

    steps = lmgen_logits_per_step(llm, prompt, hf_tokens[:DECODE])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + hf_tokens[:DECODE]])).logits[0]  # (40 + 16, vocab)
    torch.testing.assert_close(steps[0], ref[:PROMPT_LEN], atol=1e-4, rtol=0)
    for i, step in enumerate(steps[1:]):
        torch.testing.assert_close(step[0], ref[PROMPT_LEN + i], atol=1e-4, rtol=0)

    ours = llm.generate(prompt, SamplingParams(max_tokens=GREEDY, temperature=0, ignore_eos=True))[0]
    assert ours.outputs[0].token_ids == hf_tokens


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_batched_prompts_match_transformers_and_single_runs(kind, family_dirs, family_llms):
    """Prompts of 5, 17, 40 and 1 tokens in one batch: each one's logits (first decode step) equal transformers'
    run of that prompt alone, and the greedy tokens equal lmgen's single runs."""
    _, hf = family_dirs[kind]
    llm = family_llms[kind]
    prompts = [random_prompt(llm.config.vocab_size, n, 30 + n) for n in (5, 17, 40, 1)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)
        first = out.outputs[0].token_ids[0]
        assert first == int(ref.argmax())
        assert abs(out.outputs[0].logprobs[0][first] - float(ref[first])) < 1e-4
        alone = llm.generate(prompt, params)[0]
        assert alone.outputs[0].token_ids == out.outputs[0].token_ids


def test_gemma3_batch_invariance(family_llms):
    """Bit-identical tokens and logprobs alone and inside a batch of other requests (mixed prefill and decode
    steps, sliding and global layers, contexts past the window)."""
    llm = family_llms["gemma3"]
    target = random_prompt(llm.config.vocab_size, 30, 99)
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, logprobs=3)
    alone = llm.generate(target, params)[0].outputs[0]
    fillers = [random_prompt(llm.config.vocab_size, n, n) for n in (3, 45, 12, 70, 1, 26)]
    mixed = llm.generate(fillers[:3] + [target] + fillers[3:], params)[3].outputs[0]
    assert mixed.token_ids == alone.token_ids
    assert mixed.logprobs == alone.logprobs


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_gguf_written_like_llama_cpp_loads_to_the_same_logits(kind, family_dirs, tmp_path, gguf_path, one_thread):
    """The checkpoint written as a GGUF file with llama.cpp's names and layout (tests/family_gguf.py; no real small
    Qwen3 / GPT-2 GGUF is available offline), F32 tensors: lmgen's logits from it equal transformers'."""
    from family_gguf import write_gguf

    _, hf = family_dirs[kind]
    path = write_gguf(hf, kind, tmp_path / f"tiny-{kind}.gguf", gguf_path)
    llm = LLM(str(path), dtype="float32", quantization="none", kv_cache_tokens=2048, kv_cache_dtype="float32")
    assert llm.config.architecture == FAMILIES[kind]["architectures"][0]
    prompt = random_prompt(llm.config.vocab_size, 24, 11)
    steps = lmgen_logits_per_step(llm, prompt, prompt[:4])
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + prompt[:4]])).logits[0]
    torch.testing.assert_close(steps[0], ref[:24], atol=1e-4, rtol=0)
    for i, step in enumerate(steps[1:]):
        torch.testing.assert_close(step[0], ref[24 + i], atol=1e-4, rtol=0)
