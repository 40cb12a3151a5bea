"""RMSNorm, the normalization of the Llama family; its weight arrives through `load_weight`."""

from __future__ import annotations

import torch

from lmgen.errors import ModelLoadError
from lmgen.layers.linear import WeightSource, to_float


class RMSNorm(torch.nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich, 2019)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device, fused=None):
        super().__init__()
        self.hidden_size, self.eps, self.dtype, self.device = hidden_size, eps, dtype, device
        self.weight: torch.nn.Parameter | None = None  # (hidden,), set by materialize
        self.source: WeightSource | None = None
        # the compiled rms_norm (csrc/fused_ops.h) for float32 CPU inputs, or None: one pass instead of 7 ops
        self._rms_norm = None if fused is None else fused.rms_norm

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
            self.weight = torch.nn.Parameter(to_float(self.source, self.dtype).to(self.device), requires_grad=False)
            self.source = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rms_norm is not None and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
                and x.is_contiguous() and self.weight.dtype == torch.float32:
            return self._rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
