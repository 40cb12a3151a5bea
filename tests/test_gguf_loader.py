"""The GGUF loader against gguf-py's own reader on the embedded SmolLM2 file."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from lmgen.loader.gguf import load_gguf
from lmgen.loader.gguf_reader import LeanReader
from lmgen.layers.linear import PackedTensor


def test_lean_reader_reads_what_gguf_py_reads(gguf_path):
    ours, theirs = LeanReader(str(gguf_path)), gguf.GGUFReader(str(gguf_path))
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.offset == field.offset, name
        assert mine.contents() == field.contents(), name
        if field.types[0] != gguf.GGUFValueType.ARRAY:  # arrays: whole-array parts (numbers), one per string
            assert mine.data == field.data and len(mine.parts) == len(field.parts), name
            assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(mine.parts, field.parts)), name
    assert len(ours.fields["tokenizer.ggml.tokens"].data) == 49152
    assert ours.fields["tokenizer.ggml.tokens"].contents(3) == theirs.fields["tokenizer.ggml.tokens"].contents(3)
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


def _write_gguf(path, arrays: dict) -> str:
    writer = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in arrays.items():
        writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def _write_gguf_by_hand(path, arrays: dict[str, tuple[int, int, int]]) -> str:
    """A GGUF v3 file with no tensors whose arrays ({key: (item type code, item bytes, count)}) are all zero bytes:
    numbers 0, strings empty. gguf-py's writer takes seconds for millions of items; this takes milliseconds."""
    with open(path, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(arrays)))
        for key, (code, item_bytes, count) in arrays.items():
            f.write(struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IIQ", 9, code, count) + bytes(item_bytes * count))
    return str(path)


def test_well_formed_but_absurd_arrays_are_refused(tmp_path):
    """Files that are consistent byte for byte (gguf-py's writer made them) but whose arrays are beyond any model's
    size, or disagree with the token table: refused with the key, before gguf-py parses them."""
    from lmgen.errors import ModelFormatError
    from lmgen.loader.gguf_layout import MAX_ARRAY_ITEMS
    from lmgen.tokenizer.tokenizer import Tokenizer

    huge = _write_gguf_by_hand(tmp_path / "huge.gguf", {"tokenizer.ggml.token_type": (5, 4, MAX_ARRAY_ITEMS + 1)})
    with pytest.raises(ModelFormatError, match=f"declares {MAX_ARRAY_ITEMS + 1} entries; lmgen's limit") as info:
        load_gguf(huge)
    assert info.value.key == "tokenizer.ggml.token_type" and info.value.value == MAX_ARRAY_ITEMS + 1
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.token_type"):
        Tokenizer.from_gguf(huge)  # the tokenizer-only path checks the file too
    short = _write_gguf(tmp_path / "short.gguf", {"tokenizer.ggml.tokens": ["a", "b", "c"],
                                                  "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.token_type has 2 entries for 3 tokens"):
        load_gguf(short)


def test_big_vocabulary_arrays_stay_cheap(tmp_path):
    """At the limit (2M strings, 2M numbers) the reader keeps one view per string and one per numeric array."""
    import resource

    from lmgen.loader.gguf_layout import MAX_ARRAY_ITEMS, read_layout

    n = MAX_ARRAY_ITEMS
    path = _write_gguf_by_hand(tmp_path / "big.gguf", {"x.numbers": (0, 1, n), "x.strings": (8, 8, n)})  # "": 8 bytes
    layout = read_layout(path)
    assert layout.array_counts == {"x.numbers": MAX_ARRAY_ITEMS, "x.strings": MAX_ARRAY_ITEMS}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reader = LeanReader(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(reader.fields["x.numbers"].parts) == 6 and len(reader.fields["x.strings"].data) == n  # 3 for the key
    assert reader.fields["x.numbers"].contents()[-3:] == [0, 0, 0]
    assert reader.fields["x.strings"].contents(7) == ""
    assert grown_mib < 1024, grown_mib  # gguf-py's own reader: ~1.9 GiB for these two arrays
