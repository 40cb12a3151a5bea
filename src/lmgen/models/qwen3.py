"""Qwen3: Llama's blocks (RMSNorm, RoPE attention, SwiGLU) with an RMSNorm over each head of q and k before
RoPE, an explicit head_dim and no QKV bias.

The q/k norms sit between the QKV projection and RoPE, so the whole-step fused loop of the Llama family
(`LlamaForCausalLM._forward_fused`) does not apply: every step runs the layers one by one, with the compiled
RMSNorm, SwiGLU and RoPE + K/V write + attention ops where they apply (float32 CPU), which keeps a request's
results independent of its batch.
"""

from __future__ import annotations

import logging

import torch

from lmgen.config import ModelConfig
from lmgen.layers.attention import AttentionMetadata
from lmgen.layers.norm import RMSNorm
from lmgen.layers.weight_slots import LayerFactory
from lmgen.models.llama import LlamaForCausalLM

logger = logging.getLogger("lmgen.model")


class Qwen3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM plus `self_attn.q_norm` / `self_attn.k_norm` (head_dim,) in every layer."""

    def __init__(self, config: ModelConfig, factory: LayerFactory, compile: bool = False):
        super().__init__(config, factory, compile)
        for layer in self.layers:
            layer.self_attn.set_qk_norms(
                *(RMSNorm(config.head_dim, config.rms_norm_eps, self.dtype, self.device, self._fused) for _ in range(2)))
        if self._fused is not None:
            logger.info("Qwen3: the layers run one by one (q/k norms come between the projection and RoPE), with "
                        "the fused RMSNorm, SwiGLU and attention ops; not the Llama family's whole-step fused loop")

    def _forward_fused(self, x, cos, sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The layer-by-layer path (see the module docstring). x (tokens, hidden) -> (tokens, hidden)."""
        return self._run_layers(x, cos, sin, kv_caches, meta)
