"""Tensor parallelism in the Megatron layout (Shoeybi et al., 2019), as vLLM's `layers/linear.py` lays it out.

Each of `size` ranks holds a slice of every weight: QKV and gate/up are split by output rows (column-parallel,
each rank computes its heads / its part of the intermediate activations), the output and down projections by
input columns (row-parallel: each rank's partial sums are added by an all-reduce, two per layer), the embedding
and the output layer by vocabulary rows (the embedding's lookups are all-reduced, the logits gathered).  Where
there are fewer KV heads than ranks, each KV head is replicated on the ranks whose query heads use it.

Adding partial sums changes the rounding of every output and projection (and, through int8 activation
quantization, the packed model's tokens), so the default (batch_invariant) splits the output and down
projections by output rows instead: their inputs are gathered, each rank sums its rows over the whole input in
the kernel's order, and the outputs are gathered (`GatheredLinear`, four all-gathers per layer instead of two
all-reduces): the tokens and logprobs are bit-identical to one process.  `TensorParallel` says which rows /
columns a rank takes; the wrappers below add the collectives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from lmgen.layers.linear import PackedTensor, WeightSource


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group: rank in [0, size), and the torch.distributed group."""

    rank: int
    size: int
    group: object = None  # a torch.distributed ProcessGroup; None: the default group

    def split(self, n: int) -> tuple[int, int]:
        """This rank's [start, end) of n rows split evenly."""
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_rows(self, num_kv_heads: int, head_dim: int) -> tuple[int, int]:
        """This rank's K (or V) rows: its share of the KV heads, or the one head its query heads use."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads * head_dim)
        head = self.rank * num_kv_heads // self.size
        return head * head_dim, (head + 1) * head_dim

    def local_config(self, config):
        """The config as one rank sees it: its query / KV heads and its part of the MLP; vocabulary and hidden
        size stay whole (the engine validates token ids and shapes logits with them)."""
        return dataclasses.replace(config, num_heads=config.num_heads // self.size,
                                   num_kv_heads=max(1, config.num_kv_heads // self.size),
                                   intermediate_size=config.intermediate_size // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n) on every rank -> (rows, size * n), rank order."""
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


class RowParallel(torch.nn.Module):
    """A row-parallel layer: this rank's partial product, summed over the ranks (the layer's bias is rank 0's)."""

    def __init__(self, inner: torch.nn.Module, tp: TensorParallel):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.inner(x).contiguous())


class GatheredLinear(torch.nn.Module):
    """The exact layout's output / down projection: the input's columns gathered from every rank, this rank's
    output rows computed over the whole input, the output's columns gathered.  Each output value is summed by
    one rank in the kernel's own order, so the result is bit-identical to one process (batch invariance)."""

    def __init__(self, inner: torch.nn.Module, tp: TensorParallel):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_columns(self.inner(self.tp.gather_columns(x)))


class GatheredColumns(torch.nn.Module):
    """A vocabulary-parallel output layer: this rank's logits columns, gathered into the whole row."""

    def __init__(self, inner: torch.nn.Module, tp: TensorParallel):
        super().__init__()
        self.inner, self.tp = inner, tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_columns(self.inner(x))


class VocabParallelEmbedding(torch.nn.Module):
    """Rows [start, end) of the embedding table; a token outside them contributes zeros, the all-reduce adds the
    rank that holds it."""

    def __init__(self, inner: torch.nn.Module, start: int, end: int, tp: TensorParallel):
        super().__init__()
        self.inner, self.start, self.end, self.tp = inner, start, end, tp

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.start) | (input_ids >= self.end)  # (tokens,)
        local = torch.where(outside, 0, input_ids - self.start)
        out = self.inner(local).masked_fill(outside[:, None], 0.0)  # (tokens, hidden)
        return self.tp.all_reduce(out)

    def as_linear(self) -> torch.nn.Module:
        return GatheredColumns(self.inner.as_linear(), self.tp)


class SlicedSource:
    """Rows or columns [start, end) of a float weight source, read when the layer is built."""

    def __init__(self, source: WeightSource, dim: int, start: int, end: int):
        self.source, self.dim, self.start, self.end = source, dim, start, end
        shape = list(source.shape)
        shape[dim] = end - start
        self.shape = tuple(shape)

    def materialize(self) -> torch.Tensor:
        t = self.source.materialize() if hasattr(self.source, "materialize") else self.source
        # a copy: a view would keep the whole tensor alive
        return t.narrow(self.dim, self.start, self.end - self.start).clone(memory_format=torch.contiguous_format)


def slice_rows(source: WeightSource, start: int, end: int) -> WeightSource:
    """Output rows [start, end) of a weight (or bias), lazily; packed blocks stay packed."""
    if isinstance(source, PackedTensor):
        return PackedTensor(source.qtype, lambda: source.data[start:end], (end - start, source.shape[1]))
    return SlicedSource(source, 0, start, end)


def slice_columns(source: WeightSource, start: int, end: int) -> WeightSource:
    """Input columns [start, end) of a weight, lazily; packed blocks are cut at block boundaries (the caller
    checks `columns_divisible` first)."""
    if isinstance(source, PackedTensor):
        block, block_bytes = packed_block(source)
        b0, b1 = start // block * block_bytes, end // block * block_bytes
        return PackedTensor(source.qtype, lambda: np.ascontiguousarray(source.data[:, b0:b1]),
                            (source.shape[0], end - start))
    return SlicedSource(source, 1, start, end)


def packed_block(source: PackedTensor) -> tuple[int, int]:
    """(values per block, bytes per block) of a packed tensor's type."""
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[source.qtype]
