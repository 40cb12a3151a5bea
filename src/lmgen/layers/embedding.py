"""The token embedding: token ids -> vectors, and the output layer that may share its matrix.

A dense table is a float (vocab, hidden) tensor.  A packed table keeps a GGUF-quantized matrix packed and
dequantizes only the rows a step looks up, which is what llama.cpp does with `token_embd`: SmolLM2's Q8_0
table is 29 MiB packed against 108 MiB as float32.  When the model ties its output layer to the embedding
(`tie_word_embeddings`, or a GGUF without `output.weight`) both roles use the same matrix, packed or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmgen.layers.linear import dense_forward, fixed_order_linear


class DenseEmbedding(torch.nn.Module):
    """A float (vocab, hidden) table; `as_linear` is the tied output layer over the same tensor (batch_invariant:
    in a fixed summation order on a float32 CPU model, see lmgen.layers.linear.DenseLinear)."""

    def __init__(self, weight: torch.Tensor, batch_invariant: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)  # (vocab, hidden)
        self.fixed_order = fixed_order_linear(batch_invariant, weight.device, weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (tokens, hidden)

    def as_linear(self) -> torch.nn.Module:
        return _TiedLinear(self)


class PackedEmbedding(torch.nn.Module):
    """Rows of a packed quantized (vocab, hidden) matrix (lmgen.layers.quant.QuantizedLinear), dequantized to
    float32 on lookup and cast to the model's dtype; `as_linear` is that same packed matrix as the output layer."""

    def __init__(self, table: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids).to(self.dtype)  # (tokens, hidden)

    def as_linear(self) -> torch.nn.Module:
        return self.table

    @property
    def weight(self) -> torch.Tensor:
        """The table dequantized (vocab, hidden): a new tensor, for tests and inspection."""
        return self.table.dequantized_weight().to(self.dtype)


class _TiedLinear(torch.nn.Module):
    """y = x E^T over a DenseEmbedding's table (no second copy of the (vocab, hidden) matrix)."""

    def __init__(self, embedding: DenseEmbedding):
        super().__init__()
        self._embedding = [embedding]  # a list: the table is registered once, under the embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._embedding[0]
        return dense_forward(x, table.weight, None, table.fixed_order)
