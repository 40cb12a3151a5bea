"""The feed-forward blocks: SwiGLU (Llama, Qwen), GeGLU (Gemma) and GPT-2's GELU MLP."""

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


class GeGLU(torch.nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)) (Shazeer, 2020; Gemma), gate and up fused in one matmul."""

    def __init__(self, gate_up: torch.nn.Module, down: torch.nn.Module, intermediate_size: int):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.intermediate_size = gate_up, down, intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # (tokens, intermediate) each
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GeluMLP(torch.nn.Module):
    """down(gelu_tanh(up(x))): GPT-2's MLP (c_fc, c_proj)."""

    def __init__(self, up: torch.nn.Module, down: torch.nn.Module):
        super().__init__()
        self.up_proj, self.down_proj = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
