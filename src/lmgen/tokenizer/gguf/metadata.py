"""`GGUFVocab`: a GGUF file's tokenizer metadata (llama.cpp's `tokenizer.ggml.*` keys) read under
plain names, with llama.cpp's token type codes; the builders work from this, never from the file."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from lmgen.tokenizer.gguf.pretokenizers import PRE_TOKENIZERS

# Records keep the logger name they had before this module was split out of `gguf_vocab`.
logger = logging.getLogger("lmgen.tokenizer.gguf.vocab")

# llama.cpp's token types (gguf.TokenType)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SUPPORTED_MODELS = ("gpt2", "llama")


@dataclass
class GGUFVocab:
    """The tokenizer-related metadata of a GGUF file, under plain names."""

    model: str
    tokens: list[str]
    token_types: list[int] | None = None
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None
    eom_token_id: int | None = None
    add_bos_token: bool | None = None  # None: the file does not say
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    chat_templates: dict[str, str] = field(default_factory=dict)  # the named ones
    source: str = "<gguf>"
    architecture: str | None = None  # general.architecture (picks a built-in chat template when the file has none)

    def token_type(self, index: int) -> int:
        if self.token_types is None or index >= len(self.token_types):
            return TOKEN_NORMAL
        return int(self.token_types[index])

    def default_add_bos(self) -> bool:
        """Whether BOS is prepended: the file's flag, else llama.cpp's default for the vocabulary kind."""
        if self.add_bos_token is not None:
            return self.add_bos_token
        if self.model == "llama":
            return True
        spec = PRE_TOKENIZERS.get(self.pre or "default")
        return bool(spec and spec.add_bos)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _valid_id(value: Any, n_tokens: int, key: str, source: str) -> int | None:
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_tokens:
        logger.warning("%s: %s = %d is outside the vocabulary (%d tokens); ignored", source, key, value, n_tokens)
        return None
    return value


def read_gguf_vocab(reader: Any) -> GGUFVocab:
    """Read the tokenizer metadata out of a `gguf.GGUFReader` (or a path to a .gguf file)."""
    if isinstance(reader, (str, os.PathLike)):  # checked first: gguf-py trusts the file's counts and lengths
        from lmgen.loader.gguf_layout import read_layout
        from lmgen.loader.gguf_reader import LeanReader

        read_layout(reader)
        reader = LeanReader(os.fspath(reader))
    source = str(getattr(reader, "path", None) or getattr(getattr(reader, "data", None), "filename", None) or "<gguf>")

    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{source}: no tokenizer.ggml.model in the GGUF metadata; this file carries no tokenizer")
    if model not in SUPPORTED_MODELS:
        raise ValueError(
            f"{source}: unsupported tokenizer.ggml.model {model!r} (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    tokens = list(tokens)
    n = len(tokens)

    named: dict[str, str] = {}
    prefix = "tokenizer.chat_template."
    for key in reader.fields:
        if key.startswith(prefix) and len(key) > len(prefix):
            value = _field(reader, key)
            if isinstance(value, str):
                named[key[len(prefix) :]] = value

    def tid(key: str) -> int | None:
        return _valid_id(_field(reader, f"tokenizer.ggml.{key}"), n, f"tokenizer.ggml.{key}", source)

    def flag(key: str) -> bool | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else bool(value)

    token_types = _field(reader, "tokenizer.ggml.token_type")
    scores = _field(reader, "tokenizer.ggml.scores")
    merges = _field(reader, "tokenizer.ggml.merges")
    return GGUFVocab(
        model=model,
        tokens=tokens,
        token_types=[int(t) for t in token_types] if token_types is not None else None,
        scores=[float(s) for s in scores] if scores is not None else None,
        merges=list(merges) if merges is not None else None,
        pre=_field(reader, "tokenizer.ggml.pre"),
        bos_token_id=tid("bos_token_id"),
        eos_token_id=tid("eos_token_id"),
        unk_token_id=tid("unknown_token_id"),
        pad_token_id=tid("padding_token_id"),
        eot_token_id=tid("eot_token_id"),
        eom_token_id=tid("eom_token_id"),
        add_bos_token=flag("add_bos_token"),
        add_eos_token=flag("add_eos_token"),
        add_space_prefix=flag("add_space_prefix"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        chat_templates=named,
        source=source,
        architecture=_field(reader, "general.architecture"),
    )
