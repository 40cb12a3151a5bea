"""The packed-weight path (quantization="auto"/"int8"/"int4") against the dequantized float path.

Packed matmuls round each activation block to 8 bits, as llama.cpp does (lmgen.layers.quant), so logits move
slightly; accuracy is kept when perplexity stays within 1% and greedy tokens only part ways where the float
model's top-2 choice was closer than that perturbation.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from lmgen import LLM, SamplingParams
from lmgen.layers.embedding import PackedEmbedding
from lmgen.layers.quant import QuantizedLinear

from conftest import greedy_parting, prompt_logprobs

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text(encoding="utf-8")
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "大语言模型是", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def packed_llm():
    return LLM(quantization="auto")


def perplexity(llm: LLM, ids: list[int]) -> float:
    lps = prompt_logprobs(llm, ids)
    return math.exp(-sum(e[t] for e, t in zip(lps, ids[1:])) / len(lps))


def test_packed_layers_are_in_use_and_small(packed_llm, gguf_path):
    model = packed_llm.model
    layers = {id(m): m for m in model.modules() if isinstance(m, QuantizedLinear)}.values()
    assert len(layers) == 30 * 4 + 1  # fused qkv, o, fused gate/up, down per layer, and the lm_head
    # the tied output layer and the token embedding are one packed Q8_0 matrix
    assert isinstance(model.embed_tokens, PackedEmbedding) and model.embed_tokens.table is model.lm_head
    assert model.weight_bytes() < 1.05 * gguf_path.stat().st_size  # the file's size: no float copy of anything


def test_packed_embedding_rows_are_the_files(packed_llm, gguf_path):
    """Looked-up rows equal gguf-py's dequantization of token_embd (English, Chinese, special tokens)."""
    reader = gguf.GGUFReader(gguf_path)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    table = dequantize(np.array(embd.data), embd.tensor_type)  # (vocab, hidden) float32
    ids = packed_llm.tokenizer.encode("<|im_start|>user\n你好, world! 🤖<|im_end|>")
    rows = packed_llm.model.embed_tokens(torch.tensor(ids))
    np.testing.assert_array_equal(rows.numpy(), table[ids])


def test_perplexity_within_one_percent_of_float(smol_llm, packed_llm):
    ids = smol_llm.tokenizer.encode(TEXT)
    assert len(ids) > 300
    float_ppl, packed_ppl = perplexity(smol_llm, ids), perplexity(packed_llm, ids)
    assert 1.0 < float_ppl < 50.0  # the model does predict this text
    assert abs(packed_ppl - float_ppl) / float_ppl < 0.01, (float_ppl, packed_ppl)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_part_only_at_near_ties(smol_llm, packed_llm, prompt):
    ids, ref, split = greedy_parting(smol_llm, packed_llm, prompt, 24)
    if split is None:
        return
    context = ids + ref[: split + 1]
    float_lp, packed_lp = prompt_logprobs(smol_llm, context), prompt_logprobs(packed_llm, context)
    # the perturbation: largest log-prob change of the chosen tokens along the shared prefix
    drift = max(abs(f[t] - p[t]) for f, p, t in zip(float_lp, packed_lp, context[1:]))
    at = float_lp[len(ids) + split - 1]  # the float model's distribution where the two parted
    top2 = sorted(at.values(), reverse=True)[:2]
    assert top2[0] - top2[1] <= 2 * drift, (prompt, split, top2, drift)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantized_at_load(tiny_model_dirs, mode):
    folder = str(tiny_model_dirs["llama"])
    dense, quant = LLM(folder), LLM(folder, quantization=mode)
    assert any(isinstance(m, QuantizedLinear) for m in quant.model.modules())
    ids = list(range(200, 232))
    a = dense.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs[1:]
    b = quant.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs[1:]
    diffs = torch.tensor([abs(x[t] - y[t]) for x, y, t in zip(a, b, ids[1:])])
    # int8 blocks (Q8_0) keep ~2-3 digits; int4 (Q4_1) ~1: bounds on the log-probs of the prompt tokens
    assert diffs.max() < (0.05 if mode == "int8" else 0.5), diffs.max()
    assert diffs.max() > 0  # it really is a different (quantized) computation
