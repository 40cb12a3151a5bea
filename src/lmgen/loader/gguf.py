"""GGUF -> ModelConfig, weights (by Hugging Face name), tokenizer and chat template, via the `gguf` package.

Quantized tensors come back as `PackedTensor`s that read their blocks from the file when their layer is built
for them; whether they stay packed or are dequantized is the builder's choice (lmgen.layers.linear.build_linear).
Resident memory while loading is kept near the packed model's own size: the header is parsed by `LeanReader`
and a tensor's bytes exist in the process only while that tensor is being packed. Every count, length, offset and
dimension of the file is checked (`gguf_layout.read_layout`, then `_config`) before gguf-py reads it.
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from lmgen.config import ModelConfig
from lmgen.errors import ModelFormatError, ModelLoadError, UnsupportedModelError
from lmgen.loader.loaded import LoadedModel, load_tokenizer
from lmgen.loader.gguf_layout import GGUFLayout, read_layout
from lmgen.loader.gguf_reader import LeanReader
from lmgen.layers.linear import PackedTensor

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
# What other families name differently (convert_hf_to_gguf.py / tensor_mapping.py): Gemma's sandwich norms (its
# ffn_norm is the pre-MLP norm), q/k norms, GPT-2's modules under lmgen's names (its Conv1D layout is transformers'
# only: GGUF stores (out, in) as every other linear weight).
_FAMILY_BLOCK_NAMES = {
    "gemma3": {**_BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm"},
    "qwen3": {**_BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"},
    "gpt2": {"attn_norm": "ln_1", "attn_qkv": "attn.qkv_proj", "attn_output": "attn.o_proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"},
}
_FAMILY_GLOBAL_NAMES = {"gpt2": {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                                 "output_norm": "transformer.ln_f", "output": "lm_head"}}
_BLOCK_PREFIX = {"gpt2": "transformer.h"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16}
# Block-quantized types gguf-py can dequantize (lmgen's kernels pack some of them); the integer and F64 types
# are never weights of these models.
_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS",
                "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")
_TOKENIZER_ARRAYS = ("tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def read_metadata(reader) -> dict:
    """Scalar and string key/values of the file; the big tokenizer arrays are left to the tokenizer builder."""
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        try:
            meta[key] = f.contents()
        except Exception:  # an exotic value type we don't use
            continue
    return meta


def _hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        names = _FAMILY_BLOCK_NAMES.get(arch, _BLOCK_NAMES)
        return f"{_BLOCK_PREFIX.get(arch, 'model.layers')}.{layer}.{names[part]}.{kind}" if part in names else None
    base, _, kind = gguf_name.rpartition(".")
    names = _FAMILY_GLOBAL_NAMES.get(arch, _GLOBAL_NAMES)
    return f"{names[base]}.{kind}" if base in names else None


def _unpermute_order(rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's convert_hf_to_gguf `permute` of Q/K (interleaved-pair RoPE layout
    -> transformers' rotate_half layout): gguf[i] = hf[perm[i]], so hf = gguf[argsort(perm)]."""
    perm = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)
    return torch.argsort(perm)


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


def _config(layout: GGUFLayout, path: Path) -> ModelConfig:
    """The model config from the checked metadata, and the checks that tie it to the tensor table and vocabulary:
    all before gguf-py parses the file or anything is sized by these numbers."""
    n_vocab = layout.array_counts.get("tokenizer.ggml.tokens")
    for key in _TOKENIZER_ARRAYS:
        if n_vocab is not None and layout.array_counts.get(key, n_vocab) != n_vocab:
            raise ModelFormatError(f"{path}: {key} has {layout.array_counts[key]} entries for {n_vocab} tokens", key=key,
                                   value=layout.array_counts[key])
    try:
        config = ModelConfig.from_gguf_metadata(layout.metadata, vocab_size=n_vocab)
    except ModelFormatError as e:
        raise ModelFormatError(f"{path}: {e}", key=e.key, value=e.value, offset=e.offset) from None
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from None
    layers = {int(m.group(1)) for m in map(_BLOCK_RE.match, (t.name for t in layout.tensors)) if m}
    if len(layers) != config.num_layers or (layers and max(layers) != config.num_layers - 1):
        arch = layout.metadata["general.architecture"]
        found = f"blk.0 .. blk.{max(layers)}" if layers == set(range(len(layers))) and layers else f"{len(layers)} blocks"
        raise ModelFormatError(f"{path}: {arch}.block_count = {config.num_layers} but the tensors are for {found}",
                               key=f"{arch}.block_count", value=config.num_layers)
    rows = {"attn_q": config.q_size, "attn_k": config.kv_size}
    for t in layout.tensors:
        m = _BLOCK_RE.match(t.name)
        if m and m.group(2) in rows and t.dims[-1] != rows[m.group(2)]:  # dims fastest-first: the last is the rows
            raise ModelFormatError(f"{path}: tensor {t.name!r} has {t.dims[-1]} rows; the metadata's head count and "
                                   f"size make {rows[m.group(2)]}", key=t.name, value=list(t.dims), offset=t.offset)
        if t.name == "rope_freqs.weight" and (t.dims != (config.head_dim // 2,) or t.ggml_type.name != "F32"):
            raise ModelFormatError(f"{path}: rope_freqs.weight must be F32 of {config.head_dim // 2} values, got "
                                   f"{t.ggml_type.name} {list(t.dims)}", key=t.name, value=list(t.dims), offset=t.offset)
        kind = t.ggml_type.name
        if _hf_name(t.name, layout.metadata["general.architecture"]) and kind not in _FLOAT_TYPES and kind != "BF16" and kind not in _BLOCK_TYPES:
            raise ModelFormatError(f"{path}: tensor {t.name!r} has type {kind}, which is not a weight type lmgen "
                                   f"reads", key=t.name, value=kind, offset=t.offset)
    return config


def load_gguf(path: Path) -> LoadedModel:
    """Opens a GGUF file and maps it to the engine's view of a model. Corrupt or truncated -> ModelLoadError
    (a ModelFormatError naming the bad value where the file's own header or metadata is wrong)."""
    layout = read_layout(path)
    config = _config(layout, Path(path))
    try:
        reader = LeanReader(str(path))
    except Exception as e:  # a backstop: read_layout has checked what gguf-py reads
        raise ModelLoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from None
    meta = read_metadata(reader)
    gguf_arch = meta["general.architecture"]
    weights: dict = {}
    for t in reader.tensors:
        name = _hf_name(t.name, gguf_arch)
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
