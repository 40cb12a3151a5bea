"""Logprobs as the routes show them: per-token text and bytes, and which logprob entries belong to the
visible text (an EOS / stop token that ended a sequence does not)."""

from __future__ import annotations

import functools
import re

from lmgen.engine.outputs import Logprobs, StepOutput


# ---- token text for logprobs -------------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenText:
    """Per-token strings and raw bytes (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        from lmgen.tokenizer.gguf.bpe import BYTE_DECODER

        self._byte_decoder = BYTE_DECODER
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _bytes(self, tid: int) -> list[int]:
        text = self._text(tid)
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        piece = self.tokenizer.convert_ids_to_tokens([tid])[0]
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        if piece and all(c in self._byte_decoder for c in piece):  # GPT-2 byte alphabet
            return [self._byte_decoder[c] for c in piece]
        return list(text.encode("utf-8"))


# ---- which logprob entries are visible ---------------------------------------------------------------
def visible_logprobs(token_ids, entries: list[Logprobs], finish_reason: str | None,
                     stop_reason: int | str | None) -> list[tuple[int, Logprobs]]:
    """(token, entry) pairs of the tokens that belong to the text: an EOS / stop token that ended the
    sequence is not part of it (OpenAI does not report it)."""
    pairs = list(zip(token_ids, entries))
    if finish_reason == "stop" and not isinstance(stop_reason, str) and pairs:
        pairs = pairs[:-1]
    return pairs


def step_logprob_pairs(so: StepOutput, k: int | None) -> list[tuple[int, Logprobs]]:
    """This step's (token, logprobs) pairs a streaming client sees; empty when logprobs were not asked for."""
    if k is None or not so.new_logprobs:
        return []
    return visible_logprobs(so.new_token_ids, list(so.new_logprobs), so.finish_reason, so.stop_reason)
