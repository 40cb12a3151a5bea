"""Text <-> token ids for lmgen, over the `tokenizers` library (or `tiktoken` for Llama 3's original files).

One class, `Tokenizer`, whatever the source:

* `Tokenizer.from_hf_folder(path)`: a Hugging Face folder (tokenizer.json, tokenizer_config.json,
  generation_config.json, chat_template.jinja ...).
* `Tokenizer.from_gguf(reader)`: the vocabulary stored in a GGUF file's metadata
  (see `lmgen.tokenizer.gguf_vocab`).
* `Tokenizer.from_tiktoken(path, special_tokens, pattern)`: Llama 3's original `tokenizer.model`
  (one "base64-token rank" pair per line).

Special-token text in the input (``"<|im_start|>"``) is encoded as that special token, as
transformers does. BOS is prepended by `encode(..., add_special_tokens=True)` iff the model asks for
it (`add_bos_token`). `eos_token_ids` collects *every* id that ends generation.
"""

from __future__ import annotations

import base64
import codecs
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

from lmgen.tokenizer import gguf_vocab

logger = logging.getLogger(__name__)

# Texts of the tokens that end a turn or a document in the chat formats we know. Those present in a
# vocabulary as special (control) tokens count as EOS, whatever the metadata says (as llama.cpp does).
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML (Qwen, SmolLM, ...)
    "<|eot_id|>",  # Llama 3 end of turn
    "<|eom_id|>",  # Llama 3.1 end of message (tool call)
    "<|end_of_text|>",  # Llama 3 end of document
    "</s>",  # Llama 2 / Mistral
    "<|endoftext|>",  # GPT-2 style end of document
    "<|end|>",  # Phi-3
    "<end_of_turn>",  # Gemma
    "<|return|>",  # gpt-oss
    "<|call|>",  # gpt-oss
    "<EOT>",  # CodeLlama infill
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "<end_of_utterance>",  # SmolVLM
)

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


# --- backends: what actually encodes and decodes ----------------------------------------------------


class _TokenizersBackend:
    """A `tokenizers.Tokenizer`, used without its post-processor (Tokenizer adds BOS/EOS itself)."""

    def __init__(self, tk: tokenizers.Tokenizer, special_ids: Iterable[int] = ()):
        self.tk = tk
        self.special_ids = {t_id for t_id, tok in tk.get_added_tokens_decoder().items() if tok.special}
        self.special_ids |= set(special_ids)
        # Ids the tokenizers library itself treats as special (skipped by decode(skip_special_tokens)).
        self._lib_special = {t_id for t_id, tok in tk.get_added_tokens_decoder().items() if tok.special}

    def encode(self, text: str) -> list[int]:
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


class _SentencePieceBackend(_TokenizersBackend):
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


def _spm_decoder_strip(tk: tokenizers.Tokenizer) -> bool | None:
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


