"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama): pre-norm blocks of RoPE attention and SwiGLU.

embedding -> [RMSNorm -> QKV -> RoPE -> attention over the paged KV cache -> out-proj (+residual)
              -> RMSNorm -> SwiGLU MLP (+residual)] x n_layers -> RMSNorm -> lm_head -> logits

Tokens of all scheduled sequences are flattened into one (tokens, hidden) batch; `AttentionMetadata`
says where each token's K/V goes in the cache and which cached positions each query may see, so prefill
chunks and single decode tokens run through the very same code.  RoPE, the K/V write and attention live in
lmgen.layers.attention, whose backend (PyTorch, or the fused CPU op) is chosen here at load.

In float32 on CPU every step takes a fused path instead (`_forward_fused`): the compiled ops of csrc/ do
RMSNorm, residual add, SwiGLU and RoPE + K/V write + attention in 8 calls per layer instead of ~50 PyTorch ops,
whose dispatch overhead, not the arithmetic, bounded the decode speed of small models (SmolLM2-135M Q4_1,
2 threads: 69 -> 142-155 tok/s).  Each of those ops, and the matmuls, sums every row in a fixed order, so a
request's logits are bit-identical whatever else shares its step, whether the step mixes prefill chunks and
decode tokens, and whatever chunks its prompt was prefilled in (batch invariance, the default).  With
batch_invariant=False only pure decode steps take the fused path; prefill and mixed steps use the generic path
(PyTorch SDPA, MKL matmuls for float weights).  Other devices and dtypes always use the generic path;
tests/test_fused_ops.py checks that both paths agree and tests/test_batch_invariance.py the invariance.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from lmgen.config import ModelConfig
from lmgen.layers.attention import Attention, AttentionMetadata, FusedCPUAttentionBackend, TorchAttentionBackend
from lmgen.layers.kernels import fused_ops
from lmgen.layers.mlp import SwiGLU
from lmgen.layers.norm import RMSNorm
from lmgen.layers.rope import RotaryEmbedding
from lmgen.layers.weight_slots import EmbeddingSlot, LayerFactory, LinearSlot
from lmgen.models.base import CausalLM

logger = logging.getLogger("lmgen.model")


