"""The feed-forward blocks: SwiGLU (Llama, Qwen), GeGLU (Gemma) and GPT-2's GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatedMLP(torch.nn.Module):
    """down(act(gate(x)) * up(x)) (Shazeer, 2020), gate and up fused in one matmul.  With `fused` (float32 CPU) the
    compiled `fused_op` (csrc/fused_ops.h) computes act(gate) * up in one pass instead of three ops."""

    fused_op = ""

    def __init__(self, gate_up: torch.nn.Module, down: torch.nn.Module, intermediate_size: int, fused=None):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.intermediate_size = gate_up, down, intermediate_size
        self._act_mul = None if fused is None else getattr(fused, self.fused_op)

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (tokens, 2 * intermediate)
        if self._act_mul is not None and gate_up.dim() == 2 and gate_up.device.type == "cpu" \
                and gate_up.dtype == torch.float32 and gate_up.is_contiguous():
            return self.down_proj(self._act_mul(gate_up, self.intermediate_size))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # (tokens, intermediate) each
        return self.down_proj(self.activation(gate) * up)


class SwiGLU(GatedMLP):
    """SiLU-gated (Llama, Qwen)."""

    fused_op = "silu_mul"

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)


class GeGLU(GatedMLP):
    """GELU-gated, GELU's tanh form (Gemma)."""

    fused_op = "gelu_tanh_mul"

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")


class GeluMLP(torch.nn.Module):
    """down(gelu_tanh(up(x))): GPT-2's MLP (c_fc, c_proj)."""

    def __init__(self, up: torch.nn.Module, down: torch.nn.Module):
        super().__init__()
        self.up_proj, self.down_proj = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
