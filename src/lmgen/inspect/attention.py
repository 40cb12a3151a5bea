"""Attention weights of the newest token over its context, for one layer and head, recomputed on demand with plain
PyTorch ops over the model's own modules (no KV cache, nothing written): the serving path never computes or keeps
attention weights, so inspecting them costs normal serving nothing.  Call it on the thread that runs the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmgen.errors import InvalidRequestError
from lmgen.layers.rope import apply_rotary

MAX_CONTEXT = 4096  # tokens the recompute takes (its activations are (tokens, hidden) per layer, never (tokens, tokens))


def _check(name: str, value, upper: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < upper:
        raise InvalidRequestError(f"{name} must be an integer in [0, {upper}), got {value!r}", param=name, value=value)


def _causal_mask(n: int, window: int | None) -> torch.Tensor:
    """(n, n) bool: query i sees keys j <= i (and j > i - window)."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    mask = j <= i
    if window is not None:
        mask &= j > i - window
    return mask


@torch.inference_mode()
def attention_weights(model, ids: list[int], layer: int, head: int) -> tuple[list[float], torch.Tensor]:
    """Softmax(q_last . K^T * scale) of query head `head` at layer `layer` over the context `ids` -> one weight per
    context token (sums to 1; 0 outside a sliding window), and the logits (vocab,) this recompute gives for the next
    token: the caller compares them with the engine's, so a model whose blocks are shaped otherwise is caught."""
    cfg = model.config
    _check("layer", layer, cfg.num_layers)
    _check("head", head, cfg.num_heads)
    n = len(ids)
    if not 1 <= n <= MAX_CONTEXT:
        raise InvalidRequestError(f"attention is shown for contexts of 1 to {MAX_CONTEXT} tokens, this one has {n}",
                                  param="step", value=n)
    group = cfg.num_heads // cfg.num_kv_heads  # query heads per K/V head (GQA)
    dev = model.device
    x = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=dev))  # (n, hidden)
    model.rotary.reserve(n)
    cos, sin = model.rotary(torch.arange(n, device=dev))  # (n, head_dim) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    window = cfg.sliding_window if cfg.sliding_window is not None and n > cfg.sliding_window else None
    mask = _causal_mask(n, window).to(dev) if window is not None else None  # None: SDPA's causal kernel, no n x n mask
    weights: list[float] = []
    for i, block in enumerate(model.layers):
        attn = block.self_attn
        qkv = attn.qkv_proj(block.input_layernorm(x))  # (n, q + 2 kv)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = apply_rotary(q.reshape(n, attn.num_heads, attn.head_dim), cos, sin)  # (n, heads, head_dim)
        k = apply_rotary(k.reshape(n, attn.num_kv_heads, attn.head_dim), cos, sin)  # (n, kv_heads, head_dim)
        if i == layer:
            scores = (k[:, head // group, :].float() @ q[-1, head, :].float()) * attn.head_dim ** -0.5  # (n,)
            if window is not None:
                scores[: n - window] = float("-inf")  # outside the newest token's window
            weights = torch.softmax(scores, dim=-1).tolist()
        v = v.reshape(n, attn.num_kv_heads, attn.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                             is_causal=mask is None, scale=attn.head_dim ** -0.5, enable_gqa=True)  # (heads, n, head_dim)
        x = x + attn.o_proj(out.transpose(0, 1).reshape(n, attn.q_size))
        x = x + block.mlp(block.post_attention_layernorm(x))
    logits = model.compute_logits(model.norm(x[-1:]))[0]  # (vocab,)
    return weights, logits
