"""A request's output as the routes see it: accumulated per-sequence text / tokens / logprobs, per-token
text and bytes for logprobs, and which logprob entries belong to the visible text (an ending EOS does not)."""

from __future__ import annotations

import functools
import re

from lmgen.engine.request import StepOutput


# ---- token text for logprobs -------------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenText:
    """Per-token strings and raw bytes (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        from lmgen.tokenizer.gguf_vocab import BYTE_DECODER

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


# ---- one sequence's accumulated output ---------------------------------------------------------------
class _Seq:
    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_output_tokens = 0
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs = None

    def add(self, so: StepOutput) -> None:
        snap = so.request
        self.text.append(so.delta_text)
        self.token_ids.extend(so.new_token_ids)
        if snap.logprobs:
            self.logprobs.extend(snap.logprobs)
        if snap.prompt_logprobs is not None:
            self.prompt_logprobs = snap.prompt_logprobs
        self.num_output_tokens = snap.num_output_tokens
        self.num_prompt_tokens = snap.num_prompt_tokens
        self.num_cached_tokens = snap.num_cached_tokens
        if so.finished:
            self.finish_reason, self.stop_reason = so.finish_reason, snap.stop_reason


def _visible(token_ids: list[int], entries: list[dict[int, float]], finished_by_token: bool) -> list[tuple[int, dict[int, float]]]:
    """Logprob entries of the tokens that belong to the text: an EOS / stop token that ended the
    sequence is not part of it (OpenAI does not report it)."""
    pairs = list(zip(token_ids, entries))
    if finished_by_token and pairs:
        pairs = pairs[:-1]
    return pairs


def _ended_by_token(so_finish: str | None, stop_reason) -> bool:
    return so_finish == "stop" and not isinstance(stop_reason, str)


def _step_logprob_pairs(so: StepOutput, k: int | None) -> list[tuple[int, dict[int, float]]]:
    """This step's (token, logprobs) pairs a streaming client sees; empty when logprobs were not asked for."""
    if k is None or not so.request.logprobs:
        return []
    ended = so.finished and _ended_by_token(so.finish_reason, so.request.stop_reason)
    return _visible(so.new_token_ids, so.request.logprobs, ended)
