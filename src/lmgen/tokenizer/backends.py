"""The backends a `Tokenizer` encodes and decodes with: `tokenizers` (byte-level or SentencePiece-style
decoding) or `tiktoken`. Kept apart so `Tokenizer` sees one small interface, whatever the source."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers

from lmgen.tokenizer.gguf import vocab as gguf_vocab


class TokenizersBackend:
    """A `tokenizers.Tokenizer`, used without its post-processor (Tokenizer adds BOS/EOS itself)."""

    def __init__(self, tk: tokenizers.Tokenizer, special_ids: Iterable[int] = ()):
        self.tk = tk
        self.special_ids = {t_id for t_id, tok in tk.get_added_tokens_decoder().items() if tok.special}
        self.special_ids |= set(special_ids)
        # Ids the tokenizers library itself treats as special (skipped by decode(skip_special_tokens)).
        self._lib_special = {t_id for t_id, tok in tk.get_added_tokens_decoder().items() if tok.special}

    def encode(self, text: str) -> list[int]:
        if len(text) > 4096:  # encode_batch releases the GIL: a long text does not stall the other threads
            return self.tk.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens and not self.special_ids <= self._lib_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def token_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


def _replace_each_byte(error: UnicodeDecodeError) -> tuple[str, int]:
    """One U+FFFD per byte that is not part of a valid UTF-8 character (as SentencePiece decodes)."""
    return "\ufffd" * (error.end - error.start), error.end


codecs.register_error("lmgen.replace_each_byte", _replace_each_byte)

# tokenizer.json decoder of Llama 2 / Mistral / TinyLlama / Gemma style vocabularies (Strip optional)
_SPM_DECODER_STEPS = [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"},
    {"type": "Fuse"},
]
_SPM_DECODER_STRIP = {"type": "Strip", "content": " ", "start": 1, "stop": 0}


class SentencePieceBackend(TokenizersBackend):
    """Encodes with `tokenizers`; decodes as SentencePiece and llama.cpp do: a ``<0xNN>`` token is that raw
    byte, ``▁`` is a space, and each byte that is not part of a valid UTF-8 character becomes U+FFFD.

    (tokenizers' ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when any byte of it is
    invalid, so text already streamed could later decode differently; this decode never revises a
    complete character.)"""

    def __init__(self, tk: tokenizers.Tokenizer, special_ids: Iterable[int] = (), strip_leading_space: bool = True):
        super().__init__(tk, special_ids)
        self.strip_leading_space = strip_leading_space
        self._byte_of: dict[int, int] = {}
        for b in range(256):
            t_id = tk.token_to_id(f"<0x{b:02X}>")
            if t_id is not None:
                self._byte_of[t_id] = b
        self._bytes_cache: dict[int, bytes] = {}

    def _token_bytes(self, i: int) -> bytes:
        raw = self._bytes_cache.get(i)
        if raw is None:
            if i in self._byte_of:
                raw = bytes([self._byte_of[i]])
            else:
                piece = self.tk.id_to_token(i)
                raw = b"" if piece is None else piece.replace("\u2581", " ").encode("utf-8")
            self._bytes_cache[i] = raw
        return raw

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        skip = self.special_ids if skip_special_tokens else ()
        data = b"".join(self._token_bytes(int(i)) for i in ids if int(i) not in skip)
        text = data.decode("utf-8", errors="lmgen.replace_each_byte")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text


def _decoder_json(tk: tokenizers.Tokenizer) -> dict | None:
    decoder = tk.decoder
    if decoder is None:
        return None
    try:
        return json.loads(decoder.__getstate__())
    except Exception:  # a custom (Python) decoder
        return None


def spm_decoder_strip(tk: tokenizers.Tokenizer) -> bool | None:
    """For a tokenizer.json whose decoder is the standard SentencePiece chain: whether it strips the leading
    space. None for any other decoder."""
    decoder = _decoder_json(tk) or {}
    if decoder.get("type") != "Sequence":
        return None
    steps = decoder.get("decoders") or []
    if steps == _SPM_DECODER_STEPS:
        return False
    if steps == _SPM_DECODER_STEPS + [_SPM_DECODER_STRIP]:
        return True
    return None


def byte_fallback_ids(tk: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of ``<0xNN>`` tokens when the decoder uses tokenizers' ByteFallback (see SentencePieceBackend)."""
    if "ByteFallback" not in json.dumps(_decoder_json(tk)):
        return frozenset()
    ids = (tk.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class TiktokenBackend:
    """A `tiktoken.Encoding`; pieces are shown in GPT-2's byte alphabet, as Hugging Face's converted files do."""

    def __init__(self, enc: Any, special_tokens: Mapping[str, int]):
        self.enc = enc
        self.special = dict(special_tokens)
        self.special_ids = set(self.special.values())
        self._special_by_id = {v: k for k, v in self.special.items()}
        self._ranks: dict[bytes, int] = enc._mergeable_ranks  # noqa: SLF001 - read-only use
        self._by_rank = {r: b for b, r in self._ranks.items()}

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all", disallowed_special=())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts = []
        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                if not skip_special_tokens:
                    parts.append(self._special_by_id[i].encode("utf-8"))
            elif i in self._by_rank:
                parts.append(self._by_rank[i])
        return b"".join(parts).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        if i in self._special_by_id:
            return self._special_by_id[i]
        raw = self._by_rank.get(i)
        return None if raw is None else "".join(gguf_vocab.BYTE_ENCODER[b] for b in raw)

    def token_to_id(self, piece: str) -> int | None:
        if piece in self.special:
            return self.special[piece]
        try:
            raw = bytes(gguf_vocab.BYTE_DECODER[c] for c in piece)
        except KeyError:
            raw = piece.encode("utf-8")
        return self._ranks.get(raw)

    def vocab_size(self) -> int:
        return self.enc.n_vocab
