"""GPT-2: learned absolute position embeddings, pre-LayerNorm blocks of multi-head attention and a GELU MLP.

token embedding + position embedding (the positional encoding, its own step: `encode_positions`)
-> [LayerNorm -> fused QKV (c_attn) -> attention -> c_proj (+residual) -> LayerNorm -> c_fc -> GELU -> c_proj
(+residual)] x n_layers -> LayerNorm -> lm_head (tied) -> logits

transformers' GPT-2 keeps its projections as Conv1D, weights stored (in, out): they are transposed as they
arrive.  There is no RoPE: the attention backends get an identity rotation (cos 1, sin 0), which leaves q and
k exactly as they are, so GPT-2 uses the same attention code (and compiled op) as the other families.
"""

from __future__ import annotations

import torch

from lmgen.config import ModelConfig
from lmgen.layers.attention import Attention, AttentionMetadata
from lmgen.layers.mlp import GeluMLP
from lmgen.layers.norm import LayerNorm
from lmgen.layers.weight_slots import EmbeddingSlot, LayerFactory, LinearSlot
from lmgen.models.base import CausalLM, attention_backend, fused_float_ops

# transformers' GPT-2 module names -> this model's; the Conv1D ones arrive transposed (in, out)
HF_NAMES = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj",
            "mlp.c_proj": "mlp.down_proj"}


class Transposed:
    """A Conv1D weight (in, out) seen as a linear weight (out, in), read when the layer is built."""

    def __init__(self, source):
        self.source, self.shape = source, tuple(reversed(tuple(source.shape)))

    def materialize(self) -> torch.Tensor:
        src = self.source.materialize() if hasattr(self.source, "materialize") else self.source
        return src.t().contiguous()


class GPT2Block(torch.nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, attn: Attention, mlp: GeluMLP, ln_1: LayerNorm, ln_2: LayerNorm):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = ln_1, attn, ln_2, mlp

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x = x + self.attn(self.ln_1(x), cos, sin, k_cache, v_cache, meta)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    checkpoint_prefix = "transformer."
    tied_embedding = "wte"

    def __init__(self, config: ModelConfig, factory: LayerFactory, compile: bool = False):
        super().__init__(config, factory.dtype, factory.device)
        fused = fused_float_ops(self.device, self.dtype, compile, factory.batch_invariant)
        backend = attention_backend(config, fused, factory.batch_invariant)
        h, inter = config.hidden_size, config.intermediate_size

        def ln() -> LayerNorm:
            return LayerNorm(h, config.rms_norm_eps, self.dtype, self.device)

        self.wte = EmbeddingSlot(factory, config.vocab_size, h)
        self.wpe = EmbeddingSlot(factory, config.max_position_embeddings, h)
        self.h = torch.nn.ModuleList()
        for _ in range(config.num_layers):
            qkv = LinearSlot(factory, h, [config.q_size + 2 * config.kv_size], True)
            attn = Attention(config, qkv, LinearSlot(factory, config.q_size, [h], True), backend)
            mlp = GeluMLP(LinearSlot(factory, h, [inter], True), LinearSlot(factory, inter, [h], True))
            self.h.append(GPT2Block(attn, mlp, ln(), ln()))
        self.ln_f = ln()
        self.lm_head = LinearSlot(factory, h, [config.vocab_size], False)
        self._compiled = torch.compile(self._run_layers, dynamic=True) if compile else None

    def load_weights(self, weights) -> None:
        """transformers' names and Conv1D layout -> this model's (GGUF tensors arrive under this model's names)."""
        def renamed():
            for name, source in weights:
                for old, new in HF_NAMES.items():
                    if f".{old}." in name:
                        name = name.replace(f".{old}.", f".{new}.")
                        if name.endswith(".weight"):
                            source = Transposed(source)
                        break
                yield name, source
        super().load_weights(renamed())

    def encode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The positional encoding: positions (tokens,) -> their learned vectors (tokens, hidden)."""
        return self.wpe(positions)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        x = self.wte(input_ids) + self.encode_positions(positions)  # (tokens, hidden)
        identity = torch.ones(len(positions), self.config.head_dim, dtype=self.dtype, device=self.device)
        return (self._compiled or self._run_layers)(x, identity, torch.zeros_like(identity), kv_caches, meta)

    def _run_layers(self, x, cos, sin, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        for layer, (k_cache, v_cache) in zip(self.h, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, meta)
        return self.ln_f(x)
