"""SpeculativeConfig: what `LLM(speculative={...})` / `--speculative` ask for, checked once (typed errors)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lmgen.errors import SpeculativeConfigError

METHODS = ("ngram", "draft", "self")
# k when not given, measured with benchmarks/spec_bench.py (benchmarks/RESULTS.md): n-gram proposals are copies of
# the input, accepted in long runs (k 8: 1.58x vs k 4: 1.38x on the rewrite task); the packed self-draft 6
DEFAULT_NUM_TOKENS = {"ngram": 8, "draft": 4, "self": 6}
MAX_NUM_TOKENS = 16  # a verification step scores k + 1 positions; beyond this acceptance never pays for it


@dataclass(frozen=True)
class SpeculativeConfig:
    """One engine's speculation settings.

    method: "ngram" (prompt lookup), "draft" (another model with the same vocabulary, `model`), or "self" (the
    target's own file loaded packed as the draft of a float target). num_tokens: tokens proposed per step (k; by
    default 8 for ngram, 6 for self, 4 for draft).
    Auto step-back (see README "Speculative decoding"): no speculation in a step whose batch has more than
    `max_batch` sequences; a request whose rolling acceptance falls under `min_acceptance` stops proposing for
    `cooldown` steps.
    """

    method: str
    num_tokens: int | None = None  # None: the method's default, DEFAULT_NUM_TOKENS
    model: str | None = None  # the draft model ("draft" only)
    ngram_max: int = 4  # n-gram: longest suffix matched
    ngram_min: int = 3  # n-gram: shortest suffix matched (measured: 1-2 token matches propose mostly rejected tokens)
    max_batch: int = 2
    min_acceptance: float = 0.25
    cooldown: int = 16

    @classmethod
    def parse(cls, value: Any) -> "SpeculativeConfig | None":
        """None / a dict / a SpeculativeConfig -> a checked config (None: no speculation)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise SpeculativeConfigError(f"speculative must be a dict like {{'method': 'ngram', 'num_tokens': 4}}, "
                                         f"got {type(value).__name__}", param="speculative", value=value)
        known = {f.name for f in fields(cls)}
        extra = sorted(set(value) - known)
        if extra:
            raise SpeculativeConfigError(f"unknown speculative option {extra[0]!r}; known: {', '.join(sorted(known))}",
                                         param=f"speculative.{extra[0]}", value=value[extra[0]])
        if "method" not in value:
            raise SpeculativeConfigError("speculative needs a 'method' (ngram, draft or self)", param="speculative.method")
        return cls(**value)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SpeculativeConfigError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}",
                                         param="speculative.method", value=self.method)
        if self.num_tokens is None:
            object.__setattr__(self, "num_tokens", DEFAULT_NUM_TOKENS[self.method])
        _int(self.num_tokens, "num_tokens", 1, MAX_NUM_TOKENS)
        _int(self.ngram_max, "ngram_max", 1, 64)
        _int(self.ngram_min, "ngram_min", 1, self.ngram_max)
        _int(self.max_batch, "max_batch", 1, 1 << 20)
        _int(self.cooldown, "cooldown", 0, 1 << 20)
        a = self.min_acceptance
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
            raise SpeculativeConfigError(f"speculative min_acceptance must be a number in [0, 1], got {a!r}",
                                         param="speculative.min_acceptance", value=a)
        if self.method == "draft" and not isinstance(self.model, str):
            raise SpeculativeConfigError(f"speculative method 'draft' needs 'model' (a path or name), got {self.model!r}",
                                         param="speculative.model", value=self.model)
        if self.method != "draft" and self.model is not None:
            raise SpeculativeConfigError(f"speculative 'model' ({self.model!r}) applies to method 'draft' only (method is {self.method!r})",
                                         param="speculative.model", value=self.model)


def _int(value: Any, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SpeculativeConfigError(f"speculative {name} must be an integer in [{low}, {high}], got {value!r}",
                                     param=f"speculative.{name}", value=value)
