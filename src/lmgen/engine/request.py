"""Request (one sequence being generated), its ordered status, and the outputs handed back to users."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch


class RequestStatus(enum.IntEnum):
    """Ordered: every status after PREEMPTED is finished (vLLM v1's convention)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 4  # max_tokens or the context window reached
    FINISHED_ABORTED = 5  # cancelled by the user / a disconnected client

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED


# RequestStatus -> OpenAI `finish_reason`.
FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence: prompt ids, generated ids, how many of them the KV cache holds, and its cache blocks.

    Prefill and decode are not separate phases: the scheduler hands the runner
    `num_tokens - num_computed_tokens` tokens (a prompt chunk, or the one newest token).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: Any,  # SamplingParams
        generator: torch.Generator | None = None,
        max_total_tokens: int | None = None,
        index: int = 0,
        parent_id: str | None = None,
    ):
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the user's request id; n>1 children share it
        self.index = index  # which of the n completions this is
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table: list[int] = []
        # sliding-window models: leading blocks given back because no later query can see them (their table
        # entries are the null block 0), see BlockManager.release_out_of_window
        self.num_released_blocks = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        budget = params.max_tokens if params.max_tokens is not None else 1 << 62
        if max_total_tokens is not None:
            budget = min(budget, max_total_tokens - len(self.prompt_token_ids))
        self.max_output_tokens = budget
        self.fork_pending = params.n > 1 and index == 0 and not getattr(params, "beam_width", 1) > 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.status.name}, computed={self.num_computed_tokens}/{self.num_tokens})"


@dataclass
class CompletionOutput:
    """One of a request's n completions (vLLM's CompletionOutput)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    score: float | None = None  # beam search: cumulative_logprob / len(token_ids) ** length_penalty


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[dict[int, float] | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    dropped_messages: int = 0  # chat only: oldest history messages dropped to fit the context window
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StepOutput:
    """One step's news about one sequence: the new tokens and the text they released."""

    request_id: str  # the user's request id (shared by n>1 children)
    index: int
    new_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    request: Request
