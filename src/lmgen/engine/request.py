"""Request: one sequence inside the engine core (never handed out of it), and its ordered status."""

from __future__ import annotations

import enum
import time
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
        leader: "Request | None" = None,
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
        self.block_hashes: list[bytes] = []  # prefix-cache keys of its full blocks, computed once (BlockManager)
        self.num_hashed_blocks = 0  # leading blocks already registered in (or found in) the prefix cache
        # n > 1: the first sibling, whose prompt prefill the others wait for so that they share its blocks
        self.leader = leader
        self.grammar = None  # structured output: its GrammarMatcher, advanced with every accepted token
        self.beam_group = None  # a beam-search request's BeamGroup: it, not the sampler, picks this sequence's tokens
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

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Token ids [start, end) of prompt + output, without building the whole list."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return tuple(self.prompt_token_ids[start:end])
        return tuple(self.prompt_token_ids[start:n]) + tuple(self.output_token_ids[max(start - n, 0):end - n])

    @property
    def waits_for_leader(self) -> bool:
        """A sibling (n > 1) waits while its leader is still computing the shared prompt."""
        lead = self.leader
        return lead is not None and lead.status == RequestStatus.RUNNING and lead.num_computed_tokens < lead.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, {self.status.name}, computed={self.num_computed_tokens}/{self.num_tokens})"
