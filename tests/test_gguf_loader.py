"""The GGUF loader against gguf-py's own reader on the embedded SmolLM2 file."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from lmgen.loader.gguf import _LeanReader, load_gguf
from lmgen.model.linear import PackedTensor


def test_lean_reader_reads_what_gguf_py_reads(gguf_path):
    ours, theirs = _LeanReader(str(gguf_path)), gguf.GGUFReader(str(gguf_path))
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.data == field.data, name
        assert len(mine.parts) == len(field.parts), name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(mine.parts, field.parts)), name
    assert ours.fields["tokenizer.ggml.tokens"].contents()[:5] == theirs.fields["tokenizer.ggml.tokens"].contents()[:5]
    assert [(t.name, t.tensor_type, t.n_bytes, t.data_offset) for t in ours.tensors] == \
        [(t.name, t.tensor_type, t.n_bytes, t.data_offset) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert np.array_equal(a.data, b.data), a.name


def test_packed_tensors_read_the_file_on_demand(gguf_path):
    """Quantized weights hold a reader, not the memory map; what it reads is the tensor's bytes (Q/K rows back in
    transformers' order)."""
    loaded = load_gguf(gguf_path)
    by_name = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    down = loaded.weights["model.layers.3.mlp.down_proj.weight"]
    assert isinstance(down, PackedTensor) and callable(down.source)
    assert np.array_equal(down.data, by_name["blk.3.ffn_down.weight"].data)
    assert down.shape == (576, 1536)
    q = loaded.weights["model.layers.0.self_attn.q_proj.weight"]
    raw = by_name["blk.0.attn_q.weight"].data
    assert not np.array_equal(q.data, raw) and sorted(map(bytes, q.data)) == sorted(map(bytes, raw))
    norm = loaded.weights["model.layers.0.input_layernorm.weight"]
    assert isinstance(norm, torch.Tensor) and torch.equal(norm, torch.from_numpy(np.array(by_name["blk.0.attn_norm.weight"].data)))
