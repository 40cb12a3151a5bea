"""Text <-> token ids for lmgen, over the `tokenizers` library (or `tiktoken` for Llama 3's original files).

One class, `Tokenizer`, whatever the source:

* `Tokenizer.from_hf_folder(path)`: a Hugging Face folder (tokenizer.json, tokenizer_config.json,
  generation_config.json, chat_template.jinja ...); built in `lmgen.tokenizer.from_hf`.
* `Tokenizer.from_gguf(reader)`: the vocabulary stored in a GGUF file's metadata
  (see `lmgen.tokenizer.gguf.vocab`); built in `lmgen.tokenizer.from_gguf`.
* `Tokenizer.from_tiktoken(path, special_tokens, pattern)`: Llama 3's original `tokenizer.model`
  (one "base64-token rank" pair per line); built in `lmgen.tokenizer.from_tiktoken`.

Special-token text in the input (``"<|im_start|>"``) is encoded as that special token, as
transformers does. BOS is prepended by `encode(..., add_special_tokens=True)` iff the model asks for
it (`add_bos_token`). `eos_token_ids` collects *every* id that ends generation (see
`lmgen.tokenizer.special_tokens`). What actually encodes and decodes is in `lmgen.tokenizer.backends`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tokenizers

from lmgen.tokenizer.backends import TiktokenBackend, TokenizersBackend, byte_fallback_ids
from lmgen.tokenizer.from_gguf import gguf_tokenizer
from lmgen.tokenizer.from_hf import hf_folder_tokenizer
from lmgen.tokenizer.from_tiktoken import LLAMA3_PATTERN, llama3_special_tokens, tiktoken_tokenizer
from lmgen.tokenizer.special_tokens import eos_token_ids

__all__ = ["Tokenizer"]


class Tokenizer:
    """Text <-> token ids, over the `tokenizers` library (or tiktoken); knows the special tokens."""

    def __init__(
        self,
        backend: TokenizersBackend | TiktokenBackend,
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
            byte_fallback_ids(backend.tk) if type(backend) is TokenizersBackend else frozenset()
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

        eos = eos_token_ids(backend, eos_token_id, extra_eos_token_ids, self.all_special_ids)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        if self.eos_token_id is None and eos:
            self.eos_token_id = min(eos)

        templates = dict(chat_templates or {})
        if chat_template is not None:
            templates["default"] = chat_template
        self.chat_templates: dict[str, str] = templates
        self.chat_template: str | None = templates.get("default")

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
                "(llama3, llama3.1, llama2, chatml, mistral, gemma) or a Jinja template file"
            )
        from lmgen.tokenizer.chat_template.template import ChatTemplate

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
        return gguf_tokenizer(cls, reader)

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json (required), tokenizer_config.json, special_tokens_map.json,
        generation_config.json, chat_template.jinja / chat_template.json / additional_chat_templates/."""
        return hf_folder_tokenizer(cls, path)

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
        return tiktoken_tokenizer(
            cls,
            path,
            special_tokens,
            pattern,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            extra_eos_tokens=extra_eos_tokens,
            chat_template=chat_template,
            chat_templates=chat_templates,
        )
