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

import torch

from lmgen.config import ModelConfig
from lmgen.layers.attention import Attention, AttentionMetadata, FusedCPUAttentionBackend, TorchAttentionBackend
from lmgen.layers.kernels import fused_ops
from lmgen.layers.mlp import SwiGLU
from lmgen.layers.norm import RMSNorm
from lmgen.layers.pipeline import run_pipelined
from lmgen.layers.rope import RotaryEmbedding
from lmgen.layers.weight_slots import EmbeddingSlot, LayerFactory, LinearSlot
from lmgen.models.base import CausalLM, direct_call

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
        full, tp = config, factory.tp  # under tensor parallelism this rank holds a slice of every layer
        split = tp is not None and tp.size > 1
        config = tp.local_config(full) if split else full
        # under pipeline parallelism this rank holds layers [first, end); the first stage (the driver) also the
        # embedding and the output layer, the last the final norm (lmgen.layers.pipeline)
        pp = factory.pp if factory.pp is not None and factory.pp.size > 1 else None
        config = pp.local_config(config) if pp else config
        super().__init__(config, factory.dtype, factory.device)
        self.pp, self.layer_offset = pp, pp.first if pp else 0
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

        # this rank's rows / columns of each whole tensor (None without tensor parallelism; layers.parallel)
        vocab = full.vocab_size // tp.size if split else full.vocab_size
        kv_rows = tp.kv_rows(full.num_kv_heads, full.head_dim) if split else None
        qkv_rows = [tp.split(full.q_size), kv_rows, kv_rows] if split else None
        gate_up_rows = [tp.split(full.intermediate_size)] * 2 if split else None
        vocab_rows = tp.split(full.vocab_size) if split else None
        first, last = pp is None or pp.is_first, pp is None or pp.is_last
        self.embed_tokens = EmbeddingSlot(factory, vocab, h, vocab_rows) if first else None
        self.layers = torch.nn.ModuleList()
        for _ in range(config.num_layers):
            qkv = LinearSlot(factory, h, [q, kv, kv], config.attention_bias, ("q_proj", "k_proj", "v_proj"), qkv_rows)
            o, down = self._output_projections(factory, full, split)
            gate_up = LinearSlot(factory, h, [inter, inter], config.mlp_bias, ("gate_proj", "up_proj"), gate_up_rows)
            self.layers.append(LlamaBlock(Attention(config, qkv, o, self._attention_backend),
                                          SwiGLU(gate_up, down, inter, self._fused), norm(), norm()))
        self.norm = norm() if last else None
        self.lm_head = LinearSlot(factory, h, [vocab], False, rows=[vocab_rows] if split else None,
                                  combine="gather") if first else None
        # torch.compile of the layer stack (Inductor: elementwise ops fused into generated kernels, the per-op
        # dispatch gone); dynamic=True because every step has its own token count and context length.  Packed
        # quantized layers stay opaque calls between compiled pieces.
        self._compiled = torch.compile(self._run_layers, dynamic=True) if compile else None

    @staticmethod
    def _output_projections(factory: LayerFactory, full: ModelConfig, split: bool) -> tuple[LinearSlot, LinearSlot]:
        """o_proj and down_proj slots: whole, or this rank's rows over gathered inputs (exact, the batch-invariant
        default), or Megatron's row-parallel columns with an all-reduce (lmgen.layers.parallel)."""
        tp, h, q, inter = factory.tp, full.hidden_size, full.q_size, full.intermediate_size
        if not split:
            return (LinearSlot(factory, q, [h], full.o_bias), LinearSlot(factory, inter, [h], full.mlp_bias))
        if factory.batch_invariant:
            rows = [tp.split(h)]
            return (LinearSlot(factory, q, [h // tp.size], full.o_bias, rows=rows, combine="gather_both"),
                    LinearSlot(factory, inter, [h // tp.size], full.mlp_bias, rows=rows, combine="gather_both"))
        return (LinearSlot(factory, q // tp.size, [h], full.o_bias, cols=tp.split(q), combine="reduce"),
                LinearSlot(factory, inter // tp.size, [h], full.mlp_bias, cols=tp.split(inter), combine="reduce"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions (tokens,) -> final hidden states (tokens, hidden); writes K/V into kv_caches.
        A pipeline stage takes its input from the previous stage and hands its output on (lmgen.layers.pipeline);
        the first stage returns the last stage's output, the others None."""
        if self.pp is not None:
            return run_pipelined(self.pp, self.stage_forward, [(input_ids, positions, meta)], kv_caches,
                                 self.config.hidden_size, self.dtype, self.device)
        return self.stage_forward(input_ids, positions, kv_caches, meta)

    def forward_micro_batches(self, batches: list, kv_caches) -> torch.Tensor | None:
        """A pipeline step in micro-batches [(input_ids, positions, meta), ...]: each stage starts the next one while
        the following stage works on the previous one.  -> the hidden states of all, in order (first stage)."""
        return run_pipelined(self.pp, self.stage_forward, batches, kv_caches, self.config.hidden_size, self.dtype,
                             self.device)

    def stage_forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata, x=None) -> torch.Tensor:
        """This model's (or stage's) layers: embeds input_ids unless `x` (the previous stage's output) is given.
        -> (tokens, hidden): the final-normed hidden states, or a middle stage's residual stream."""
        if x is None:
            x = self.embed_tokens(input_ids)  # (tokens, hidden)
        self.rotary.reserve(meta.max_position + 1)
        cos, sin = self.rotary(positions)  # (tokens, head_dim) each
        if self._fused is not None and self._attention_backend.supports(meta):
            return self._forward_fused(x, cos, sin, kv_caches, meta)
        return (self._compiled or self._run_layers)(x, cos, sin, kv_caches, meta)

    def _run_layers(self, x, cos, sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The generic path: every block, then the final norm (a pipeline stage before the last: none).
        x (tokens, hidden) -> (tokens, hidden)."""
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.norm(x) if self.norm is not None else x

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
            if next_norm is None:  # the end of a pipeline stage: the residual stream goes on to the next one
                return x + down_proj(act)
            x, normed = ops.add_rms_norm(x, down_proj(act), next_norm, eps)  # next layer's input norm / final norm
        return normed

    def _layer_plan(self) -> tuple[torch.Tensor, list[tuple]]:
        """What `_forward_fused` needs of each layer, looked up once: the linear layers' forward callables
        (bypassing nn.Module.__call__, so no hooks) and the norm weights.  The attribute lookups and module
        dispatch cost ~0.5 ms per token over 30 layers.  Reset by `CausalLM._apply`."""
        plan = []
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            plan.append((direct_call(attn.qkv_proj), attn.backend, direct_call(attn.o_proj), direct_call(mlp.gate_up_proj),
                         direct_call(mlp.down_proj),
                         layer.post_attention_layernorm.weight, None if next_norm is None else next_norm.weight,
                         mlp.intermediate_size))
        return self.layers[0].input_layernorm.weight, plan
