"""The fused CPU ops (csrc/fused_ops.h, attention.h, dense_gemm.h) against the plain PyTorch path they replace.

In float32 on CPU every step takes the fused path (with batch_invariant=False only pure decode steps); here
batches of several sequences with different context lengths go through both paths and must give the same logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmgen import LLM, SamplingParams
from lmgen.layers.attention import from_cache_dtype, to_cache_dtype
from lmgen.layers.kernels import fused_ops
from lmgen.layers.rope import apply_rotary
from lmgen.sampling.sampler import Sampler

from conftest import TINY_CONFIGS

ops = fused_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="compiled kernels unavailable on this machine")


def test_rms_norm_and_gated_activations_match_torch():
    gen = torch.Generator().manual_seed(0)
    x, d, w = (torch.randn(5, 96, generator=gen) for _ in range(3))
    w = w[0]
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), ref, atol=1e-5, rtol=1e-5)
    s, n = ops.add_rms_norm(x, d, w, 1e-5)
    torch.testing.assert_close(s, x + d)
    torch.testing.assert_close(n, ops.rms_norm(x + d, w, 1e-5))
    gu = torch.randn(3, 2 * 40, generator=gen) * 4  # 40: five 8-lane steps, and a scalar tail below
    torch.testing.assert_close(ops.silu_mul(gu, 40), F.silu(gu[:, :40]) * gu[:, 40:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ops.gelu_tanh_mul(gu, 40), F.gelu(gu[:, :40], approximate="tanh") * gu[:, 40:],
                               atol=1e-6, rtol=1e-5)
    odd = torch.randn(2, 2 * 13, generator=gen) * 4
    torch.testing.assert_close(ops.gelu_tanh_mul(odd, 13), F.gelu(odd[:, :13], approximate="tanh") * odd[:, 13:],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1, 7, 32, 45, 49152, 49157])
def test_argmax_rows_is_torch_argmax(vocab):
    """The greedy token: the lowest id among equal maxima (integer-valued rows tie everywhere; the maxima land in
    every lane and chain), the first NaN when a row has one, 0 for a row of -inf; rows of a big call split over
    threads; Sampler.greedy_tokens takes it for CPU float32 and torch.argmax for the rest."""
    gen = torch.Generator().manual_seed(vocab)
    for rows in (1, 3, 40):
        ties = torch.randint(-4, 4, (rows, vocab), generator=gen).float()
        assert torch.equal(ops.argmax_rows(ties), torch.argmax(ties, dim=-1))
        x = torch.randn(rows, vocab, generator=gen)
        x[0, (vocab * 2) // 3] = float("nan")
        x[0, vocab - 1] = float("nan")
        x[-1] = float("-inf")
        if rows > 2:
            x[1, vocab // 2] = float("inf")
        assert torch.equal(ops.argmax_rows(x), torch.argmax(x, dim=-1))
        assert torch.equal(Sampler.greedy_tokens(x[:, : max(1, vocab - 1)]), torch.argmax(x[:, : max(1, vocab - 1)], dim=-1))
        assert torch.equal(Sampler.greedy_tokens(ties.half()), torch.argmax(ties.half(), dim=-1))
    with pytest.raises(ValueError, match="logits must be"):
        ops.argmax_rows(torch.zeros(2, 0))


@pytest.mark.parametrize("heads, kv_heads, D, T", [(4, 1, 256, 1), (4, 1, 256, 40), (8, 2, 64, 300)])
def test_qk_rms_norm_equals_the_per_head_norms(heads, kv_heads, D, T):
    """qk_rms_norm (Gemma 3's and Qwen3's q/k norms in one pass) gives bit for bit what rms_norm gives on the
    (tokens x heads, D) rows of q and of k, and copies v; 300 x 768 values take the threads."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=gen) * 3
    qw, kw = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], dim=-1)
    ref = torch.cat([ops.rms_norm(q.reshape(-1, D).contiguous(), qw, 1e-6).view(T, -1),
                     ops.rms_norm(k.reshape(-1, D).contiguous(), kw, 1e-6).view(T, -1), v], dim=-1)
    out = ops.qk_rms_norm(qkv, qw, kw, heads, kv_heads, 1e-6)
    assert torch.equal(out, ref)
    torch.testing.assert_close(out[:, :D], q[:, :D] * torch.rsqrt(q[:, :D].pow(2).mean(-1, keepdim=True) + 1e-6) * qw)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.qk_rms_norm(qkv[:, :-1].contiguous(), qw, kw, heads, kv_heads, 1e-6)


def flat_slots(cache: torch.Tensor) -> torch.Tensor:
    """(blocks, kv_heads, block_size, row) paged cache -> (slots, kv_heads, D) float32, slot = block * bs + row."""
    rows = from_cache_dtype(cache, torch.float32)  # (blocks, kv_heads, block_size, D)
    b, h, bs, d = rows.shape
    return rows.permute(0, 2, 1, 3).reshape(b * bs, h, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("window", [None, 4])
def test_paged_attention_matches_sdpa(window, dtype):
    """One call with a decode token (context 17), a prefill chunk (positions 3..7) and a long decode token (context
    1,200: three splits of the span): RoPE, the K/V write (rounded to the cache dtype as torch rounds, int8 rows
    byte for byte as `to_cache_dtype`) and causal (optionally windowed) attention per token agree with PyTorch's
    SDPA over the same cache."""
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, D, bs = 6, 2, 32, 4
    seqs = [(16, 1), (3, 5), (1199, 1)]  # (first new position, new tokens) per sequence
    slots = bs * (4 + sum(s + n for s, n in seqs) // bs)
    T = sum(n for _, n in seqs)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * D, generator=gen)
    ang = torch.randn(T, D // 2, generator=gen)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, D)
    k_cache = to_cache_dtype(torch.randn(slots // bs, kv_heads, bs, D, generator=gen), dtype)
    v_cache = to_cache_dtype(torch.randn(slots // bs, kv_heads, bs, D, generator=gen), dtype)
    perm = torch.randperm(slots, generator=gen)
    max_kv = max(s + n for s, n in seqs)
    kv_index = torch.zeros(len(seqs), max_kv, dtype=torch.long)
    slot_mapping, token_seq, kv_start, kv_len, used = [], [], [], [], 0
    for b, (s, n) in enumerate(seqs):
        kv_index[b, : s + n] = perm[used:used + s + n]
        used += s + n
        for p in range(s, s + n):
            seen = p + 1 if window is None else min(p + 1, window)
            slot_mapping.append(int(kv_index[b, p]))
            token_seq.append(b)
            kv_start.append(p + 1 - seen)
            kv_len.append(seen)
    slot_mapping = torch.tensor(slot_mapping)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ops.paged_attention(qkv, cos, sin, kc, vc, slot_mapping, kv_index, torch.tensor(token_seq),
                              torch.tensor(kv_start), torch.tensor(kv_len), heads, kv_heads, D**-0.5)

    q, k, v = qkv.split([heads * D, kv_heads * D, kv_heads * D], -1)
    q = apply_rotary(q.view(T, heads, D), cos[:, None], sin[:, None])
    k = apply_rotary(k.view(T, kv_heads, D), cos[:, None], sin[:, None])
    k_cache[slot_mapping // bs, :, slot_mapping % bs] = to_cache_dtype(k, dtype)
    v_cache[slot_mapping // bs, :, slot_mapping % bs] = to_cache_dtype(v.reshape(T, kv_heads, D), dtype)
    # K went through RoPE (float32 rounding may differ in the last bit, then one cache-dtype ulp, for int8 one step of
    # its block); V is copied exactly
    ulp = {torch.float32: 1.3e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.int8: 0}[dtype]
    step = k.abs().max().item() / 127 if dtype == torch.int8 else 1e-5
    torch.testing.assert_close(flat_slots(kc), flat_slots(k_cache), atol=step, rtol=ulp)
    assert torch.equal(vc, v_cache)
    kf, vf = flat_slots(kc), flat_slots(vc)
    for t in range(T):
        rows = kv_index[token_seq[t], kv_start[t]:kv_start[t] + kv_len[t]]
        kp = kf[rows].transpose(0, 1)[None]  # (1, kv_heads, seen, D)
        vp = vf[rows].transpose(0, 1)[None]
        ref = F.scaled_dot_product_attention(q[t, :, None][None], kp, vp, enable_gqa=True)  # (1, heads, 1, D)
        torch.testing.assert_close(out[t], ref.reshape(-1), atol=1e-5, rtol=1e-5)


def test_paged_attention_is_batch_invariant():
    """A long prefill token's output is bitwise the same computed alone, inside a chunk, or next to other
    sequences (the splits and tiles are fixed offsets from its span start, whatever the threads do)."""
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, D, bs, n = 9, 3, 64, 16, 1100
    k_cache = torch.randn(n // bs + 2, kv_heads, bs, D, generator=gen).half()
    v_cache = torch.randn(n // bs + 2, kv_heads, bs, D, generator=gen).half()
    qkv = torch.randn(n, (heads + 2 * kv_heads) * D, generator=gen)
    cos, sin = torch.ones(n, D), torch.zeros(n, D)
    kv_index = torch.arange(n)[None]  # (1, n)
    every = torch.arange(n)  # write every position's K/V once, so that each run below rewrites the same values
    zeros = torch.zeros(n, dtype=torch.long)
    ops.paged_attention(qkv, cos, sin, k_cache, v_cache, every, kv_index, zeros, zeros, every + 1, heads, kv_heads, 1.0)

    def run(tokens, extra: int):
        """positions `tokens` of the sequence, plus `extra` decode tokens of a second short sequence"""
        t = torch.tensor(tokens)
        idx = torch.cat([kv_index, torch.zeros(1, n, dtype=torch.long)]) if extra else kv_index
        seq = torch.cat([torch.zeros(len(tokens), dtype=torch.long), torch.ones(extra, dtype=torch.long)])
        start = torch.zeros(len(tokens) + extra, dtype=torch.long)
        lens = torch.cat([t + 1, torch.full((extra,), 5)])
        rows = torch.cat([qkv[t], qkv[:extra]])
        slots = torch.cat([t, torch.full((extra,), n + 3)])  # the extra tokens write a spare slot
        return ops.paged_attention(rows, cos[: len(rows)], sin[: len(rows)], k_cache.clone(), v_cache.clone(),
                                   slots, idx, seq, start, lens, heads, kv_heads, D**-0.5)

    alone = run([1099], 0)[0]
    assert torch.equal(run(list(range(1080, 1100)), 0)[-1], alone)
    assert torch.equal(run([1099], 3)[0], alone)
    assert torch.equal(run(list(range(600, 1100)), 2)[499], alone)


def test_dense_linear_matches_torch_and_is_row_invariant():
    gen = torch.Generator().manual_seed(2)
    for n, k in ((37, 45), (96, 64)):  # K not a multiple of 8, and one that is
        w, b, x = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen), torch.randn(33, k, generator=gen)
        y = ops.dense_linear(x, w, b, 0)
        torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        for m in (1, 2, 5, 8, 32):
            assert torch.equal(ops.dense_linear(x[:m], w, b, 0), y[:m])
            assert torch.equal(ops.dense_linear(x[m:m + 1], w, None, 0), ops.dense_linear(x, w, None, 0)[m:m + 1])


def plain_pytorch(model, plain: bool = True) -> None:
    """Switches a loaded model between the fused path and the plain PyTorch path (generic layer loop, PyTorch
    RoPE + index_copy_ + SDPA attention backend)."""
    model._fused = None if plain else fused_ops()
    for layer in model.layers:
        attn = layer.self_attn
        attn.backend = attn.torch_backend if plain else model._attention_backend


@pytest.mark.parametrize("kind", list(TINY_CONFIGS))
def test_batched_decode_fused_equals_generic(kind, tiny_model_dirs):
    llm = LLM(str(tiny_model_dirs[kind]), dtype="float32", enable_prefix_caching=False)
    assert llm.model._fused is not None
    prompts = [[5 + i for i in range(n)] for n in (3, 11, 20)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    fused = llm.generate(prompts, params)
    plain_pytorch(llm.model)
    generic = llm.generate(prompts, params)
    for a, b in zip(fused, generic):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert abs(la[t] - lb[t]) < 1e-4


def test_decode_prepare_equals_general_prepare(tiny_model_dirs):
    """The runner's decode-only metadata gives the same logits as its general metadata, on both model paths."""
    llm = LLM(str(tiny_model_dirs["llama"]), dtype="float32", enable_prefix_caching=False)
    prompts = [[5 + i for i in range(n)] for n in (3, 18, 40)]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    runner = llm.engine.runner
    results = []
    for general, fused in ((False, True), (True, True), (False, False), (True, False)):
        runner.prepare = (lambda s: runner._prepare_general(s, None)) if general else type(runner).prepare.__get__(runner)
        plain_pytorch(llm.model, plain=not fused)
        results.append(llm.generate(prompts, params))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys() and all(abs(la[t] - lb[t]) < 1e-4 for t in la)
