"""GGUF -> ModelConfig, weights (by Hugging Face name), tokenizer and chat template, via the `gguf` package.

Quantized tensors come back as `PackedTensor`s that read their blocks from the file when the model builder asks
for them; whether they stay packed or are dequantized is the builder's choice (lmgen.model.linear.build_linear).
Resident memory while loading is kept near the packed model's own size: the header is parsed by `_LeanReader`
and a tensor's bytes exist in the process only while that tensor is being packed.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from lmgen.config import ModelConfig
from lmgen.loader import LoadedModel, load_tokenizer
from lmgen.loader.errors import ModelLoadError
from lmgen.model.linear import PackedTensor

# llama.cpp tensor names -> transformers names (llama.cpp `gguf-py/gguf/tensor_mapping.py`).
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16}


def read_metadata(reader) -> dict:
    """Scalar and string key/values of the file; the big tokenizer arrays are left to the tokenizer builder."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre") and len(f.data) > 1:
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # an exotic value type we don't use
            continue
    return meta


def _hf_name(gguf_name: str) -> str | None:
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}" if part in _BLOCK_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _unpermute_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's convert_hf_to_gguf `permute` of Q/K (interleaved-pair RoPE layout
    -> transformers' rotate_half layout): gguf[i] = hf[perm[i]], so hf = gguf[argsort(perm)]."""
    perm = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)
    return torch.argsort(perm)


class _LeanReader(gguf.GGUFReader):
    """gguf.GGUFReader, whose `_get` returns plain ndarray views of the memory map.

    The stock `_get` keeps a chain of numpy.memmap views (slice -> view -> [:count] -> byte-order view) for every
    part of every metadata value, and a GGUF vocabulary has two parts per token and per merge: for SmolLM2's
    49k tokens and 48k merges that was 157 MiB of Python objects and 2.3 s (measured: 69 MiB and 0.7 s here).
    Same values, same errors on truncated files (a short slice fails the `.view`)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)  # (file_bytes,) uint8, no memmap subclass
        order = self.byte_order if override_order is None else override_order
        dt = np.dtype(dtype).newbyteorder(order)
        return plain[offset:offset + dt.itemsize * int(count)].view(dt)

    def _get_field_parts(self, orig_offs, raw_type):
        """Arrays (the vocabulary's tokens, merges, scores, types) in one pass over the bytes instead of one
        recursive call per element, with the same parts (length and bytes views per string, a one-element view per
        scalar); other values, and files in the other byte order, take gguf's own path.  SmolLM2's 49k tokens and
        48k merges: 0.8 -> 0.3 s of CPU for the whole header (measured on the 2-vCPU machine under load)."""
        if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, count, offs = gguf.GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
        types = [gguf.GGUFValueType.ARRAY] + ([itype] if count else [])  # as gguf-py: no item type when empty
        if itype == gguf.GGUFValueType.STRING:
            self._get(0, np.uint8, 0)  # makes self._plain, the file as a plain uint8 array
            plain = self._plain
            end, unpack_length = len(plain), struct.Struct("=Q").unpack_from  # "=": the file's order is ours here
            len_type = np.dtype(np.uint64).newbyteorder(self.byte_order)
            parts: list = [raw_itype, alen]
            for _ in range(count):  # each string: uint64 length, then the bytes; bounded by the file's size
                if offs + 8 > end:
                    raise ValueError(f"string array runs past the end of the file at offset {offs}")
                (n,) = unpack_length(plain, offs)
                if offs + 8 + n > end:
                    raise ValueError(f"string of {n} bytes runs past the end of the file at offset {offs}")
                parts += (plain[offs:offs + 8].view(len_type), plain[offs + 8:offs + 8 + n])
                offs += 8 + n
            return offs - orig_offs, parts, list(range(3, 3 + 2 * count, 2)), types
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is None:  # arrays of arrays
            return super()._get_field_parts(orig_offs, raw_type)
        values = self._get(offs, nptype, count)
        if len(values) != count:
            raise ValueError(f"array of {count} values runs past the end of the file at offset {offs}")
        return 12 + int(values.nbytes), [raw_itype, alen, *values.reshape(count, 1)], list(range(2, 2 + count)), types


def _file_reader(path: Path, offset: int, nbytes: int, shape: tuple[int, int]):
    """A function reading `nbytes` at `offset` of `path` as a (rows, bytes_per_row) uint8 array (a private copy,
    not the memory map: the bytes leave the process when the builder has packed them)."""
    def read() -> np.ndarray:
        data = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
        if data.size != nbytes:
            raise ModelLoadError(f"{path}: truncated tensor data at offset {offset} ({data.size} of {nbytes} bytes)")
        return data.reshape(shape)

    return read


def _tensor(t, path: Path) -> torch.Tensor | PackedTensor:
    kind = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first: (in, out) -> (out, in)
    if kind in _FLOAT_TYPES:
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    if kind == "BF16":
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(np.array(t.data), t.tensor_type)).reshape(shape)
    if len(shape) != 2:
        raise ModelLoadError(f"tensor {t.name!r}: quantized type {kind} on a {len(shape)}-D tensor is not supported")
    byte_shape = tuple(int(d) for d in t.data.shape)  # (rows, bytes_per_row), from the header only
    return PackedTensor(t.tensor_type, _file_reader(path, int(t.data_offset), int(t.n_bytes), byte_shape), shape)


def load_gguf(path: Path) -> LoadedModel:
    """Opens a GGUF file and maps it to the engine's view of a model. Corrupt or truncated -> ModelLoadError."""
    try:
        reader = _LeanReader(str(path))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError... on bad bytes
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    meta = read_metadata(reader)
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens_field.data) if tokens_field is not None else None
    config = ModelConfig.from_gguf_metadata(meta, vocab_size=n_vocab)
    gguf_arch = meta["general.architecture"]
    weights: dict = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            if t.name == "rope_freqs.weight":  # Llama 3.1 GGUFs store the llama3 scaling as per-frequency divisors
                config.rope_scaling = {"rope_type": "freq_factors", "factors": torch.from_numpy(np.array(t.data)).float()}
            continue
        weights[name] = _tensor(t, Path(path))
    if gguf_arch in ("llama", "mistral"):
        for i in range(config.num_layers):
            for proj, n_head in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
                for kind in ("weight", "bias"):
                    key = f"model.layers.{i}.self_attn.{proj}.{kind}"
                    if key in weights:
                        w = weights[key]
                        order = _unpermute_order(w.shape[0], n_head)
                        weights[key] = w.permute_rows(order) if isinstance(w, PackedTensor) else w[order]
    config.tie_word_embeddings = "lm_head.weight" not in weights

    from lmgen.tokenizer.tokenizer import Tokenizer

    tokenizer = load_tokenizer(path, lambda: Tokenizer.from_gguf(reader))
    return LoadedModel(config, weights, tokenizer, Path(path), "gguf", Path(path).stat().st_size, meta)
