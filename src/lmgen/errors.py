"""Errors shared across stages."""

from __future__ import annotations

from lmgen.loader.errors import ModelLoadError


class ContextOverflowError(ValueError):
    """A prompt (or the shortest history a chat can keep) does not fit the context window; the message and
    the attributes carry the numbers."""

    def __init__(self, message: str, *, needed: int | None = None, context_length: int | None = None,
                 prompt_tokens: int | None = None, max_tokens: int | None = None):
        super().__init__(message)
        self.needed = needed
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class ModelFormatError(ModelLoadError):
    """A model file holds a value that cannot be right (a count or length past the end of the file, a zero head
    count, a dimension that disagrees with another): refused when read, before anything is sized or looped by it.
    `key` names the value (a GGUF metadata key, a `GGUF.*` header field, a tensor name, or a config.json field),
    `value` is what the file holds, `offset` the byte of the file it was read at (None: not from a byte offset)."""

    def __init__(self, message: str, *, key: str, value: object, offset: int | None = None):
        super().__init__(message)
        self.key = key
        self.value = value
        self.offset = offset