class LlamaBlock(torch.nn.Module):
    """x + attn(norm(x)), then + mlp(norm(x)): one decoder layer."""

    def __init__(self, attn: Attention, mlp: SwiGLU, attn_norm: RMSNorm, mlp_norm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = attn_norm, mlp_norm

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    """The whole model, built from its config; the weights come through `load_weights` and `finalize`."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, config: ModelConfig, factory: LayerFactory, compile: bool = False):
        super().__init__(config, factory.dtype, factory.device)
        self.batch_invariant = factory.batch_invariant
        # The compiled fused float32 ops (csrc/fused_ops.h) on CPU: the whole decode step, and RMSNorm / SwiGLU of
        # every step; None: plain PyTorch only (other devices / dtypes, or no compiler).  Decode of a small model
        # is bound by per-op overhead.  compile=True hands the layers to torch.compile instead, which cannot trace
        # into these ops.
        self._fused = fused_ops() if self.device.type == "cpu" and self.dtype == torch.float32 and not compile else None
        if self.batch_invariant and self._fused is None:
            logger.warning("batch invariance needs float32 on the CPU with the compiled kernels and no compile=True; "
                           "here (%s, %s) a request's results may depend on the other requests in its step",
                           self.device, self.dtype)
        self.rotary = RotaryEmbedding(config, self.device, self.dtype)
        # RoPE + K/V write + attention: chosen once; one (stateless) backend object serves every layer
        self._attention_backend = (TorchAttentionBackend(config) if self._fused is None
                                   else FusedCPUAttentionBackend(config, self._fused, all_steps=self.batch_invariant))
        h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size

        def norm() -> RMSNorm:
            return RMSNorm(h, config.rms_norm_eps, self.dtype, self.device, self._fused)

        self.embed_tokens = EmbeddingSlot(factory, config.vocab_size, h)
        self.layers = torch.nn.ModuleList()
        for _ in range(config.num_layers):
            qkv = LinearSlot(factory, h, [q, kv, kv], config.attention_bias, ("q_proj", "k_proj", "v_proj"))
            o = LinearSlot(factory, q, [h], config.o_bias)
            gate_up = LinearSlot(factory, h, [inter, inter], config.mlp_bias, ("gate_proj", "up_proj"))
            down = LinearSlot(factory, inter, [h], config.mlp_bias)
            self.layers.append(LlamaBlock(Attention(config, qkv, o, self._attention_backend),
                                          SwiGLU(gate_up, down, inter, self._fused), norm(), norm()))
        self.norm = norm()
        self.lm_head = LinearSlot(factory, h, [config.vocab_size], False)
        self._plan: tuple | None = None  # per-layer callables of the fused decode loop, see `_layer_plan`
        # torch.compile of the layer stack (Inductor: elementwise ops fused into generated kernels, the per-op
        # dispatch gone); dynamic=True because every step has its own token count and context length.  Packed
        # quantized layers stay opaque calls between compiled pieces.
        self._compiled = torch.compile(self._run_layers, dynamic=True) if compile else None

    def finalize(self, progress: Callable[[], None] | None = None) -> None:
        """Builds the layers; the output layer shares the embedding's matrix when the model ties them (or the
        checkpoint has no lm_head)."""
        tied = self.config.tie_word_embeddings or bool(self.lm_head.missing())
        if tied:
            self.lm_head = torch.nn.Identity()  # replaced below, once the embedding exists
        super().finalize(progress)
        if tied:
            self.lm_head = self.embed_tokens.as_linear()  # one (vocab, hidden) matrix for both

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (tokens,) -> hidden states (tokens, hidden); writes K/V into kv_caches."""
        x = self.embed_tokens(input_ids)  # (tokens, hidden)
        self.rotary.reserve(meta.max_position + 1)
        cos, sin = self.rotary(positions)  # (tokens, head_dim) each
        if self._fused is not None and self._attention_backend.supports(meta):
            return self._forward_fused(x, cos, sin, kv_caches, meta)
        return (self._compiled or self._run_layers)(x, cos, sin, kv_caches, meta)

    def _run_layers(self, x, cos, sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The generic path: every block, then the final norm. x (tokens, hidden) -> (tokens, hidden)."""
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.norm(x)

    def _forward_fused(self, x, cos, sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """A step with the compiled fused ops: per layer 8 calls (qkv, RoPE + cache write + attention, o_proj,
        residual add + norm, gate_up, SwiGLU, down, residual add + next norm) instead of ~50 PyTorch ops; every
        row in a fixed order (float32, CPU).  x (tokens, hidden) -> final-normed hidden states (tokens, hidden)."""
        ops, eps = self._fused, self.config.rms_norm_eps
        # cos, sin: (tokens, head_dim) rows of the RoPE tables, contiguous
        if self._plan is None:
            self._plan = self._layer_plan()
        first_norm, plan = self._plan
        normed = ops.rms_norm(x, first_norm, eps)  # (tokens, hidden)
        for (qkv_proj, attend, o_proj, gate_up_proj, down_proj, post_norm, next_norm, inter), \
                (k_cache, v_cache) in zip(plan, kv_caches):
            qkv = qkv_proj(normed)  # (tokens, (heads + 2 kv_heads) * head_dim)
            out = attend(qkv, cos, sin, k_cache, v_cache, meta)  # (tokens, heads * head_dim); writes K/V
            x, normed = ops.add_rms_norm(x, o_proj(out), post_norm, eps)
            act = ops.silu_mul(gate_up_proj(normed), inter)  # (tokens, intermediate)
            x, normed = ops.add_rms_norm(x, down_proj(act), next_norm, eps)  # next layer's input norm / final norm
        return normed

    def _layer_plan(self) -> tuple[torch.Tensor, list[tuple]]:
        """What `_forward_fused` needs of each layer, looked up once: the linear layers' forward callables
        (bypassing nn.Module.__call__, so no hooks) and the norm weights.  The attribute lookups and module
        dispatch cost ~0.5 ms per token over 30 layers.  Reset by `_apply` (.to() may replace tensors)."""
        def fn(m: torch.nn.Module):
            impl = getattr(m, "_impl", None)  # QuantizedLinear: the C++ PackedLinear itself
            return impl if impl is not None else m.forward

        plan = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            plan.append((fn(attn.qkv_proj), attn.backend, fn(attn.o_proj), fn(mlp.gate_up_proj), fn(mlp.down_proj),
                         layer.post_attention_layernorm.weight, next_norm.weight, mlp.intermediate_size))
        return self.layers[0].input_layernorm.weight, plan

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._plan = None
        return out
