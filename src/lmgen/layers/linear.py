"""Linear layers: dense float weights, or GGUF blocks kept packed (see lmgen.layers.quant).

A weight arrives from a loader as a `WeightSource`: a float tensor (safetensors, F32/F16 GGUF tensors) or a
`PackedTensor` (quantized GGUF blocks, read from the file when needed). `build_linear` turns one or several
sources (fused QKV, fused gate+up) into a module whose forward is `(..., in) -> (..., out)`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PackedTensor:
    """A quantized GGUF matrix: raw blocks (rows, bytes_per_row) for a (out_features, in_features) weight.

    `source` is the blocks themselves or a function that reads them (the GGUF loader reads each tensor from the
    file only when the layer is built (lmgen.layers.weight_slots), so a tensor's bytes are resident only while it is being packed)."""

    qtype: object  # gguf.GGMLQuantizationType
    source: Union[np.ndarray, Callable[[], np.ndarray]]  # (rows, bytes_per_row) uint8, or a reader of them
    shape: tuple[int, int]  # (out_features, in_features)

    @property
    def data(self) -> np.ndarray:
        """The raw blocks (rows, bytes_per_row) uint8 (read now when `source` is a reader)."""
        return self.source() if callable(self.source) else self.source

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        from gguf.quants import dequantize

        values = dequantize(np.ascontiguousarray(self.data), self.qtype)  # (rows, in) float32
        return torch.from_numpy(np.ascontiguousarray(values.reshape(self.shape))).to(dtype)

    def permute_rows(self, order: torch.Tensor) -> "PackedTensor":
        """Reorders output rows (used to undo llama.cpp's Q/K permutation without dequantizing); lazy like `data`."""
        index = order.numpy()
        return PackedTensor(self.qtype, lambda: self.data[index], self.shape)


WeightSource = Union[torch.Tensor, PackedTensor]


def to_float(source: WeightSource, dtype: torch.dtype) -> torch.Tensor:
    """Any weight source as a float tensor of `dtype` (lazy loader handles are read here)."""
    if isinstance(source, PackedTensor):
        return source.dequantize(dtype)
    if hasattr(source, "materialize"):  # lmgen.loader.hf.LazyTensor
        source = source.materialize()
    return source.to(dtype)


def fixed_order_linear(batch_invariant: bool, device: torch.device, dtype: torch.dtype):
    """The compiled fixed-order float32 matmul (csrc/dense_gemm.h: a row's result is the same in any batch, which
    MKL's sgemm does not guarantee) where `batch_invariant` asks for it on a float32 CPU model, else None."""
    if not batch_invariant or device.type != "cpu" or dtype != torch.float32:
        return None
    from lmgen.layers.kernels import load_extension

    ext = load_extension()
    return None if ext is None else ext.dense_linear


def dense_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fixed_order) -> torch.Tensor:
    """x W^T (+ b): through `fixed_order` (see `fixed_order_linear`) for float32 CPU tensors, else F.linear."""
    if fixed_order is not None and x.dtype == torch.float32 and x.device.type == "cpu" \
            and weight.dtype == torch.float32 and weight.is_contiguous():
        return fixed_order(x, weight, bias, 0)
    return F.linear(x, weight, bias)


class DenseLinear(torch.nn.Module):
    """y = x W^T + b with a float weight (out_features, in_features); batch_invariant (on a float32 CPU model):
    computed in a fixed summation order, so a row's result does not depend on the other rows of the batch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_invariant: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)  # (out, in)
        self.bias = None if bias is None else torch.nn.Parameter(bias.contiguous(), requires_grad=False)  # (out,)
        self._fixed_order = fixed_order_linear(batch_invariant, weight.device, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(x, self.weight, self.bias, self._fixed_order)


class StackedLinear(torch.nn.Module):
    """A fused projection (QKV, gate+up) whose shards have different block types (a Q4_K_M file keeps V in Q6_K
    or Q8_0 and Q, K in Q4_K or Q5_0): one packed layer per run of a type, outputs side by side.
    forward: (..., in) -> (..., sum of the parts' out_features)."""

    def __init__(self, parts: Sequence[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def build_linear(
    sources: Sequence[WeightSource],
    biases: Sequence[torch.Tensor | None] | None,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str = "none",
    batch_invariant: bool = False,
) -> torch.nn.Module:
    """One linear layer from one or more weights stacked along the output dimension (fused projections).

    quantization: "none" dequantizes everything to `dtype`; "auto" keeps GGUF blocks packed where the packed
    kernels support their type; "int8"/"int4" also quantize float weights at load (see lmgen.layers.quant).
    batch_invariant: on the CPU, every row's result is independent of the batch (fixed summation orders).
    """
    bias = None
    if biases is not None and any(b is not None for b in biases):
        outs = [s.shape[0] for s in sources]
        bias = torch.cat(
            [to_float(b, dtype) if b is not None else torch.zeros(n, dtype=dtype) for b, n in zip(biases, outs)]
        ).to(device)
    module = build_packed_linear(sources, bias, device, quantization, batch_invariant)
    if module is not None:
        return module
    weight = torch.cat([to_float(s, dtype) for s in sources], dim=0) if len(sources) > 1 else to_float(sources[0], dtype)
    return DenseLinear(weight.to(device), bias, batch_invariant)


def build_packed_linear(
    sources: Sequence[WeightSource], bias: torch.Tensor | None, device: torch.device, mode: str,
    batch_invariant: bool = False,
) -> torch.nn.Module | None:
    """`build_linear`'s packed layer (lmgen.layers.quant.QuantizedLinear), or None where `mode` and the weights'
    types call for a float layer: mode "none", a non-CPU device, a type the kernels lack, float weights in "auto"."""
    if mode == "none" or device.type != "cpu":
        return None
    try:
        from lmgen.layers import quant
    except ImportError:  # pragma: no cover - the packed kernels are optional
        return None
    packed, kernel_types = [s for s in sources if isinstance(s, PackedTensor)], quant.supported_packed_qtypes()
    if len(packed) == len(sources) and all(p.qtype in kernel_types for p in packed):
        parts, start = [], 0
        for qtype, run in itertools.groupby(packed, key=lambda p: p.qtype):  # shards of one block type: one layer
            run = list(run)
            data = np.concatenate([p.data for p in run], axis=0) if len(run) > 1 else run[0].data  # (rows, bytes)
            rows = sum(p.shape[0] for p in run)
            part_bias = None if bias is None else bias[start:start + rows]
            parts.append(quant.packed_linear_from_gguf(qtype, data, (rows, run[0].shape[1]), part_bias, batch_invariant))
            start += rows
        if all(p is not None for p in parts):
            return parts[0] if len(parts) == 1 else StackedLinear(parts)
    if mode in ("int8", "int4"):
        weight = torch.cat([to_float(s, torch.float32) for s in sources], dim=0)
        return quant.quantize_linear(weight, mode, bias=bias, batch_invariant=batch_invariant)
    return None
