"""Build a `tokenizers.Tokenizer` from the vocabulary a GGUF file carries in its metadata.

A GGUF has no `tokenizer.json`: it stores the vocabulary under llama.cpp's key names
(`tokenizer.ggml.model`, `.tokens`, `.token_type`, `.merges`, `.scores`, `.pre`, the special token
ids ...). Two vocabulary kinds are supported, the ones LLaMA-family models use:

* ``gpt2``: byte-level BPE (Llama 3, SmolLM, Qwen2, Mistral-Nemo "tekken", ...). The tokens are
  spelled in GPT-2's byte alphabet (``Ġ`` for a space), the merges are listed, and the text is cut
  into pre-tokens by a regex named by ``tokenizer.ggml.pre`` -- the same regexes llama.cpp uses for
  its ``LLAMA_VOCAB_PRE_TYPE_*`` (several regexes are applied one after the other, each splitting
  the pieces of the previous one, keeping both matches and gaps).
* ``llama``: SentencePiece (Llama 1/2, Mistral 7B, TinyLlama, ...): ``▁`` stands for a space, a
  space is put in front of the text (and after each special token) when ``add_space_prefix``,
  characters missing from the vocabulary fall back to ``<0xNN>`` byte tokens, and the merge order
  is recovered from the token scores (SentencePiece BPE merges the adjacent pair whose result
  scores highest).

Token types (``tokenizer.ggml.token_type``) decide which tokens are matched whole in the input:
control (3) and unknown (2) tokens become special added tokens, user-defined (4) tokens become
plain added tokens.

The parts live in their own modules -- `gguf_metadata` (reading the metadata into a `GGUFVocab`),
`gguf_pretokenizers` (the regexes by ``pre``), `gguf_bpe` (gpt2) and `gguf_sentencepiece` (llama);
this one builds the tokenizer from them and re-exports their public names.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer

from lmgen.tokenizer.gguf.bpe import BYTE_DECODER, BYTE_ENCODER, byte_level_bpe, bytes_to_unicode
from lmgen.tokenizer.gguf.metadata import (
    SUPPORTED_MODELS,
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    GGUFVocab,
    read_gguf_vocab,
)
from lmgen.tokenizer.gguf.pretokenizers import PRE_TOKENIZERS, PreTokenizerSpec
from lmgen.tokenizer.gguf.sentencepiece import sentencepiece_bpe, sentencepiece_merges

__all__ = [
    "BYTE_DECODER",
    "BYTE_ENCODER",
    "PRE_TOKENIZERS",
    "SUPPORTED_MODELS",
    "TOKEN_BYTE",
    "TOKEN_CONTROL",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_UNUSED",
    "TOKEN_USER_DEFINED",
    "GGUFVocab",
    "PreTokenizerSpec",
    "build_tokenizer",
    "bytes_to_unicode",
    "read_gguf_vocab",
    "sentencepiece_merges",
    "special_token_ids",
]


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers.Tokenizer` that encodes like the model this vocabulary belongs to.

    It adds no BOS/EOS itself (no post-processor): `lmgen.tokenizer.Tokenizer` does that.
    """
    if vocab.model == "gpt2":
        tokenizer = byte_level_bpe(vocab)
    elif vocab.model == "llama":
        tokenizer = sentencepiece_bpe(vocab)
    else:
        raise ValueError(f"{vocab.source}: unsupported tokenizer.ggml.model {vocab.model!r}")
    _add_special_tokens(tokenizer, vocab)
    return tokenizer


def _add_special_tokens(tokenizer: Tokenizer, vocab: GGUFVocab) -> None:
    """Control and unknown tokens (and the BOS/EOS/... ids, whatever their type) are matched whole in the
    text as special tokens; user-defined ones are matched whole as ordinary added tokens."""
    named = set(_named_ids(vocab))
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for index, token in enumerate(vocab.tokens):
        kind = vocab.token_type(index)
        if not token or tokenizer.token_to_id(token) != index:
            continue  # a duplicate spelling, or respelled: it cannot be matched whole under this text
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN) or index in named:
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            plain.append(AddedToken(token, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if plain:
        tokenizer.add_tokens(plain)


def special_token_ids(vocab: GGUFVocab) -> set[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops: control/unknown tokens and the named ids."""
    ids = {
        index
        for index in range(len(vocab.tokens))
        if vocab.token_type(index) in (TOKEN_CONTROL, TOKEN_UNKNOWN)
    }
    ids |= set(_named_ids(vocab))
    return ids


def _named_ids(vocab: GGUFVocab) -> list[int]:
    named = (vocab.bos_token_id, vocab.eos_token_id, vocab.unk_token_id, vocab.pad_token_id)
    return [i for i in (*named, vocab.eot_token_id, vocab.eom_token_id) if i is not None]
