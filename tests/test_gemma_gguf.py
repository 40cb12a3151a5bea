"""The real Gemma 3 270M GGUF (base model, Q4_K_M: F32, Q5_0, Q4_K, Q8_0, Q6_K tensors) against transformers
reading the same file (`gguf_file=`): tokenization, the built-in chat template it gets (the file has none), 32
greedy tokens of the float path on 3 prompts, the packed path's perplexity within 2% of the float path's, and
`lmgen chat` on it.  transformers' reading of the file is slow (minutes on 2 cores): loaded once per module."""

from __future__ import annotations

import pytest

from conftest import hf_greedy

LINES = [
    "The capital of France is Paris, and it has 2,148,271 inhabitants.",
    "  Leading spaces,\ttabs and\n\nnewlines  ",
    "大语言模型是一种人工智能模型。你好，世界！",
    "def square(x: int) -> int:\n    return x ** 2  # 平方\n",
    "Emoji: 😀🎉👍🏽 ❤️ 🇫🇷 and ünïcödé café",
    "<start_of_turn>user\nspecial tokens in text<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_gguf_path):
    from lmgen.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_gguf(str(gemma_gguf_path))


@pytest.fixture(scope="module")
def hf_gemma_tokenizer(gemma_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_gguf_path.parent), gguf_file=gemma_gguf_path.name)


@pytest.mark.parametrize("line", LINES, ids=["english", "spaces", "chinese", "code", "emoji", "specials"])
def test_tokenization_matches_transformers(gemma_tokenizer, hf_gemma_tokenizer, line):
    ids = gemma_tokenizer.encode(line, add_special_tokens=True)
    assert ids == hf_gemma_tokenizer.encode(line)
    assert ids[0] == 2  # <bos>
    assert gemma_tokenizer.decode(ids, skip_special_tokens=True) == hf_gemma_tokenizer.decode(ids, skip_special_tokens=True)
    assert gemma_tokenizer.decode(ids, skip_special_tokens=False) == hf_gemma_tokenizer.decode(ids)


def test_builtin_gemma_chat_template(gemma_tokenizer, hf_gemma_tokenizer):
    """The file carries no chat template: lmgen uses its built-in Gemma one (Gemma 3's official template), renders
    it as transformers does, and <end_of_turn> ends generation."""
    from lmgen.tokenizer.chat_template.builtins import BUILTIN_TEMPLATES

    assert hf_gemma_tokenizer.chat_template is None
    assert gemma_tokenizer.chat_template == BUILTIN_TEMPLATES["gemma"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2? 用中文"},
                {"role": "assistant", "content": "四"}, {"role": "user", "content": "And 3+3?"}]
    text = gemma_tokenizer.apply_chat_template(messages)
    assert text == hf_gemma_tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES["gemma"],
                                                          tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?")
    assert text.endswith("<start_of_turn>model\n")
    ids = gemma_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids.count(2) == 1 and ids[0] == 2  # one <bos>: the template writes it, encode adds none
    assert gemma_tokenizer.token_to_id("<end_of_turn>") in gemma_tokenizer.eos_token_ids


# ---- the model: float path vs transformers, packed path vs float ----------------------------------------------
PROMPTS = ["The capital of France is", "大语言模型是", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def hf_gemma_greedy(gemma_gguf_path, hf_gemma_tokenizer):
    """transformers on the same file (dequantized to float32): 32 greedy tokens per prompt (loaded once)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gemma_gguf_path.parent), gguf_file=gemma_gguf_path.name,
                                                 dtype=torch.float32).eval()
    return hf_greedy(model, hf_gemma_tokenizer, PROMPTS, pad_token_id=0)


@pytest.fixture(scope="module")
def gemma_float(gemma_gguf_path):
    from lmgen import LLM

    return LLM(str(gemma_gguf_path), quantization="none", dtype="float32", context_length=1024)


@pytest.fixture(scope="module")
def gemma_packed(gemma_gguf_path):
    from lmgen import LLM

    return LLM(str(gemma_gguf_path), context_length=1024)


def test_float_greedy_tokens_match_transformers(gemma_float, hf_gemma_greedy):
    from lmgen import SamplingParams

    for prompt, (ids, hf_tokens) in hf_gemma_greedy.items():
        out = gemma_float.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_tokens, (prompt, gemma_float.tokenizer.decode(hf_tokens))


def test_packed_layers_in_use_and_perplexity_within_two_percent(gemma_float, gemma_packed, gemma_gguf_path):
    import math
    from pathlib import Path

    from lmgen import SamplingParams
    from lmgen.layers.linear import DenseLinear
    from lmgen.layers.quant import QuantizedLinear

    packed = {m.qtype.name for m in gemma_packed.model.modules() if isinstance(m, QuantizedLinear)}
    assert packed == {"Q5_0", "Q8_0", "Q4_1"}  # Q4_K repacked as Q4_1, Q6_K as Q8_0 (lmgen.layers.kquant_repack)
    # every projection stays packed, the QKV of Q5_0 q/k and Q8_0 v too (no float fallback)
    assert not any(isinstance(m, DenseLinear) for m in gemma_packed.model.modules())
    assert gemma_packed.model.weight_bytes() < 1.1 * gemma_gguf_path.stat().st_size
    text = (Path(__file__).parent / "data" / "perplexity.txt").read_text(encoding="utf-8")
    ids = gemma_float.tokenizer.encode(text)

    def perplexity(llm) -> float:
        out = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0))[0]
        lps = out.prompt_logprobs[1:]
        return math.exp(-sum(e[t] for e, t in zip(lps, ids[1:])) / len(lps))

    float_ppl, packed_ppl = perplexity(gemma_float), perplexity(gemma_packed)
    assert 1.0 < float_ppl < 100.0
    assert abs(packed_ppl - float_ppl) / float_ppl < 0.02, (float_ppl, packed_ppl)


def test_cli_chat_with_the_gemma_template(gemma_gguf_path):
    """`lmgen chat --model <gemma gguf>`: the REPL renders turns with the built-in Gemma template (the file has
    none) and answers; /tokens shows the rendered conversation's size."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmgen.cli", "chat", "--model", str(gemma_gguf_path), "--max-tokens",
                           "12", "--temperature", "0", "--context-length", "512"],
                          input="What is the capital of France?\n", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower()
    assert proc.stdout.strip()  # an answer
