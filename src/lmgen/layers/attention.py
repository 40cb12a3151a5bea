"""Attention over the paged KV cache: RoPE, the K/V write and grouped-query attention, in one module.

This is the one place where K and V are written.  `AttentionMetadata` (built once per step by the
ModelRunner) says where each new token's K/V goes and which cached positions each query sees.  The backend is
chosen once, when the model is built:
  TorchAttentionBackend     plain PyTorch (rotate, index_copy_ into the cache, SDPA); any device and dtype
  FusedCPUAttentionBackend  csrc/attention.h's paged_attention: the same three steps in one compiled call per
                            layer, flash-style (online softmax over K/V tiles, no score matrix), each token in a
                            fixed order (batch invariance); float32 activations on CPU, a float32, float16,
                            bfloat16 or int8 cache
With batch_invariant=False the fused backend serves only pure decode steps and PyTorch the rest, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmgen.config import ModelConfig
from lmgen.layers.norm import RMSNorm
from lmgen.layers.rope import apply_rotary


@dataclass
class AttentionMetadata:
    """Index tensors for one forward step, built once by the ModelRunner and shared by every layer."""

    slot_mapping: torch.Tensor  # (tokens,) int64: flat cache slot where each new token's K/V is written
    # (batch, max_q) int64: row of `tokens` for each sequence's queries (padded with 0); None when the batch
    # is a single sequence, whose queries are simply all the tokens
    query_index: torch.Tensor | None
    output_index: torch.Tensor | None  # (tokens,) int64: row of each token in the flat (batch*max_q) output
    kv_index: torch.Tensor  # (batch, max_kv) int64: flat cache slots of each sequence's context (padded with 0)
    mask: torch.Tensor | None  # (batch, 1, max_q, max_kv) bool: True where a query may attend; None = all
    # (batch,) int64: context length of each sequence, set only when every sequence has exactly one query token
    # (a pure decode step); with batch_invariant=False only such steps take the fused backend
    decode_kv_lens: torch.Tensor | None = None
    # True when the batch is one sequence whose queries are its whole context (a prefill from position 0): the
    # mask is then exactly causal, `mask` is None, and SDPA's is_causal kernel skips the masked half
    causal: bool = False
    # (tokens,) int64 each, for the fused backend (csrc/attention.h): the sequence (row of kv_index) of each
    # token, and the span [start, start + len) of that row the token sees
    token_seq: torch.Tensor | None = None
    token_kv_start: torch.Tensor | None = None
    token_kv_len: torch.Tensor | None = None
    max_position: int = 0  # the step's highest position (the model's RoPE tables must cover it)
    # the same step for the sliding-window layers of a model that mixes them with global ones (Gemma 3), with the
    # window applied; None for other models (Mistral's window applies to every layer, so to this metadata itself)
    sliding: "AttentionMetadata | None" = None


def attention_scale(config: ModelConfig) -> float:
    """The factor of q.k: head_dim^-1/2, or query_pre_attn_scalar^-1/2 where the config has one (Gemma)."""
    return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


HALF_MAX = 65504.0  # the largest finite float16


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """K/V rows (..., D) -> cache rows, the same bytes as csrc/kv_tile.h's `from_f32`: float16 saturates at +-65504
    instead of becoming inf; int8 rows are (..., D + D / 16): per 32 values q = round(x / d) in [-127, 127],
    d = max|x| / 127 as float16, the D / 32 scales' bytes after the values."""
    if dtype == torch.int8:
        xb = x.float().unflatten(-1, (-1, 32))  # (..., D / 32, 32)
        d = (xb.abs().amax(-1, keepdim=True) / 127).clamp(max=HALF_MAX).to(torch.float16)  # (..., D / 32, 1)
        df = d.float()
        inv = torch.where(df > 0, 1 / df, torch.zeros_like(df))
        q = (xb * inv).round().clamp(-127, 127).to(torch.int8).flatten(-2)  # (..., D)
        return torch.cat([q, d.flatten(-2).view(torch.int8)], dim=-1)
    if dtype == torch.float16 and x.dtype != torch.float16:
        x = x.clamp(-HALF_MAX, HALF_MAX)
    return x.to(dtype)


