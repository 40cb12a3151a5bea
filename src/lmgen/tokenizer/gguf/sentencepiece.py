"""Builds the SentencePiece-style BPE tokenizer of a `llama` GGUF vocabulary: merges recovered from
the token scores, `<0xNN>` byte fallback, and `▁` for spaces with the optional space prefix."""

from __future__ import annotations

import logging

from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE

from lmgen.tokenizer.gguf.metadata import TOKEN_NORMAL, TOKEN_USER_DEFINED, GGUFVocab

# Records keep the logger name they had before this module was split out of `gguf_vocab`.
logger = logging.getLogger("lmgen.tokenizer.gguf.vocab")


def sentencepiece_merges(vocab: GGUFVocab, token_to_id: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges recovered from the scores: a pair may merge when its concatenation is a
    normal token, and pairs whose result scores higher merge first."""
    scores = vocab.scores
    if scores is None:  # no scores: earlier tokens were learned first
        scores = [-float(i) for i in range(len(vocab.tokens))]
    mergeable = {TOKEN_NORMAL}
    part_ok = {TOKEN_NORMAL, TOKEN_USER_DEFINED}
    candidates: list[tuple[float, int, int, str, str]] = []
    for index, token in enumerate(vocab.tokens):
        if vocab.token_type(index) not in mergeable or len(token) < 2 or token_to_id.get(token) != index:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            li, ri = token_to_id.get(left), token_to_id.get(right)
            if li is None or ri is None:
                continue
            if vocab.token_type(li) not in part_ok or vocab.token_type(ri) not in part_ok:
                continue
            candidates.append((-scores[index], li, ri, left, right))
    candidates.sort()
    return [(left, right) for _, _, _, left, right in candidates]


def sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
    """The SentencePiece-style BPE tokenizer of a `llama` vocabulary (no added tokens yet)."""
    token_to_id: dict[str, int] = {}
    for index, token in enumerate(vocab.tokens):
        token_to_id.setdefault(token, index)
    merges = sentencepiece_merges(vocab, token_to_id)
    unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
    has_bytes = all(f"<0x{b:02X}>" in token_to_id for b in range(256))
    if not has_bytes:
        logger.info("%s: no <0xNN> byte tokens; unknown characters map to the unknown token", vocab.source)
    tokenizer = Tokenizer(
        BPE(vocab=token_to_id, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=has_bytes)
    )
    add_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    # Spaces become "▁" and, with add_space_prefix, one "▁" goes in front of each stretch of text --
    # also in front of text that already starts with a space, and after a special token, as
    # SentencePiece and llama.cpp do (the Metaspace pre-tokenizer skips text starting with a space).
    steps_in = [normalizers.Replace(" ", "▁")]
    if add_prefix:
        steps_in.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps_in)
    tokenizer.pre_tokenizer = None
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer
