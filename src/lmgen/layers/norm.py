"""RMSNorm (Llama, Qwen, Gemma) and LayerNorm (GPT-2); their weights arrive through `load_weight`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmgen.errors import ModelLoadError
from lmgen.layers.linear import WeightSource, to_float


class RMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich, 2019).  offset: added to the
    checkpoint's weight at load (Gemma's transformers checkpoints store w for a norm that multiplies by 1 + w)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device, fused=None,
                 offset: float = 0.0):
        super().__init__()
        self.hidden_size, self.eps, self.dtype, self.device, self.offset = hidden_size, eps, dtype, device, offset
        self.weight: torch.nn.Parameter | None = None  # (hidden,), set by materialize
        self.source: WeightSource | None = None
        # the compiled ops (csrc/fused_ops.h) for float32 CPU inputs, or None: rms_norm is one pass instead of 7 ops
        self.fused = fused

    def load_weight(self, name: str, kind: str, source: WeightSource, shard: int = 0) -> None:
        """Takes the checkpoint tensor `name` ((hidden,) float) as this norm's weight, read at `materialize`."""
        if kind != "weight" or tuple(source.shape) != (self.hidden_size,):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(source.shape)}, expected ({self.hidden_size},) "
                                 f"from the model config")
        self.source = source

    def missing(self) -> list[tuple[str, str]]:
        """[("", "weight")] until the weight is loaded (see lmgen.layers.weight_slots)."""
        return [("", "weight")] if self.source is None and self.weight is None else []

    def materialize(self) -> "RMSNorm":
        """Reads the weight; the norm itself stays in place."""
        if self.source is not None:
            weight = to_float(self.source, torch.float32)
            if self.offset:
                weight = self.offset + weight  # as transformers' Gemma3RMSNorm: (1.0 + w) in float32
            self.weight = torch.nn.Parameter(weight.to(self.dtype).to(self.device), requires_grad=False)
            self.source = None
        return self

    def takes_fused(self, x: torch.Tensor) -> bool:
        """Whether the compiled ops apply to x: 2-D, contiguous float32 on the CPU, with a float32 weight."""
        return self.fused is not None and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
            and x.is_contiguous() and self.weight.dtype == torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_fused(x):
            return self.fused.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LayerNorm(torch.nn.Module):
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias (Ba et al., 2016), GPT-2's normalization."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.hidden_size, self.eps, self.dtype, self.device = hidden_size, eps, dtype, device
        self.weight: torch.nn.Parameter | None = None  # (hidden,) each, set by materialize
        self.bias: torch.nn.Parameter | None = None
        self.sources: dict[str, WeightSource] = {}

    def load_weight(self, name: str, kind: str, source: WeightSource, shard: int = 0) -> None:
        """Takes the checkpoint tensor `name` ((hidden,) float) as this norm's weight or bias."""
        if kind not in ("weight", "bias") or tuple(source.shape) != (self.hidden_size,):
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(source.shape)}, expected ({self.hidden_size},) "
                                 f"from the model config")
        self.sources[kind] = source

    def missing(self) -> list[tuple[str, str]]:
        return [("", k) for k in ("weight", "bias") if k not in self.sources and getattr(self, k) is None]

    def materialize(self) -> "LayerNorm":
        for kind, source in self.sources.items():
            setattr(self, kind, torch.nn.Parameter(to_float(source, self.dtype).to(self.device), requires_grad=False))
        self.sources = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)  # row by row: batch invariant