def from_cache_dtype(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows -> K/V rows (..., D) of `dtype`, the values csrc/kv_tile.h's `to_f32` reads (int8: q * d)."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    D = rows.shape[-1] * 16 // 17  # an int8 row is D + D / 16 bytes
    q, d = rows[..., :D], rows[..., D:].contiguous().view(torch.float16)  # (..., D), (..., D / 32)
    return (q.float().unflatten(-1, (-1, 32)) * d.float()[..., None]).flatten(-2).to(dtype)


class TorchAttentionBackend:
    """RoPE, K/V write and attention with PyTorch ops (SDPA over the gathered, padded context)."""

    def __init__(self, config: ModelConfig):
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size, self.scale = config.q_size, config.kv_size, attention_scale(config)

    def supports(self, meta: AttentionMetadata) -> bool:
        return True

    def __call__(self, qkv, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """qkv (tokens, q + 2 kv), cos/sin (tokens, head_dim) -> (tokens, q_size); writes K/V into the caches."""
        tokens = qkv.shape[0]
        cos, sin = cos[:, None, :], sin[:, None, :]  # (tokens, 1, head_dim): broadcast over heads
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(tokens, self.num_heads, self.head_dim), cos, sin)  # (tokens, heads, head_dim)
        k = apply_rotary(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)  # (tokens, kv_heads, head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        # Write this step's K/V into the paged cache first, so the gather below sees them.  Cache:
        # (blocks, kv_heads, block_size, head_dim); slot s is row s % block_size of block s // block_size.
        bs = k_cache.shape[2]
        k_cache[meta.slot_mapping // bs, :, meta.slot_mapping % bs] = to_cache_dtype(k, k_cache.dtype)
        v_cache[meta.slot_mapping // bs, :, meta.slot_mapping % bs] = to_cache_dtype(v, v_cache.dtype)
        qp = (q[None] if meta.query_index is None else q[meta.query_index]).transpose(1, 2)  # (batch, heads, max_q, head_dim)
        blk, row = meta.kv_index // bs, meta.kv_index % bs  # (batch, max_kv)
        kp = from_cache_dtype(k_cache[blk, :, row], q.dtype).transpose(1, 2)  # (batch, kv_heads, max_kv, head_dim)
        vp = from_cache_dtype(v_cache[blk, :, row], q.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.mask, is_causal=meta.causal, scale=self.scale,
                                             enable_gqa=True)
        out = out.transpose(1, 2).reshape(-1, self.q_size)  # (batch*max_q, heads*head_dim)
        if meta.output_index is not None:
            out = out[meta.output_index]  # (tokens, heads*head_dim): drop the padding rows
        return out


class FusedCPUAttentionBackend:
    """RoPE, K/V write and attention in one compiled call (csrc/attention.h), float32 activations on CPU.  all_steps=False
    (batch_invariant=False): it serves pure decode steps only, the PyTorch backend the others."""

    def __init__(self, config: ModelConfig, ops, all_steps: bool):
        self.num_heads, self.num_kv_heads, self.scale = config.num_heads, config.num_kv_heads, attention_scale(config)
        self._paged_attention, self.all_steps = ops.paged_attention, all_steps

    def supports(self, meta: AttentionMetadata) -> bool:
        return meta.token_seq is not None and (self.all_steps or meta.decode_kv_lens is not None)

    def __call__(self, qkv, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """qkv (tokens, q + 2 kv) float32, cos/sin (tokens, head_dim) -> (tokens, q_size); writes K/V."""
        return self._paged_attention(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, meta.kv_index,
                                     meta.token_seq, meta.token_kv_start, meta.token_kv_len, self.num_heads,
                                     self.num_kv_heads, self.scale)


class Attention(torch.nn.Module):
    """Grouped-query attention (num_heads query heads share num_kv_heads K/V heads): QKV projection, then the
    backend's RoPE + K/V write + attention, then the output projection.

    q_norm / k_norm (Qwen3, Gemma 3): norms over each head of q and k, between the projection and RoPE.  sliding:
    this layer attends within the sliding window of a model that mixes local and global layers (`meta.sliding`)."""

    def __init__(self, config: ModelConfig, qkv: torch.nn.Module, o_proj: torch.nn.Module, backend,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None, sliding: bool = False):
        super().__init__()
        self.sliding = sliding
        self.q_norm, self.k_norm = q_norm, k_norm
        self.qkv_proj, self.o_proj = qkv, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.backend = backend  # chosen at load (see the module docstring)
        self.torch_backend = backend if isinstance(backend, TorchAttentionBackend) else TorchAttentionBackend(config)

    def set_qk_norms(self, q_norm: RMSNorm, k_norm: RMSNorm) -> None:
        self.q_norm, self.k_norm = q_norm, k_norm

    def norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (tokens, q + 2 kv) -> the same with each head of q and k normalized."""
        qn, kn = self.q_norm, self.k_norm
        if qn.takes_fused(qkv) and kn.takes_fused(qkv) and qn.eps == kn.eps:
            # one compiled pass over the heads, the same values as the two norms below (csrc/fused_ops.h)
            return qn.fused.qk_rms_norm(qkv, qn.weight, kn.weight, self.num_heads, self.num_kv_heads, qn.eps)
        tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # contiguous: the norm takes one code path (the compiled op on the CPU) whatever the step's token count
        q = self.q_norm(q.reshape(tokens * self.num_heads, self.head_dim).contiguous()).view(tokens, self.q_size)
        k = self.k_norm(k.reshape(tokens * self.num_kv_heads, self.head_dim).contiguous()).view(tokens, self.kv_size)
        return torch.cat([q, k, v], dim=-1)

    def attend(self, qkv, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """qkv (tokens, q + 2 kv) -> attention output (tokens, q_size) before o_proj; writes this step's K/V."""
        if self.q_norm is not None:
            qkv = self.norm_qk(qkv)
        if self.sliding and meta.sliding is not None:
            meta = meta.sliding
        backend = self.backend if self.backend.supports(meta) else self.torch_backend
        return backend(qkv, cos, sin, k_cache, v_cache, meta)

    def forward(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """x (tokens, hidden), cos/sin (tokens, head_dim) -> (tokens, hidden)."""
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin, k_cache, v_cache, meta))
