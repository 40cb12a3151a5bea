"""Per-request sampling parameters (mirrors vLLM's ``SamplingParams``).

Every field is validated in ``__post_init__``; a bad value raises ``ValueError``
whose message names the field and the offending value, e.g.
``"top_p must be in (0, 1], got 1.5"``.  Types are checked too: numbers must be
real ``int``/``float`` values (``bool`` is rejected where a number is
expected), so ``temperature="hot"`` is a ``ValueError`` as well.

Normalisations done at construction:

* ``stop``: ``None`` -> ``[]``, a single string -> ``[string]``.
* ``stop_token_ids``: ``None`` -> ``[]``.
* ``logit_bias``: keys may be ``int`` or decimal strings (as OpenAI JSON sends
  them); they are converted to ``int``; values to ``float``.
* float fields given as ``int`` are converted to ``float``.

Semantics of the less obvious fields:

* ``temperature == 0`` means greedy decoding (argmax after penalties, logit
  bias and min_tokens suppression).
* ``top_k`` of ``0`` or ``-1`` disables top-k.
* ``repetition_penalty`` follows Hugging Face transformers
  (``RepetitionPenaltyLogitsProcessor``) over prompt + output tokens:
  a seen token's logit ``l`` becomes ``l * p`` if ``l < 0`` else ``l / p``.
* ``presence_penalty`` / ``frequency_penalty`` follow OpenAI over the output
  tokens only: ``l -= presence * (count > 0) + frequency * count``.
* ``min_tokens``: EOS and ``stop_token_ids`` are suppressed until this many
  tokens have been generated.
* ``logprobs``: number of top log-probabilities reported at each generated
  step (0 = only the chosen token's), from the model's raw distribution.
* ``beam_width > 1`` selects beam search (deterministic, over the model's raw
  log-probs: temperature, top-k/p, min-p, penalties, logit_bias, min_tokens and
  logprobs must stay off, or it is a ValueError); ``n`` must not exceed
  ``beam_width``.  ``length_penalty`` and ``early_stopping`` (``True``,
  ``False`` or ``"never"``) have Hugging Face transformers semantics.
* ``structured``: a ``StructuredOutput`` (JSON object, JSON Schema, regex,
  choice or grammar) the output must match, enforced token by token (a mask
  after min_tokens, before temperature); not with beam search.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Union

from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import StructuredOutput

__all__ = ["SamplingParams", "PRESETS", "MAX_LOGPROBS"]

#: Largest number of top log-probabilities a request may ask for (as OpenAI).
MAX_LOGPROBS = 20

#: Named presets for ``SamplingParams.from_preset``.  Each maps to keyword
#: arguments of ``SamplingParams``; every field not named keeps its default.
PRESETS: dict[str, dict[str, Any]] = {
    # "precise": near-deterministic, for factual answers, code and extraction.
    # Low temperature sharpens the distribution; top_p 0.9 cuts the long tail
    # so that an unlucky low-probability token is never drawn.
    "precise": {"temperature": 0.2, "top_p": 0.9},
    # "balanced": general chat.  Moderate temperature with the classic
    # top_k 40 / top_p 0.9 pair (llama.cpp-style defaults).
    "balanced": {"temperature": 0.7, "top_p": 0.9, "top_k": 40},
    # "creative": stories and brainstorming.  The model's own distribution
    # (temperature 1.0) with a wide nucleus; min_p 0.05 drops tokens that are
    # less than 5% as likely as the best one, which keeps high-temperature
    # text coherent.
    "creative": {"temperature": 1.0, "top_p": 0.95, "min_p": 0.05},
}


# options beam search cannot honour, with the values that mean "off"
_BEAM_IGNORES = {"temperature": (0.0, 1.0), "top_k": (0, -1), "top_p": (1.0,), "min_p": (0.0,), "repetition_penalty": (1.0,),
                 "presence_penalty": (0.0,), "frequency_penalty": (0.0,), "logit_bias": (None, {}), "min_tokens": (0,),
                 "logprobs": (None,), "prompt_logprobs": (None,)}


def _fail(name: str, requirement: str, value: Any) -> None:
    raise InvalidRequestError(f"{name} must be {requirement}, got {value!r}", param=name, value=value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool))


@dataclass
class SamplingParams:
    """Sampling parameters for one request.  See the module docstring."""

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, Literal["never"]] = False
    structured: StructuredOutput | None = None

    # ------------------------------------------------------------------ checks
    def _float(self, name: str) -> float:
        value = getattr(self, name)
        if not _is_real(value):
            _fail(name, "a number", value)
        value = float(value)
        if not math.isfinite(value):
            _fail(name, "finite", value)
        setattr(self, name, value)
        return value

    def _int(self, name: str, optional: bool = False) -> int | None:
        value = getattr(self, name)
        if value is None and optional:
            return None
        if not _is_int(value):
            _fail(name, "an integer" + (" or None" if optional else ""), value)
        return value

    def _bool(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, bool):
            _fail(name, "a bool", value)

    def __post_init__(self) -> None:
        n = self._int("n")
        if n < 1:
            _fail("n", "at least 1", n)

        max_tokens = self._int("max_tokens", optional=True)
        if max_tokens is not None and max_tokens < 1:
            _fail("max_tokens", "at least 1 (or None)", max_tokens)

        temperature = self._float("temperature")
        if temperature < 0:
            _fail("temperature", "non-negative", temperature)

        top_k = self._int("top_k")
        if top_k < -1:
            _fail("top_k", "-1 or 0 (disabled) or at least 1", top_k)

        top_p = self._float("top_p")
        if not 0.0 < top_p <= 1.0:
            _fail("top_p", "in (0, 1]", top_p)

        min_p = self._float("min_p")
        if not 0.0 <= min_p <= 1.0:
            _fail("min_p", "in [0, 1]", min_p)

        repetition_penalty = self._float("repetition_penalty")
        if repetition_penalty <= 0:
            _fail("repetition_penalty", "greater than 0", repetition_penalty)

        for name in ("presence_penalty", "frequency_penalty"):
            value = self._float(name)
            if not -2.0 <= value <= 2.0:
                _fail(name, "in [-2, 2]", value)

        self._check_logit_bias()

        min_tokens = self._int("min_tokens")
        if min_tokens < 0:
            _fail("min_tokens", "non-negative", min_tokens)
        if max_tokens is not None and min_tokens > max_tokens:
            _fail("min_tokens", f"at most max_tokens ({max_tokens})", min_tokens)

        seed = self._int("seed", optional=True)
        if seed is not None and not -(2**63) <= seed < 2**64:
            _fail("seed", "in [-2**63, 2**64)", seed)

        for name in ("logprobs", "prompt_logprobs"):
            value = self._int(name, optional=True)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                _fail(name, f"in [0, {MAX_LOGPROBS}] (or None)", value)

        self._check_stop()
        self._check_stop_token_ids()

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            self._bool(name)

        beam_width = self._int("beam_width")
        if beam_width < 1:
            _fail("beam_width", "at least 1", beam_width)
        if beam_width > 1 and n > beam_width:
            _fail("n", f"at most beam_width ({beam_width}) with beam search", n)
        if beam_width > 1:  # beams rank the model's raw log-probs: a sampling option would be silently ignored
            for name, off in _BEAM_IGNORES.items():
                value = getattr(self, name)
                if value not in off:
                    raise InvalidRequestError(f"{name} must be left at its default with beam search (beam_width > 1), "
                                              f"got {value!r}", param=name, value=value)

        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            _fail("structured", "a StructuredOutput or None", self.structured)
        if self.structured is not None and beam_width > 1:
            raise InvalidRequestError("structured output is not supported with beam search (beam_width > 1)",
                                      param="structured", value=beam_width)

        self._float("length_penalty")
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            _fail("early_stopping", 'True, False or "never"', self.early_stopping)

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            _fail("logit_bias", "a dict {token_id: bias} or None", bias)
        normalised: dict[int, float] = {}
        for key, value in bias.items():
            token = key
            if isinstance(key, str) and key.strip().lstrip("+").isdigit():
                token = int(key)
            if not _is_int(token) or token < 0:
                _fail("logit_bias", "keyed by non-negative token ids", key)
            if not _is_real(value) or not math.isfinite(float(value)):
                _fail("logit_bias", f"finite numbers (token {token})", value)
            if not -100.0 <= float(value) <= 100.0:
                _fail("logit_bias", f"in [-100, 100] (token {token})", value)
            normalised[token] = float(value)
        self.logit_bias = normalised

    def _check_stop(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif isinstance(stop, (list, tuple)):
            stop = list(stop)
        else:
            _fail("stop", "a string, a list of strings or None", stop)
        for s in stop:
            if not isinstance(s, str) or s == "":
                _fail("stop", "made of non-empty strings", s)
        self.stop = stop

    def _check_stop_token_ids(self) -> None:
        ids = self.stop_token_ids
        if ids is None:
            ids = []
        elif isinstance(ids, (list, tuple, set, frozenset)):
            ids = list(ids)
        else:
            _fail("stop_token_ids", "a list of token ids or None", ids)
        for t in ids:
            if not _is_int(t) or t < 0:
                _fail("stop_token_ids", "made of non-negative integers", t)
        self.stop_token_ids = ids

    # ------------------------------------------------------------- helpers
    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic: temperature 0 or beam search."""
        return self.temperature == 0.0 or self.beam_width > 1

    @property
    def use_beam_search(self) -> bool:
        return self.beam_width > 1

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SamplingParams":
        """Parameters of a named preset (see ``PRESETS``), with ``overrides``."""
        if name not in PRESETS:
            raise InvalidRequestError(f"unknown sampling preset {name!r}; available presets: {', '.join(sorted(PRESETS))}",
                                      param="preset", value=name)
        return cls(**{**PRESETS[name], **overrides})
