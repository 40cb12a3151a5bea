"""The SwiGLU feed-forward block of the Llama family."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SwiGLU(torch.nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020), gate and up fused in one matmul."""

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
