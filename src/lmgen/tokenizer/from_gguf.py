"""Builds a `Tokenizer` from the vocabulary in a GGUF file's metadata (`Tokenizer.from_gguf`).
`gguf_vocab` reads the vocabulary and builds the `tokenizers.Tokenizer`; this picks the backend and
maps the vocabulary's special ids and flags onto the `Tokenizer`."""

from __future__ import annotations

import logging
import os
from typing import Any

from lmgen.tokenizer.backends import SentencePieceBackend, TokenizersBackend
from lmgen.tokenizer.chat_template.builtins import ARCHITECTURE_TEMPLATES, BUILTIN_TEMPLATES
from lmgen.tokenizer.gguf import vocab as gguf_vocab

logger = logging.getLogger(__name__)


def default_chat_template(vocab: gguf_vocab.GGUFVocab) -> str | None:
    """The file's chat template; for an architecture whose GGUFs often carry none (Gemma's base models), lmgen's
    built-in template of that family, said in a log line."""
    if vocab.chat_template is not None:
        return vocab.chat_template
    name = ARCHITECTURE_TEMPLATES.get(str(vocab.architecture))
    if name is None:
        return None
    logger.info("%s has no chat template; using lmgen's built-in %r template (architecture %s)", vocab.source, name,
                vocab.architecture)
    return BUILTIN_TEMPLATES[name]


def gguf_tokenizer(cls: type, reader: Any) -> "Tokenizer":  # cls(...): the Tokenizer class is passed in, not imported (no cycle)
    """`cls` over the vocabulary in a GGUF file: a `gguf.GGUFReader`, a path, or the
    `gguf_vocab.GGUFVocab` already read from one."""
    vocab = reader if isinstance(reader, gguf_vocab.GGUFVocab) else gguf_vocab.read_gguf_vocab(reader)
    tk = gguf_vocab.build_tokenizer(vocab)
    if vocab.model == "llama":
        strip = True if vocab.add_space_prefix is None else vocab.add_space_prefix
        backend: TokenizersBackend = SentencePieceBackend(tk, gguf_vocab.special_token_ids(vocab), strip)
    else:
        backend = TokenizersBackend(tk, gguf_vocab.special_token_ids(vocab))
    eos_extra = [i for i in (vocab.eot_token_id, vocab.eom_token_id) if i is not None]
    return cls(
        backend,
        bos_token_id=vocab.bos_token_id,
        eos_token_id=vocab.eos_token_id,
        extra_eos_token_ids=eos_extra,
        pad_token_id=vocab.pad_token_id,
        unk_token_id=vocab.unk_token_id,
        add_bos_token=vocab.default_add_bos(),
        add_eos_token=bool(vocab.add_eos_token),
        chat_template=default_chat_template(vocab),
        chat_templates=vocab.chat_templates,
        vocab_size=len(vocab.tokens),
        name=os.path.basename(vocab.source),
    )
