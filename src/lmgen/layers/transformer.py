"""The decoder-only transformer of the LLaMA family (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama).

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
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from lmgen.config import ModelConfig
from lmgen.errors import ModelLoadError
from lmgen.layers.attention import Attention, AttentionMetadata, FusedCPUAttentionBackend, TorchAttentionBackend
from lmgen.layers.embedding import DenseEmbedding, PackedEmbedding
from lmgen.layers.linear import WeightSource, build_linear, build_packed_linear, to_float
from lmgen.layers.kernels import fused_ops
from lmgen.layers.rope import RotaryEmbedding

logger = logging.getLogger("lmgen.layers")


class RMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich, 2019)."""

    def __init__(self, weight: torch.Tensor, eps: float, fused=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)  # (hidden,)
        self.eps = eps
        # the compiled rms_norm (csrc/fused_ops.h) for float32 CPU inputs, or None: one pass instead of 7 ops
        self._rms_norm = None if fused is None else fused.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rms_norm is not None and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
                and x.is_contiguous() and self.weight.dtype == torch.float32:
            return self._rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MLP(torch.nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer, 2020), gate and up fused in one matmul."""

    def __init__(self, gate_up: torch.nn.Module, down: torch.nn.Module, intermediate_size: int, fused=None):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.intermediate_size = gate_up, down, intermediate_size
        # the compiled silu_mul (csrc/fused_ops.h) for float32 CPU inputs, or None: one pass instead of three ops
        self._silu_mul = None if fused is None else fused.silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (tokens, 2 * intermediate)
        if self._silu_mul is not None and gate_up.dim() == 2 and gate_up.device.type == "cpu" \
                and gate_up.dtype == torch.float32 and gate_up.is_contiguous():
            return self.down_proj(self._silu_mul(gate_up, self.intermediate_size))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(torch.nn.Module):
    def __init__(self, attn: Attention, mlp: MLP, attn_norm: RMSNorm, mlp_norm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = attn, mlp
        self.input_layernorm, self.post_attention_layernorm = attn_norm, mlp_norm

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(torch.nn.Module):
    """The whole model; `forward` returns hidden states, `compute_logits` the float32 logits of chosen rows."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, WeightSource],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantization: str = "none",
        progress: Callable[[], None] | None = None,
        compile: bool = False,
        batch_invariant: bool = True,
    ):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.batch_invariant = bool(batch_invariant)
        tick = progress or (lambda: None)

        def take(name: str) -> WeightSource:
            if name not in weights:
                raise ModelLoadError(f"checkpoint is missing the tensor {name!r}")
            return weights[name]

        def norm(name: str) -> RMSNorm:
            w = to_float(take(name), dtype).to(self.device)
            _check_shape(name, w, (config.hidden_size,))
            return RMSNorm(w, config.rms_norm_eps, self._fused)

        def linear(names: list[str], in_features: int, outs: list[int], bias: bool) -> torch.nn.Module:
            sources = [take(n + ".weight") for n in names]
            for n, s, out in zip(names, sources, outs):
                _check_shape(n + ".weight", s, (out, in_features))
            biases = [take(n + ".bias") for n in names] if bias else None
            return build_linear(sources, biases, dtype, self.device, quantization, self.batch_invariant)

        embed_source = take("model.embed_tokens.weight")
        _check_shape("model.embed_tokens.weight", embed_source, (config.vocab_size, config.hidden_size))
        packed_table = build_packed_linear([embed_source], None, self.device, quantization, self.batch_invariant)
        if packed_table is not None:  # GGUF blocks (or int8/int4): stays packed, rows dequantized on lookup
            self.embed_tokens: torch.nn.Module = PackedEmbedding(packed_table, dtype)
        else:
            self.embed_tokens = DenseEmbedding(to_float(embed_source, dtype).to(self.device),  # (vocab, hidden)
                                               self.batch_invariant)
        # The compiled fused float32 ops (csrc/fused_ops.h) on CPU: the whole decode step, and RMSNorm / SwiGLU of
        # every step; None: plain PyTorch only (other devices / dtypes, or no compiler).  Decode of a small model
        # is bound by per-op overhead.
        # compile=True hands the layers to torch.compile instead, which cannot trace into these ops.
        self._fused = fused_ops() if self.device.type == "cpu" and dtype == torch.float32 and not compile else None
        if self.batch_invariant and self._fused is None:
            logger.warning("batch invariance needs float32 on the CPU with the compiled kernels and no compile=True; "
                           "here (%s, %s) a request's results may depend on the other requests in its step",
                           self.device, dtype)
        self.rotary = RotaryEmbedding(config, self.device, dtype)
        # RoPE + K/V write + attention: chosen once; one (stateless) backend object serves every layer
        self._attention_backend = (TorchAttentionBackend(config) if self._fused is None
                                   else FusedCPUAttentionBackend(config, self._fused, all_steps=self.batch_invariant))
        self.layers = torch.nn.ModuleList()
        h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            qkv = linear([p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"], h, [q, kv, kv], config.attention_bias)
            o = linear([p + "self_attn.o_proj"], q, [h], config.o_bias)
            gate_up = linear([p + "mlp.gate_proj", p + "mlp.up_proj"], h, [inter, inter], config.mlp_bias)
            down = linear([p + "mlp.down_proj"], inter, [h], config.mlp_bias)
            self.layers.append(
                Block(Attention(config, qkv, o, self._attention_backend), MLP(gate_up, down, inter, self._fused), norm(p + "input_layernorm.weight"), norm(p + "post_attention_layernorm.weight"))
            )
            tick()
        self.norm = norm("model.norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head: torch.nn.Module = self.embed_tokens.as_linear()  # one (vocab, hidden) matrix for both
        else:
            _check_shape("lm_head.weight", take("lm_head.weight"), (config.vocab_size, h))
            self.lm_head = build_linear([weights["lm_head.weight"]], None, dtype, self.device, quantization,
                                        self.batch_invariant)
        self._plan: tuple | None = None  # per-layer callables of the fused decode loop, see `_layer_plan`
        # torch.compile of the layer stack (Inductor: elementwise ops fused into generated kernels, the per-op
        # dispatch gone); dynamic=True because every step has its own token count and context length.  Packed
        # quantized layers stay opaque calls between compiled pieces.
        self._compiled = torch.compile(self._run_layers, dynamic=True) if compile else None

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

    def weight_bytes(self) -> int:
        """Bytes of the weights held (parameters and buffers, a shared matrix counted once): packed blocks stay at
        the GGUF file's size, a float32 model at 4 bytes per parameter."""
        storages = {}
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):  # its tables are a cache of the positions in use, not weights
                continue
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, hidden) -> logits (rows, vocab) float32."""
        return self.lm_head(hidden).float()


def _check_shape(name: str, source: WeightSource, expected: tuple[int, ...]) -> None:
    shape = tuple(source.shape)
    if shape != expected:
        raise ModelLoadError(f"tensor {name!r} has shape {shape}, expected {expected} from the model config")
