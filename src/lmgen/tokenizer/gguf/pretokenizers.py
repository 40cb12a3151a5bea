"""The pre-tokenizer regexes of byte-level (gpt2) GGUF vocabularies, by `tokenizer.ggml.pre` value.
A table of data kept apart from the code that builds the tokenizer from it."""

from __future__ import annotations

from dataclasses import dataclass

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


GPT2_SPEC = PreTokenizerSpec((_GPT2,))
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
    "default": GPT2_SPEC,
    "gpt2": GPT2_SPEC,
    "gpt-2": GPT2_SPEC,
    "phi-2": GPT2_SPEC,
    "mpt": GPT2_SPEC,
    "olmo": GPT2_SPEC,
    "jais": GPT2_SPEC,
    "roberta-bpe": GPT2_SPEC,
    "exaone4": GPT2_SPEC,
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
