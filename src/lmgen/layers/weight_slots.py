"""Where a checkpoint's tensors land while a model loads: one slot per linear layer or embedding table.

A model is built from its config before any weight is read; its linear layers start as `LinearSlot`s that know
their shape and which checkpoint tensors feed them (fused QKV and gate/up take several, one per shard). The loader's
named weights arrive one at a time through `load_weight`; `materialize` then builds the real layer, dense or packed
as the `LayerFactory` (the quantization choice) says, and the model puts it in the slot's place.  The slots hold only
lazy handles (lmgen.loader: GGUF block readers, safetensors views), so a tensor's bytes are read when its layer is
built, one layer at a time, as before this split (nano-vllm / vLLM `weight_loader` with `packed_modules_mapping`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lmgen.errors import ModelLoadError, ParallelConfigError
from lmgen.layers.embedding import DenseEmbedding, PackedEmbedding
from lmgen.layers.linear import PackedTensor, WeightSource, build_linear, build_packed_linear, to_float
from lmgen.layers.pipeline import PipelineStage
from lmgen.layers.parallel import (GatheredColumns, GatheredLinear, RowParallel, TensorParallel, VocabParallelEmbedding, packed_block,
                                   slice_columns, slice_rows)


@dataclass(frozen=True)
class LayerFactory:
    """The quantization choice and placement every layer of a model is built with."""

    dtype: torch.dtype
    device: torch.device
    quantization: str = "none"  # "none" | "auto" | "int8" | "int4", see lmgen.layers.linear.build_linear
    batch_invariant: bool = True
    tp: TensorParallel | None = None  # this rank's slice of every layer (lmgen.layers.parallel); None: whole
    pp: PipelineStage | None = None  # this rank's stage of the layers (lmgen.layers.pipeline); None: all of them

    def linear(self, sources: Sequence[WeightSource], biases: Sequence[WeightSource | None] | None) -> torch.nn.Module:
        return build_linear(sources, biases, self.dtype, self.device, self.quantization, self.batch_invariant)

    def embedding(self, source: WeightSource) -> torch.nn.Module:
        """A (vocab, hidden) table: GGUF blocks (or int8/int4) stay packed, rows dequantized on lookup."""
        packed = build_packed_linear([source], None, self.device, self.quantization, self.batch_invariant)
        if packed is not None:
            return PackedEmbedding(packed, self.dtype)
        return DenseEmbedding(to_float(source, self.dtype).to(self.device), self.batch_invariant)


class LinearSlot(torch.nn.Module):
    """A linear layer (in_features -> sum of `out_features`) waiting for its shards' weights (and biases).

    Under tensor parallelism (factory.tp) the sizes are this rank's, and the slot cuts its part out of each
    checkpoint tensor: `rows` (per shard, [start, end) of the whole tensor's rows: column-parallel) or `cols`
    (row-parallel); `combine` "reduce" all-reduces the output (row-parallel), "gather" gathers the output's
    columns, "gather_both" the input's and the output's (lmgen.layers.parallel.GatheredLinear)."""

    def __init__(self, factory: LayerFactory, in_features: int, out_features: Sequence[int], bias: bool,
                 shard_names: Sequence[str] = ("",), rows: Sequence[tuple[int, int]] | None = None,
                 cols: tuple[int, int] | None = None, combine: str | None = None):
        super().__init__()
        self.factory, self.in_features, self.out_features, self.bias = factory, in_features, tuple(out_features), bias
        self.shard_names = tuple(shard_names)
        self.weights: list[WeightSource | None] = [None] * len(self.out_features)
        self.biases: list[WeightSource | None] = [None] * len(self.out_features)
        parallel = factory.tp is not None and factory.tp.size > 1
        self.rows, self.cols = (rows, cols) if parallel else (None, None)
        self.combine = combine if parallel else None

    def load_weight(self, name: str, kind: str, source: WeightSource, shard: int = 0) -> None:
        """Takes checkpoint tensor `name` as this layer's `kind` ("weight" | "bias") of shard `shard`."""
        if self.rows is not None:
            source = slice_rows(source, *self.rows[shard])
        elif self.cols is not None and kind == "weight":
            if isinstance(source, PackedTensor) and any(c % packed_block(source)[0] for c in self.cols):
                raise ParallelConfigError(
                    f"tensor {name!r} ({source.qtype.name}, blocks of {packed_block(source)[0]}) cannot be split at "
                    f"column {self.cols[0]}-{self.cols[1]}: choose a tensor-parallel size that divides its blocks",
                    param="tensor_parallel_size", value=self.factory.tp.size)
            source = slice_columns(source, *self.cols)
        elif self.cols is not None and self.factory.tp.rank > 0:
            source = torch.zeros(self.out_features[shard])  # a row-parallel bias is added once, by rank 0
        expected = (self.out_features[shard], self.in_features) if kind == "weight" else (self.out_features[shard],)
        if tuple(source.shape) != expected:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(source.shape)}, expected {expected} from the "
                                 f"model config")
        if kind == "bias" and not self.bias:
            raise ModelLoadError(f"tensor {name!r}: the model config says this layer has no bias")
        (self.weights if kind == "weight" else self.biases)[shard] = source

    def missing(self) -> list[tuple[str, str]]:
        """(shard name, kind) of the tensors not loaded yet, e.g. [("k_proj", "weight")]; shard "" = unfused."""
        loaded = {"weight": self.weights, "bias": self.biases}
        kinds = ("weight", "bias") if self.bias else ("weight",)
        return [(s, k) for k in kinds for s, w in zip(self.shard_names, loaded[k]) if w is None]

    def materialize(self) -> torch.nn.Module:
        """The real layer over the loaded shards (stacked along the output dimension)."""
        layer = self.factory.linear(self.weights, self.biases if self.bias else None)
        if self.combine == "reduce":
            return RowParallel(layer, self.factory.tp)
        if self.combine == "gather_both":
            return GatheredLinear(layer, self.factory.tp)
        return GatheredColumns(layer, self.factory.tp) if self.combine == "gather" else layer


class EmbeddingSlot(torch.nn.Module):
    """A (vocab, hidden) token embedding table waiting for its weight; under tensor parallelism `rows` is this
    rank's [start, end) of the vocabulary (vocab_size is then the rank's share)."""

    def __init__(self, factory: LayerFactory, vocab_size: int, hidden_size: int, rows: tuple[int, int] | None = None):
        super().__init__()
        self.factory, self.shape, self.source = factory, (vocab_size, hidden_size), None
        self.rows = rows if factory.tp is not None and factory.tp.size > 1 else None

    def load_weight(self, name: str, kind: str, source: WeightSource, shard: int = 0) -> None:
        if self.rows is not None:
            source = slice_rows(source, *self.rows)
        if kind != "weight" or tuple(source.shape) != self.shape:
            raise ModelLoadError(f"tensor {name!r} has shape {tuple(source.shape)}, expected {self.shape} from the "
                                 f"model config")
        self.source = source

    def missing(self) -> list[tuple[str, str]]:
        return [("", "weight")] if self.source is None else []

    def materialize(self) -> torch.nn.Module:
        table = self.factory.embedding(self.source)
        return table if self.rows is None else VocabParallelEmbedding(table, *self.rows, self.factory.tp)
