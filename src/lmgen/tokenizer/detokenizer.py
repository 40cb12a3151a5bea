"""Streaming detokenization: a growing list of token ids -> text deltas that are safe to show.

Safe means: never half a UTF-8 character (a character split over several byte tokens is held back
until it is whole) and never any part of a stop string (text that might be the start of a stop
string is held back until it either completes -- then it and everything after it is dropped -- or
is ruled out).

Decoding a token on its own is wrong for most tokenizers (SentencePiece drops the leading space of
the first token of a decode, byte tokens need their neighbours), so each step decodes a short window
of ids twice, from a *prefix offset*: once up to the *read offset* (the text already accounted for)
and once to the end; the new text is what the second adds to the first (the technique of
Hugging Face's text-generation-inference and vLLM). The offsets only advance once the window decodes
without a trailing U+FFFD, i.e. once the last character is complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
# How many prompt tokens to decode in front of the first generated one (enough for a SentencePiece
# word boundary or a multi-byte character; the window itself is never longer than what is pending).
_PROMPT_CONTEXT = 8


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are safe to show: never half a UTF-8
    character, never any part of a stop string.

    The concatenation of every delta returned by `add_tokens` and `flush` equals `output_text`, which
    equals ``tokenizer.decode(ids, skip_special_tokens)`` cut before the first stop string to occur
    (the one that completes first; on a tie, the one that starts first). With `prompt_token_ids`, the
    last few prompt tokens are decoded in front as context, so the first generated token gets its
    leading space as it would in the middle of the text; the output is then
    ``decode(prompt + ids)`` minus ``decode(prompt)`` (and when the prompt ends inside a character
    that the output completes, that character is output whole).
    """

    def __init__(
        self,
        tokenizer: Any,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        prompt_token_ids: Sequence[int] = (),
    ):
        if isinstance(stop, str):
            stop = (stop,)
        self.tokenizer = tokenizer
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.skip_special_tokens = skip_special_tokens
        self._hold_ids: frozenset[int] = frozenset(getattr(tokenizer, "stream_hold_ids", ()) or ())

        n = _PROMPT_CONTEXT + 8
        try:
            tail = list(prompt_token_ids[-n:])  # type: ignore[index]
        except TypeError:  # not sliceable
            tail = list(prompt_token_ids)[-n:]
        context, read, skip = self._prompt_context([int(i) for i in tail])
        self._ids: list[int] = context  # context + generated ids (only the part still needed is kept)
        self._skip_chars = skip  # prompt text inside the pending context tokens, not to be output again
        self._prefix_offset = 0
        self._read_offset = read
        self.token_ids: list[int] = []  # every generated id

        self._text = ""  # decoded output so far (complete characters only), cut at a stop string
        self._released = 0  # how many characters of _text have been handed out
        self.stop_string: str | None = None
        self.finished = False

    # -- public ---------------------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """All text decoded so far: released plus held back (excludes an incomplete trailing character)."""
        return self._text

    @property
    def output_text(self) -> str:
        """The final text (after `flush`, or once a stop string hit): the stop string is not included."""
        return self._text

    @property
    def released_text(self) -> str:
        return self._text[: self._released]

    def add_tokens(self, token_ids: Sequence[int] | int) -> str:
        """Feed newly generated ids; returns the text that can now be shown ("" if none yet)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if self.finished:
            return ""
        token_ids = [int(i) for i in token_ids]
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        self._ids.extend(token_ids)
        return self._emit(self._decode_step(final=False), final=False)

    def flush(self) -> str:
        """End of generation (EOS, length limit): release everything held back. After it, `output_text`
        equals the non-incremental decode (cut at a stop string)."""
        if self.finished:
            return ""
        delta = self._emit(self._decode_step(final=True), final=True)
        self.finished = True
        return delta

    def _prompt_context(self, prompt: list[int]) -> tuple[list[int], int, int]:
        """The last prompt tokens to decode in front of the output; how many of them are read (the rest
        end inside a character the output will complete); how many characters of the prompt's text the
        unread ones hold (a token can hold a whole character and the start of the next)."""
        if not prompt:
            return [], 0, 0
        # The context must start on a character boundary: its text has to be the end of the prompt's.
        reference = self._decode(prompt[-(_PROMPT_CONTEXT + 8) :])
        first = max(0, len(prompt) - _PROMPT_CONTEXT)
        for start in range(first, max(-1, first - 5), -1):
            if reference.endswith(self._decode(prompt[start:])):
                context = prompt[start:]
                break
        else:
            return [], 0, 0
        # A prompt that ends inside a character: its last tokens stay pending, so that the character
        # is output whole once the generated tokens complete it (a character is at most 4 bytes).
        read = len(context)
        while read > 0 and len(context) - read < 4 and self._decode(context[:read]).endswith(_REPLACEMENT):
            read -= 1
        if read > 0 and self._decode(context[:read]).endswith(_REPLACEMENT):
            return [], 0, 0  # invalid bytes at the end of the prompt: decode the output on its own
        skip = 0
        if read < len(context):
            shown = self._decode(context).rstrip(_REPLACEMENT)
            skip = max(0, len(shown) - len(self._decode(context[:read])))
        return context, read, skip

    # -- internals ------------------------------------------------------------------------------------

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_step(self, final: bool) -> str:
        """The new complete text the pending ids add (at the end: all of it, U+FFFD included)."""
        if len(self._ids) == self._read_offset:
            return ""
        if not final and self._ids[-1] in self._hold_ids:
            return ""  # a run of byte tokens whose rendering depends on how it ends
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            # Nothing visible yet (a skipped special token), or the last character is incomplete.
            return ""
        # Tokenizers' decoders are prefix-stable once the window starts on a character boundary, so the
        # window's text starts with prefix_text.
        delta = new_text[len(prefix_text) :]
        if self._skip_chars:
            cut = min(self._skip_chars, len(delta))
            delta, self._skip_chars = delta[cut:], self._skip_chars - cut
        # Advance, and drop ids no later window needs.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _emit(self, delta: str, final: bool) -> str:
        """Append `delta` to the text, look for stop strings, and return what is now safe to show."""
        if delta:
            search_from = max(0, len(self._text) - self._max_stop + 1)
            self._text += delta
            if self.stop:
                hit = self._find_stop(search_from)
                if hit is not None:
                    start, stop = hit
                    self._text = self._text[:start]
                    self.stop_string = stop
                    self.finished = True
                    out = self._text[self._released :]
                    self._released = len(self._text)
                    return out
        hold = 0 if final else self._held_suffix()
        end = len(self._text) - hold
        if end <= self._released:
            return ""
        out = self._text[self._released : end]
        self._released = end
        return out

    def _find_stop(self, search_from: int) -> tuple[int, str] | None:
        """The stop string occurrence (start, string) that completes first at or after `search_from`."""
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            i = self._text.find(s, search_from)
            if i >= 0:
                key = (i + len(s), i, s)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_suffix(self) -> int:
        """Length of the longest unreleased suffix of the text that is the start of a stop string."""
        if not self.stop:
            return 0
        text = self._text
        longest = min(self._max_stop - 1, len(text) - self._released)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
