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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

# llama.cpp's token types (gguf.TokenType)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# --- pre-tokenizer regexes, by `tokenizer.ggml.pre` -------------------------------------------------

# GPT-2's own regex (what `pre_tokenizers.ByteLevel(use_regex=True)` uses).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How a byte-level vocabulary cuts text before BPE runs on each piece."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token that is itself in the vocabulary is used whole
    add_bos: bool = False  # llama.cpp's default for `add_bos_token` when the file does not say
    nfc: bool = False  # Qwen2's tokenizer.json NFC-normalizes the input first


_GPT2_SPEC = PreTokenizerSpec((_GPT2,))
_LLAMA3_SPEC = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
# StarCoder / SmolLM: every digit on its own, then GPT-2's regex.
_STARCODER_SPEC = PreTokenizerSpec((r"\p{N}", _GPT2))
_QWEN2_SPEC = PreTokenizerSpec((_QWEN2,), nfc=True)
_TEKKEN_SPEC = PreTokenizerSpec((_TEKKEN,), ignore_merges=True, add_bos=True)
_FALCON_SPEC = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))
_GPT4O_SPEC = PreTokenizerSpec((_GPT4O,))

PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    # GPT-2 family. llama.cpp's own "default" splits punctuation and 3-digit groups first, a quirk of
    # its oldest files; a file without `pre` is treated as GPT-2 here, as transformers does.
    "default": _GPT2_SPEC,
    "gpt2": _GPT2_SPEC,
    "gpt-2": _GPT2_SPEC,
    "phi-2": _GPT2_SPEC,
    "mpt": _GPT2_SPEC,
    "olmo": _GPT2_SPEC,
    "jais": _GPT2_SPEC,
    "roberta-bpe": _GPT2_SPEC,
    "exaone4": _GPT2_SPEC,
    # Llama 3 family
    "llama3": _LLAMA3_SPEC,
    "llama-v3": _LLAMA3_SPEC,
    "llama-bpe": _LLAMA3_SPEC,
    "falcon3": _LLAMA3_SPEC,
    "falcon-h1": _LLAMA3_SPEC,
    "pixtral": _LLAMA3_SPEC,
    "dbrx": PreTokenizerSpec((_LLAMA3,)),
    "smaug-bpe": PreTokenizerSpec((_LLAMA3,)),
    # StarCoder family
    "smollm": _STARCODER_SPEC,
    "starcoder": _STARCODER_SPEC,
    "refact": _STARCODER_SPEC,
    "command-r": _STARCODER_SPEC,
    "codeshell": _STARCODER_SPEC,
    "exaone": _STARCODER_SPEC,
    "minerva-7b": _STARCODER_SPEC,
    # Qwen2 family
    "qwen2": _QWEN2_SPEC,
    "stablelm2": _QWEN2_SPEC,
    "megrez": _QWEN2_SPEC,
    "deepseek-r1-qwen": _QWEN2_SPEC,
    # Mistral Nemo & co
    "tekken": _TEKKEN_SPEC,
    "falcon": _FALCON_SPEC,
    "gpt-4o": _GPT4O_SPEC,
    "llama4": _GPT4O_SPEC,
}

SUPPORTED_MODELS = ("gpt2", "llama")


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


# --- reading the metadata ---------------------------------------------------------------------------


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
    if isinstance(reader, (str, os.PathLike)):
        import gguf

        reader = gguf.GGUFReader(os.fspath(reader))
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
    )


# --- building the tokenizer -------------------------------------------------------------------------


def build_tokenizer(vocab: GGUFVocab) -> Tokenizer:
    """The `tokenizers.Tokenizer` that encodes like the model this vocabulary belongs to.

    It adds no BOS/EOS itself (no post-processor): `lmgen.tokenizer.Tokenizer` does that.
    """
    if vocab.model == "gpt2":
        tokenizer = _byte_level_bpe(vocab)
    elif vocab.model == "llama":
        tokenizer = _sentencepiece_bpe(vocab)
    else:
        raise ValueError(f"{vocab.source}: unsupported tokenizer.ggml.model {vocab.model!r}")
    _add_special_tokens(tokenizer, vocab)
    return tokenizer


def _checked_merges(merges: list[tuple[str, str]], vocab: dict[str, int], source: str) -> list[tuple[str, str]]:
    kept = [(a, b) for a, b in merges if a in vocab and b in vocab and (a + b) in vocab]
    if len(kept) != len(merges):
        logger.warning("%s: %d merges refer to tokens not in the vocabulary; dropped", source, len(merges) - len(kept))
    return kept


def _byte_level_bpe(vocab: GGUFVocab) -> Tokenizer:
    pre = vocab.pre or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        logger.warning(
            "%s: unknown tokenizer.ggml.pre %r; splitting text with GPT-2's regex, which may tokenize "
            "differently from the model's own tokenizer",
            vocab.source,
            pre,
        )
        spec = _GPT2_SPEC

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


def _sentencepiece_bpe(vocab: GGUFVocab) -> Tokenizer:
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
