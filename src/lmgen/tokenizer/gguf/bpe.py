"""Builds the byte-level BPE tokenizer of a `gpt2` GGUF vocabulary, and GPT-2's byte alphabet its
tokens are spelled in (also used to map pieces back to bytes when decoding)."""

from __future__ import annotations

import logging

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from lmgen.tokenizer.gguf.metadata import TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED, GGUFVocab
from lmgen.tokenizer.gguf.pretokenizers import GPT2_SPEC, PRE_TOKENIZERS

# Records keep the logger name they had before this module was split out of `gguf_vocab`.
logger = logging.getLogger("lmgen.tokenizer.gguf.vocab")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (space -> 'Ġ', newline -> 'Ċ', ...)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}
_BYTE_ALPHABET = frozenset(BYTE_ENCODER.values())


def _checked_merges(merges: list[tuple[str, str]], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and (a + b) in vocab]
    if len(kept) != len(merges):
        logger.warning("%s: %d merges refer to tokens not in the vocabulary; dropped", source, len(merges) - len(kept))
    return kept


def byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The byte-level BPE tokenizer of a `gpt2` vocabulary, split by its `pre` regexes (no added tokens yet)."""
    pre = vocab.pre or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        logger.warning(
            "%s: unknown tokenizer.ggml.pre %r; splitting text with GPT-2's regex, which may tokenize "
            "differently from the model's own tokenizer",
            vocab.source,
            pre,
        )
        spec = GPT2_SPEC

    token_to_id: dict[str, int] = {}
    for index, token in enumerate(vocab.tokens):
        kind = vocab.token_type(index)
        if kind not in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and not set(token) <= _BYTE_ALPHABET:
            # Written as raw text rather than in the byte alphabet: respell it.
            token = "".join(BYTE_ENCODER[b] for b in token.encode("utf-8"))
        token_to_id.setdefault(token, index)

    if vocab.merges is None:
        raise ValueError(f"{vocab.source}: byte-level (gpt2) vocabulary without tokenizer.ggml.merges")
    merges = []
    for line in vocab.merges:
        parts = line.split(" ")
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            logger.warning("%s: malformed merge %r; dropped", vocab.source, line)
    merges = _checked_merges(merges, token_to_id, vocab.source)

    tokenizer = Tokenizer(BPE(vocab=token_to_id, merges=merges, ignore_merges=spec.ignore_merges, fuse_unk=False))
    if spec.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer
