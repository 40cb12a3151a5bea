"""Builds a `Tokenizer` from a tiktoken file, as Llama 3's original `tokenizer.model` is
(`Tokenizer.from_tiktoken`), with Llama 3's special tokens and pre-tokenizer regex as defaults."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from lmgen.tokenizer.backends import TiktokenBackend


# Llama 3's pre-tokenizer regex (tiktoken `pat_str` of the original release).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llama3_special_tokens(num_base_tokens: int = 128000, num_reserved: int = 256) -> dict[str, int]:
    """The special tokens Meta's Llama 3 / 3.1 / 3.2 / 3.3 `tokenizer.model` comes with (ids after the base ranks)."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(2, num_reserved - len(names) + 2)]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def tiktoken_tokenizer(
    cls: type,
    path: str | os.PathLike,
    special_tokens: Mapping[str, int] | None,
    pattern: str,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None,
    add_bos_token: bool,
    extra_eos_tokens: Iterable[str],
    chat_template: str | None,
    chat_templates: Mapping[str, str] | None,
) -> "Tokenizer":  # cls(...): the Tokenizer class is passed in, not imported (no cycle)
    """`cls` over a tiktoken file: one "base64(token bytes) rank" pair per line (the defaults are
    `Tokenizer.from_tiktoken`'s).

    `special_tokens` None means Llama 3's (`llama3_special_tokens(number of ranks)`); bos/eos/pad
    name special tokens and are ignored when absent from it."""
    import tiktoken

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such tiktoken file")
    ranks: dict[bytes, int] = {}
    with open(file, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except Exception:
                raise ValueError(
                    f"{file}:{lineno}: not a tiktoken line (base64 token, space, rank): {line[:60]!r}"
                ) from None
    if not ranks:
        raise ValueError(f"{file}: empty tiktoken file")
    if special_tokens is None:
        special_tokens = llama3_special_tokens(len(ranks))
    special_tokens = dict(special_tokens)
    clash = set(special_tokens.values()) & set(ranks.values())
    if clash:
        raise ValueError(f"{file}: special token ids {sorted(clash)[:5]} collide with token ranks")
    try:
        enc = tiktoken.Encoding(
            name=file.stem, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens
        )
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    backend = TiktokenBackend(enc, special_tokens)

    def tid(text: str | None) -> int | None:
        return special_tokens.get(text) if text is not None else None

    return cls(
        backend,
        bos_token_id=tid(bos_token),
        eos_token_id=tid(eos_token),
        extra_eos_token_ids=[i for i in map(tid, extra_eos_tokens) if i is not None],
        pad_token_id=tid(pad_token),
        add_bos_token=add_bos_token,
        chat_template=chat_template,
        chat_templates=chat_templates,
        vocab_size=max(enc.n_vocab, max(special_tokens.values(), default=-1) + 1),
        name=file.name,
    )
