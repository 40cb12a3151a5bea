"""Which token ids end generation: the named EOS, the extra ones a source lists, and the end-of-turn
tokens of the chat formats we know. One policy for every tokenizer source (as llama.cpp does)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmgen.tokenizer.backends import TiktokenBackend, TokenizersBackend

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


def special_texts(backend: TokenizersBackend | TiktokenBackend) -> set[str]:
    """The texts of the backend's special tokens."""
    return {t for t in (backend.id_to_token(i) for i in backend.special_ids) if t is not None}


def eos_token_ids(
    backend: TokenizersBackend | TiktokenBackend,
    eos_token_id: int | None,
    extra_eos_token_ids: Iterable[int],
    all_special_ids: set[int],
) -> set[int]:
    """Every id that ends generation: `eos_token_id`, `extra_eos_token_ids`, and the special tokens among
    END_OF_TURN_TOKENS (but not gpt-oss's <|end|>, which closes a message without ending generation)."""
    extra_eos = [int(i) for i in extra_eos_token_ids if i is not None]
    eos = set(extra_eos)
    if eos_token_id is not None:
        eos.add(eos_token_id)
    for text in END_OF_TURN_TOKENS:
        t_id = backend.token_to_id(text)
        if t_id is not None and t_id in all_special_ids:
            eos.add(t_id)
    if "<|return|>" in special_texts(backend) and "<|end|>" in special_texts(backend):
        # gpt-oss (harmony): <|end|> closes a message, generation goes on (llama.cpp does the same)
        end_id = backend.token_to_id("<|end|>")
        if end_id != eos_token_id and end_id not in extra_eos:
            eos.discard(end_id)
    return eos