def _byte_fallback_ids(tk: tokenizers.Tokenizer) -> frozenset[int]:
    """Ids of ``<0xNN>`` tokens when the decoder uses tokenizers' ByteFallback (see _SentencePieceBackend)."""
    if "ByteFallback" not in json.dumps(_decoder_json(tk)):
        return frozenset()
    ids = (tk.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


class _TiktokenBackend:
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


# --- the tokenizer ----------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    return str(value)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """Text <-> token ids, over the `tokenizers` library (or tiktoken); knows the special tokens."""

    def __init__(
        self,
        backend: _TokenizersBackend | _TiktokenBackend,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        prefix_ids: Sequence[int] | None = None,
        suffix_ids: Sequence[int] | None = None,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
        name: str = "",
    ):
        self._backend = backend
        self.name = name
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.vocab_size = int(vocab_size if vocab_size is not None else backend.vocab_size())
        # Ids whose text can still change with the tokens that follow them (byte tokens under tokenizers'
        # ByteFallback decoder): a streaming detokenizer holds text back while the last id is one of these.
        self.stream_hold_ids: frozenset[int] = (
            _byte_fallback_ids(backend.tk) if type(backend) is _TokenizersBackend else frozenset()
        )

        # What encode(add_special_tokens=True) puts around the text.
        if prefix_ids is None:
            prefix_ids = [bos_token_id] if add_bos_token and bos_token_id is not None else []
        if suffix_ids is None:
            suffix_ids = [eos_token_id] if add_eos_token and eos_token_id is not None else []
        self._prefix_ids = [int(i) for i in prefix_ids]
        self._suffix_ids = [int(i) for i in suffix_ids]
        self.add_bos_token = bos_token_id is not None and bos_token_id in self._prefix_ids
        self.add_eos_token = eos_token_id is not None and eos_token_id in self._suffix_ids

        named = {i for i in (bos_token_id, eos_token_id, pad_token_id, unk_token_id) if i is not None}
        backend.special_ids |= named
        self.all_special_ids: set[int] = set(backend.special_ids)

        extra_eos = [int(i) for i in extra_eos_token_ids if i is not None]
        eos = set(extra_eos)
        if eos_token_id is not None:
            eos.add(eos_token_id)
        for text in END_OF_TURN_TOKENS:
            t_id = backend.token_to_id(text)
            if t_id is not None and t_id in self.all_special_ids:
                eos.add(t_id)
        if "<|return|>" in self._special_texts() and "<|end|>" in self._special_texts():
            # gpt-oss (harmony): <|end|> closes a message, generation goes on (llama.cpp does the same)
            end_id = backend.token_to_id("<|end|>")
            if end_id != eos_token_id and end_id not in extra_eos:
                eos.discard(end_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        if self.eos_token_id is None and eos:
            self.eos_token_id = min(eos)

        templates = dict(chat_templates or {})
        if chat_template is not None:
            templates["default"] = chat_template
        self.chat_templates: dict[str, str] = templates
        self.chat_template: str | None = templates.get("default")

    def _special_texts(self) -> set[str]:
        return {t for t in (self._backend.id_to_token(i) for i in self._backend.special_ids) if t is not None}

    # -- special token texts ------------------------------------------------------------------------

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self._piece(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._piece(self.eos_token_id)

    @property
    def pad_token(self) -> str | None:
        return self._piece(self.pad_token_id)

    @property
    def unk_token(self) -> str | None:
        return self._piece(self.unk_token_id)

    @property
    def backend_tokenizer(self) -> tokenizers.Tokenizer | None:
        """The underlying `tokenizers.Tokenizer` (None for a tiktoken file)."""
        return getattr(self._backend, "tk", None)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, eos_ids={sorted(self.eos_token_ids)}, add_bos={self.add_bos_token})"
        )

    # -- text <-> ids --------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text in it ("<|im_start|>") becomes that token. With
        `add_special_tokens`, BOS is prepended iff the model asks for it (and EOS appended iff it asks)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._backend.encode(text)
        if add_special_tokens:
            return self._prefix_ids + ids + self._suffix_ids
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence shows as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int] | int) -> list[str]:
        """The raw vocabulary pieces ("Ġhello", "▁the", "<0x0A>", "<|im_end|>")."""
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            piece = self._backend.id_to_token(int(i))
            if piece is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(piece)
        return out

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    def is_special(self, token_id: int) -> bool:
        return int(token_id) in self.all_special_ids

    # -- chat templates ------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template, or with `chat_template`: the name of one of
        the model's named templates, a built-in name ("llama3", "llama2", "chatml", "mistral"), a file,
        or Jinja source. With `tokenize`, the ids (no BOS added: the template writes it)."""
        if chat_template is None and self.chat_template is None:
            raise ValueError(
                f"this model ({self.name or 'tokenizer'}) has no chat template; pass --chat-template NAME "
                "(llama3, llama2, chatml, mistral) or a Jinja template file"
            )
        from lmgen.tokenizer.chat_template import ChatTemplate

        if chat_template is None:
            template = ChatTemplate(self.chat_template, bos_token=self.bos_token, eos_token=self.eos_token)
        elif chat_template in self.chat_templates:
            template = ChatTemplate(
                self.chat_templates[chat_template], bos_token=self.bos_token, eos_token=self.eos_token
            )
        else:
            template = ChatTemplate.resolve(chat_template, bos_token=self.bos_token, eos_token=self.eos_token)
        text = template.render(list(messages), add_generation_prompt=add_generation_prompt, **template_kwargs)
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    # -- constructors --------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader: Any) -> Tokenizer:  # gguf.GGUFReader | str | PathLike | GGUFVocab
        """Build the tokenizer from the vocabulary in a GGUF file: a `gguf.GGUFReader`, a path, or the
        `gguf_vocab.GGUFVocab` already read from one."""
        vocab = reader if isinstance(reader, gguf_vocab.GGUFVocab) else gguf_vocab.read_gguf_vocab(reader)
        tk = gguf_vocab.build_tokenizer(vocab)
        if vocab.model == "llama":
            strip = True if vocab.add_space_prefix is None else vocab.add_space_prefix
            backend: _TokenizersBackend = _SentencePieceBackend(tk, gguf_vocab.special_token_ids(vocab), strip)
        else:
            backend = _TokenizersBackend(tk, gguf_vocab.special_token_ids(vocab))
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
            chat_template=vocab.chat_template,
            chat_templates=vocab.chat_templates,
            vocab_size=len(vocab.tokens),
            name=os.path.basename(vocab.source),
        )

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json (required), tokenizer_config.json, special_tokens_map.json,
        generation_config.json, chat_template.jinja / chat_template.json / additional_chat_templates/."""
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"{folder}: not a folder")
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{tj}: no tokenizer.json in this folder (lmgen needs the fast-tokenizer file)")
        try:
            tk = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{tj}: cannot be loaded: {e}") from None

        config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        special_map = (
            _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        )
        gen = (
            _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        )

        # Added tokens declared in the config but missing from tokenizer.json.
        for id_str, info in sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            content = info.get("content")
            if not content or tk.token_to_id(content) is not None:
                continue
            token = AddedToken(
                content,
                special=bool(info.get("special", True)),
                normalized=bool(info.get("normalized", False)),
                lstrip=bool(info.get("lstrip", False)),
                rstrip=bool(info.get("rstrip", False)),
                single_word=bool(info.get("single_word", False)),
            )
            (tk.add_special_tokens if token.special else tk.add_tokens)([token])
            if tk.token_to_id(content) != int(id_str):
                logger.warning("%s: added token %r got id %s, not %s", folder, content, tk.token_to_id(content), id_str)

        def special(name: str) -> int | None:
            content = _token_content(config.get(name)) or _token_content(special_map.get(name))
            if content is None:
                return None
            t_id = tk.token_to_id(content)
            if t_id is None:
                tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])
                t_id = tk.token_to_id(content)
            return t_id

        bos_id, eos_id = special("bos_token"), special("eos_token")
        pad_id, unk_id = special("pad_token"), special("unk_token")
        extras = config.get("extra_special_tokens") or []
        if isinstance(extras, dict):
            extras = list(extras.values())
        for extra in list(config.get("additional_special_tokens") or []) + list(extras):
            content = _token_content(extra)
            if content and tk.token_to_id(content) is None:
                tk.add_special_tokens([AddedToken(content, special=True, normalized=False)])

        gen_eos = gen.get("eos_token_id")
        gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else [int(i) for i in (gen_eos or [])]
        if bos_id is None and isinstance(gen.get("bos_token_id"), int):
            bos_id = gen["bos_token_id"]
        if eos_id is None and gen_eos_ids:
            eos_id = gen_eos_ids[0]
        if pad_id is None and isinstance(gen.get("pad_token_id"), int):
            pad_id = gen["pad_token_id"]

        # What encode(add_special_tokens=True) adds: tokenizer_config's flags when it has them (transformers
        # rebuilds the post-processor from them), else whatever tokenizer.json's post-processor adds.
        plain = tk.encode("a", add_special_tokens=False).ids
        full = tk.encode("a", add_special_tokens=True).ids
        prefix_ids, suffix_ids = _split_around(full, plain)
        if "add_bos_token" in config:
            prefix_ids = [bos_id] if config["add_bos_token"] and bos_id is not None else []
        if "add_eos_token" in config:
            suffix_ids = [eos_id] if config["add_eos_token"] and eos_id is not None else []
        tk.post_processor = None

        chat_template, named = _hf_chat_templates(folder, config)
        strip = _spm_decoder_strip(tk)
        backend = _TokenizersBackend(tk) if strip is None else _SentencePieceBackend(tk, (), strip)
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            extra_eos_token_ids=gen_eos_ids,
            pad_token_id=pad_id,
            unk_token_id=unk_id,
            prefix_ids=prefix_ids,
            suffix_ids=suffix_ids,
            chat_template=chat_template,
            chat_templates=named,
            name=folder.name,
        )

    @classmethod
    def from_tiktoken(
        cls,
        path: str | os.PathLike,
        special_tokens: Mapping[str, int] | None = None,
        pattern: str = LLAMA3_PATTERN,
        *,
        bos_token: str | None = "<|begin_of_text|>",
        eos_token: str | None = "<|end_of_text|>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        extra_eos_tokens: Iterable[str] = ("<|eot_id|>", "<|eom_id|>"),
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
    ) -> Tokenizer:
        """Llama 3's original `tokenizer.model`: one "base64(token bytes) rank" pair per line.

        `special_tokens` defaults to Llama 3's (`llama3_special_tokens(number of ranks)`); bos/eos/pad
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
        backend = _TiktokenBackend(enc, special_tokens)

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


def _split_around(full: list[int], plain: list[int]) -> tuple[list[int], list[int]]:
    """The ids a post-processor put before and after `plain` in `full`."""
    n = len(plain)
    for start in range(len(full) - n + 1):
        if full[start : start + n] == plain:
            return full[:start], full[start + n :]
    return [], []


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> tuple[str | None, dict[str, str]]:
    """(default template, named templates) from chat_template.jinja / .json, additional_chat_templates/ and
    tokenizer_config.json's `chat_template` (a string, or a list of {name, template})."""
    default: str | None = None
    named: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        default = raw
    elif isinstance(raw, list):
        for item in raw:
            if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str):
                named[item["name"]] = item["template"]
        default = named.pop("default", None)
    if (folder / "chat_template.json").is_file():
        data = _read_json(folder / "chat_template.json")
        if isinstance(data.get("chat_template"), str):
            default = data["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        default = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            named[file.stem] = file.read_text(encoding="utf-8")
    return default, named
