"""What every model family shares: taking named checkpoint weights through its layers' `load_weight`, building
the real layers from their slots, and the output layer.

A family subclasses `CausalLM`, builds its modules from the config (linear layers and embeddings as slots of
lmgen.layers.weight_slots) and names its fused projections in `packed_modules` (checkpoint name -> (module, shard)).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch

from lmgen.config import ModelConfig
from lmgen.errors import ModelLoadError
from lmgen.layers.linear import WeightSource
from lmgen.layers.rope import RotaryEmbedding

logger = logging.getLogger("lmgen.model")


class CausalLM(torch.nn.Module):
    """A decoder-only model: `forward` gives hidden states, `compute_logits` the float32 logits of chosen rows."""

    # checkpoint module name -> (this model's module name, shard index): fused QKV / gate-up (vLLM's mapping)
    packed_modules: dict[str, tuple[str, int]] = {}
    # prefix of the checkpoint's names for the decoder stack (transformers' `model.`), dropped when mapping names
    checkpoint_prefix = "model."
    # index of this model's first decoder layer in the checkpoint (a pipeline stage holds layers [offset, ...))
    layer_offset = 0
    # the embedding whose matrix doubles as the output layer when the model ties them (or has no lm_head)
    tied_embedding = "embed_tokens"
    # a family's fused step: its per-layer callables and weights, looked up on first use (`_layer_plan`)
    _plan = None

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.config, self.dtype, self.device = config, dtype, torch.device(device)

    # ---- loading ----------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, WeightSource]]) -> None:
        """Hands each named checkpoint tensor to the layer it belongs to; names no layer takes are skipped."""
        for name, source in weights:
            target = self._weight_target(name)
            if target is None:
                logger.debug("checkpoint tensor %s is not used by %s", name, type(self).__name__)
                continue
            module, kind, shard = target
            module.load_weight(name, kind, source, shard)

    def _weight_target(self, name: str) -> tuple[torch.nn.Module, str, int] | None:
        """(module, "weight" | "bias", shard) taking checkpoint tensor `name`, or None."""
        path = name[len(self.checkpoint_prefix):] if name.startswith(self.checkpoint_prefix) else name
        if path.startswith("layers."):  # the checkpoint's layer index -> this model's (a pipeline stage's)
            index, _, rest = path[len("layers."):].partition(".")
            if not index.isdigit() or not 0 <= int(index) - self.layer_offset < len(getattr(self, "layers", ())):
                return None
            path = f"layers.{int(index) - self.layer_offset}.{rest}"
        path, _, kind = path.rpartition(".")
        parent, _, leaf = path.rpartition(".")
        shard = 0
        if leaf in self.packed_modules:
            leaf, shard = self.packed_modules[leaf]
        try:
            module = self.get_submodule(f"{parent}.{leaf}" if parent else leaf)
        except AttributeError:
            return None
        return (module, kind, shard) if hasattr(module, "load_weight") else None

    def finalize(self, progress: Callable[[], None] | None = None) -> None:
        """Builds every slot's real layer in its place (a layer's tensors are read now), once per decoder layer
        calling `progress`; a ModelLoadError names the first tensor the checkpoint lacked.  The output layer
        shares the embedding's matrix when the config ties them or the checkpoint has no lm_head."""
        head = getattr(self, "lm_head", None)  # None on a pipeline stage without the output layer
        tied = head is not None and (self.config.tie_word_embeddings or bool(head.missing()))
        if tied:
            self.lm_head = torch.nn.Identity()  # replaced below, once the embedding exists
        self._materialize_all(progress)
        if tied:
            self.lm_head = getattr(self, self.tied_embedding).as_linear()  # one (vocab, hidden) matrix for both

    def _materialize_all(self, progress: Callable[[], None] | None) -> None:
        tick = progress or (lambda: None)
        for name, child in list(self.named_children()):
            if isinstance(child, torch.nn.ModuleList):
                for i, layer in enumerate(child):
                    self._materialize(layer, f"{name}.{i + self.layer_offset}")
                    tick()
            else:
                self._materialize(child, name, parent=self, attr=name)

    def _materialize(self, module: torch.nn.Module, path: str, parent=None, attr: str = "") -> None:
        if hasattr(module, "missing"):
            lacking = module.missing()
            if lacking:
                shard, kind = lacking[0]
                base = path.rpartition(".")[0] + "." + shard if shard else path
                prefix = "" if base.startswith("lm_head") else self.checkpoint_prefix
                raise ModelLoadError(f"checkpoint is missing the tensor {prefix + base.lstrip('.') + '.' + kind!r}")
            if hasattr(module, "materialize"):
                setattr(parent, attr, module.materialize())
            return
        for name, child in list(module.named_children()):
            self._materialize(child, f"{path}.{name}", parent=module, attr=name)

    def _apply(self, fn, *args, **kwargs):
        """.to() and friends may replace tensors: a fused step's plan of them is looked up again on next use."""
        out = super()._apply(fn, *args, **kwargs)
        self._plan = None
        return out

    # ---- running ----------------------------------------------------------------------------------
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (rows, hidden) -> logits (rows, vocab) float32."""
        return self.lm_head(hidden).float()

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


def direct_call(module: torch.nn.Module) -> Callable:
    """A layer's forward without nn.Module.__call__ (no hooks, no dispatch): a packed QuantizedLinear's C++
    PackedLinear itself, else the bound `forward`.  The fused step loops call these ~100 times per token."""
    impl = getattr(module, "_impl", None)
    return impl if impl is not None else module.forward


def fused_float_ops(device: torch.device, dtype: torch.dtype, compile: bool, batch_invariant: bool):
    """The compiled fused float32 ops (csrc/fused_ops.h) on a float32 CPU model without torch.compile, else None
    (with a warning when batch invariance was asked for but cannot hold)."""
    from lmgen.layers.kernels import fused_ops

    fused = fused_ops() if torch.device(device).type == "cpu" and dtype == torch.float32 and not compile else None
    if batch_invariant and fused is None:
        logger.warning("batch invariance needs float32 on the CPU with the compiled kernels and no compile=True; "
                       "here (%s, %s) a request's results may depend on the other requests in its step", device, dtype)
    return fused


def attention_backend(config: ModelConfig, fused, batch_invariant: bool):
    """RoPE + K/V write + attention, chosen once: the compiled CPU op where `fused`, else PyTorch."""
    from lmgen.layers.attention import FusedCPUAttentionBackend, TorchAttentionBackend

    return TorchAttentionBackend(config) if fused is None else FusedCPUAttentionBackend(config, fused, all_steps=batch_invariant)
