"""Gemma 3 (text): sandwich-normed blocks of q/k-normed attention, interleaved local (sliding window) and global
layers with their own RoPE bases, and GeGLU.

embedding * sqrt(hidden) -> [RMSNorm -> QKV -> q/k RMSNorm -> RoPE (local or global base) -> attention (the
sliding window on local layers) -> out-proj -> RMSNorm (+residual) -> RMSNorm -> GeGLU -> RMSNorm (+residual)]
x n_layers -> RMSNorm -> tied lm_head -> logits (soft-capped where the config says so)

Gemma's norms multiply by (1 + w): transformers checkpoints store w (the norms add 1 at load), GGUF files
store 1 + w already (llama.cpp's convert_hf_to_gguf adds it), see ModelConfig.norm_type.  Attention scores are
scaled by query_pre_attn_scalar^-1/2.  In float32 on the CPU every step takes `_forward_fused`: the compiled
RMSNorm, GeGLU and RoPE + K/V write + attention ops and the matmuls called directly, without the modules' dispatch
(the same ops in the same order as the modules, so the same numbers); elsewhere the modules run one by one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from lmgen.config import ModelConfig
from lmgen.errors import UnsupportedModelError
from lmgen.layers.attention import Attention, AttentionMetadata
from lmgen.layers.mlp import GeGLU
from lmgen.layers.norm import RMSNorm
from lmgen.layers.rope import RotaryEmbedding
from lmgen.layers.weight_slots import EmbeddingSlot, LayerFactory, LinearSlot
from lmgen.models.base import CausalLM, attention_backend, direct_call, fused_float_ops

logger = logging.getLogger("lmgen.model")


class Gemma3Block(torch.nn.Module):
    """x + norm(attn(norm(x))), then + norm(mlp(norm(x))): one decoder layer."""

    def __init__(self, attn: Attention, mlp: GeGLU, norm: Callable[[], RMSNorm], sliding: bool):
        super().__init__()
        self.self_attn, self.mlp, self.sliding = attn, mlp, sliding
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(CausalLM):
    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig, factory: LayerFactory, compile: bool = False):
        super().__init__(config, factory.dtype, factory.device)
        if config.attn_logit_softcapping is not None:
            raise UnsupportedModelError("attn_logit_softcapping (Gemma 2) is not supported")
        fused = fused_float_ops(self.device, self.dtype, compile, factory.batch_invariant)
        backend = attention_backend(config, fused, factory.batch_invariant)
        self.rotary = RotaryEmbedding(config, self.device, self.dtype)  # global layers
        local = dataclasses.replace(config, rope_theta=config.rope_local_theta or config.rope_theta,
                                    rope_scaling={"rope_type": "default"})
        self.rotary_local = RotaryEmbedding(local, self.device, self.dtype)
        offset = 1.0 if config.norm_type == "rms_one_plus" else 0.0  # see the module docstring
        h, q, kv, inter, d = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size, config.head_dim

        def norm(size: int = h) -> RMSNorm:
            return RMSNorm(size, config.rms_norm_eps, self.dtype, self.device, fused, offset)

        self.embed_tokens = EmbeddingSlot(factory, config.vocab_size, h)
        # transformers multiplies by sqrt(hidden) held as a tensor of the embedding's dtype
        self.register_buffer("embed_scale", torch.tensor(config.embedding_scale or 1.0, dtype=self.dtype,
                                                         device=self.device), persistent=False)
        self.layers = torch.nn.ModuleList()
        for i in range(config.num_layers):
            qkv = LinearSlot(factory, h, [q, kv, kv], config.attention_bias, ("q_proj", "k_proj", "v_proj"))
            o = LinearSlot(factory, q, [h], config.attention_bias)
            gate_up = LinearSlot(factory, h, [inter, inter], False, ("gate_proj", "up_proj"))
            down = LinearSlot(factory, inter, [h], False)
            sliding = config.layer_window(i) is not None
            attn = Attention(config, qkv, o, backend, q_norm=norm(d), k_norm=norm(d), sliding=sliding)
            self.layers.append(Gemma3Block(attn, GeGLU(gate_up, down, inter, fused), norm, sliding))
        self.norm = norm()
        self.lm_head = LinearSlot(factory, h, [config.vocab_size], False)
        self._compiled = torch.compile(self._run_layers, dynamic=True) if compile else None
        self._fused, self._backend = fused, backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (tokens,) -> hidden states (tokens, hidden); writes K/V into kv_caches."""
        x = self.embed_tokens(input_ids) * self.embed_scale  # (tokens, hidden)
        for rotary in (self.rotary, self.rotary_local):
            rotary.reserve(meta.max_position + 1)
        rope = (self.rotary(positions), self.rotary_local(positions))  # ((tokens, head_dim) cos, sin) x 2
        if self._fused is not None and self._backend.supports(meta):
            return self._forward_fused(x, rope, kv_caches, meta)
        return (self._compiled or self._run_layers)(x, rope, kv_caches, meta)

    def _run_layers(self, x, rope, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            cos, sin = rope[1] if layer.sliding else rope[0]
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.norm(x)

    def _forward_fused(self, x, rope, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The same layers as `_run_layers` with the module calls gone: each layer's compiled norms, matmuls and
        attention (`Attention.attend`) called directly (the per-module dispatch, not the arithmetic, bounds a small
        model's decode step), every row in the same fixed order.  x (tokens, hidden) -> final-normed (tokens, hidden)."""
        ops, eps = self._fused, self.config.rms_norm_eps
        if self._plan is None:
            self._plan = self._layer_plan()
        first_norm, plan = self._plan
        normed = ops.rms_norm(x, first_norm, eps)  # the first layer's input norm (tokens, hidden)
        for (qkv_proj, attend, o_proj, gate_up_proj, down_proj, norms, sliding, inter), (k_cache, v_cache) \
                in zip(plan, kv_caches):
            w_post_attn, w_pre_ffw, w_post_ffw, w_next = norms
            cos, sin = rope[1] if sliding else rope[0]
            out = attend(qkv_proj(normed), cos, sin, k_cache, v_cache, meta)  # (tokens, q_size)
            # x + post-attention norm of the output, and the pre-feedforward norm of that sum, in one call
            x, normed = ops.add_rms_norm(x, ops.rms_norm(o_proj(out), w_post_attn, eps), w_pre_ffw, eps)
            act = ops.gelu_tanh_mul(gate_up_proj(normed), inter)  # gelu_tanh(gate) * up (tokens, intermediate)
            x, normed = ops.add_rms_norm(x, ops.rms_norm(down_proj(act), w_post_ffw, eps), w_next, eps)
        return normed  # the last layer's w_next is the final norm

    def _layer_plan(self) -> tuple[torch.Tensor, list[tuple]]:
        """What `_forward_fused` needs of each layer, looked up once: the linear layers' and the attention's callables
        and the norm weights (post-attention, pre- and post-feedforward, then the next layer's input norm or the
        final norm), after the first layer's input norm.  Reset by `CausalLM._apply`."""
        plan = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            nxt = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            norms = tuple(n.weight for n in (layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                                              layer.post_feedforward_layernorm, nxt))
            plan.append((direct_call(attn.qkv_proj), attn.attend, direct_call(attn.o_proj), direct_call(mlp.gate_up_proj),
                         direct_call(mlp.down_proj), norms, layer.sliding, mlp.intermediate_size))
        return self.layers[0].input_layernorm.weight, plan

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, hidden) -> logits (rows, vocab) float32, soft-capped: cap * tanh(logits / cap)."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
