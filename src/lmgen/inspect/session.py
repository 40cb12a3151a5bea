"""An inspection session: a prompt, the steps generated from it, and for each step the model's raw logits, kept so
that a change of the sampling controls re-filters a step without a new forward pass.

A step's logits come from `forward(ids)` (the server runs it as an ordinary engine request that hands its logits row
to an observer, see api.py); the token the step takes is the one lmgen's Sampler draws from those logits with the
session's parameters (filters.py), or the one the user forces.  Bounded: at most `MAX_STEPS` steps per session.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import torch

from lmgen.errors import InvalidRequestError
from lmgen.inspect.filters import StepFilter, filter_step
from lmgen.sampling.params import SamplingParams

MAX_STEPS = 64  # generated tokens per session (each keeps its (vocab,) float32 logits: 192 KiB for 49k tokens)
MAX_TOP_N = 100
CONTROLS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


@dataclass(frozen=True)
class ForwardResult:
    """One forward pass of the inspected sequence, as the engine ran it."""

    logits: torch.Tensor  # (vocab,) float32, the model's raw logits for the next token
    latency_ms: float  # from submission to the logits (queueing included)
    context_tokens: int  # tokens the step saw
    cached_tokens: int  # of those, served from the prefix cache (not recomputed)
    kv: dict = field(default_factory=dict)  # the engine's KV cache right after: blocks used / total, prefix hits


Forward = Callable[[list[int]], Awaitable[ForwardResult]]


@dataclass
class Step:
    index: int  # which generated token this step chooses (0 = the first after the prompt)
    fwd: ForwardResult
    params: SamplingParams  # the controls in effect when the step was last filtered
    view: StepFilter
    token: int | None = None  # the token taken (None: the step is the current, pending one)
    forced: bool = False
    filter_ms: float = 0.0


def controls(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in CONTROLS}


def make_params(values: dict, base: SamplingParams | None = None) -> SamplingParams:
    """The session's SamplingParams from the controls (`values` names only CONTROLS; validated by SamplingParams)."""
    unknown = sorted(set(values) - set(CONTROLS))
    if unknown:
        raise InvalidRequestError(f"unknown control {unknown[0]!r}; the controls are {', '.join(CONTROLS)}",
                                  param=unknown[0], value=values[unknown[0]])
    given = {k: v for k, v in values.items() if v is not None or k == "seed"}  # null: keep the current value
    merged = {**(controls(base) if base is not None else {}), **given}
    if merged.get("seed") is None:
        merged["seed"] = secrets.randbits(31)  # a session always has a seed, so a re-filter redraws the same way
    return SamplingParams(max_tokens=None, **merged)


class InspectSession:
    """Prompt + steps; every method that changes it runs under the session's lock (one change at a time)."""

    def __init__(self, session_id: str, prompt_ids: list[int], prompt_text: str, mode: str, params: SamplingParams,
                 stop_ids: set[int], forward: Forward, top_n: int = 20):
        if not 1 <= top_n <= MAX_TOP_N:
            raise InvalidRequestError(f"top_n must be in [1, {MAX_TOP_N}], got {top_n}", param="top_n", value=top_n)
        self.id, self.prompt_ids, self.prompt_text, self.mode = session_id, list(prompt_ids), prompt_text, mode
        self.params, self.stop_ids, self.forward, self.top_n = params, set(stop_ids), forward, top_n
        self.steps: list[Step] = []
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()

    # ---- state ----------------------------------------------------------------------------------
    @property
    def output_ids(self) -> list[int]:
        return [s.token for s in self.steps if s.token is not None]

    @property
    def pending(self) -> Step | None:
        return self.steps[-1] if self.steps and self.steps[-1].token is None else None

    @property
    def finished(self) -> bool:
        """The last token taken was an end-of-sequence token."""
        return bool(self.steps) and self.steps[-1].token is not None and self.steps[-1].token in self.stop_ids

    async def _filter(self, logits: torch.Tensor, index: int, params: SamplingParams, outputs: list[int],
                      extra: list[int]) -> tuple[StepFilter, float]:
        t0 = time.perf_counter()
        # draw index = step index: a sampled request consumes one uniform per step, so step i uses the i-th
        view = await asyncio.to_thread(filter_step, logits, params, self.prompt_ids, outputs, self.stop_ids,
                                       index, self.top_n, extra)
        return view, (time.perf_counter() - t0) * 1000.0

    async def _new_step(self) -> Step:
        if len(self.steps) >= MAX_STEPS:
            raise InvalidRequestError(f"an inspector session holds at most {MAX_STEPS} steps; branch from an earlier "
                                      f"step or start a new session", param="steps", value=len(self.steps) + 1)
        outputs = self.output_ids
        fwd = await self.forward(self.prompt_ids + outputs)
        view, ms = await self._filter(fwd.logits, len(outputs), self.params, outputs, [])
        step = Step(len(outputs), fwd, self.params, view, filter_ms=ms)
        self.steps.append(step)
        return step

    # ---- actions --------------------------------------------------------------------------------
    async def start(self) -> None:
        async with self.lock:
            await self._new_step()

    async def step(self, count: int = 1, force: int | None = None, at: int | None = None) -> None:
        """Takes `count` tokens: the first is `force` when given (a branch), else the sampler's; `at` first cuts the
        session back to that step (it becomes the pending one again)."""
        if not isinstance(count, int) or not 1 <= count <= MAX_STEPS:
            raise InvalidRequestError(f"count must be in [1, {MAX_STEPS}], got {count!r}", param="count", value=count)
        async with self.lock:
            self.last_used = time.monotonic()
            if at is not None:
                if not isinstance(at, int) or not 0 <= at < len(self.steps):
                    raise InvalidRequestError(f"at must name a step in [0, {len(self.steps)}), got {at!r}",
                                              param="at", value=at)
                del self.steps[at + 1:]
                self.steps[at].token, self.steps[at].forced = None, False
            for i in range(count):
                step = self.pending
                if step is None:
                    raise InvalidRequestError("the sequence ended with an end-of-sequence token; branch from an "
                                              "earlier step (`at`)", param="at", value=None)
                if i == 0 and force is not None:
                    vocab = step.fwd.logits.shape[-1]
                    if not isinstance(force, int) or isinstance(force, bool) or not 0 <= force < vocab:
                        raise InvalidRequestError(f"force must be a token id in [0, {vocab}), got {force!r}",
                                                  param="force", value=force)
                    if force not in {c["id"] for c in step.view.candidates}:  # shown with its verdicts too
                        outputs = self.output_ids
                        step.view, step.filter_ms = await self._filter(step.fwd.logits, step.index, step.params,
                                                                        outputs, [force])
                    step.token, step.forced = force, True
                else:
                    step.token = step.view.sampler_token
                if step.token in self.stop_ids:
                    break
                await self._new_step()

    async def refilter(self, values: dict) -> None:
        """New controls: the pending step (or the last one) is filtered again from its stored logits, no forward."""
        async with self.lock:
            self.last_used = time.monotonic()
            self.params = make_params(values, self.params)
            step = self.pending or (self.steps[-1] if self.steps else None)
            if step is None:
                return
            outputs = self.output_ids[:step.index]
            extra = [step.token] if step.token is not None else []
            step.view, step.filter_ms = await self._filter(step.fwd.logits, step.index, self.params, outputs, extra)
            step.params = self.params
