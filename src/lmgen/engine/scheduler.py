"""Continuous batching: every step, decide which requests run and how many tokens each computes, and, after
the forward pass, what its results mean for each request (`update_from_output`).

Scheduling works on token counters, not phases (vLLM v1): a request needs
`num_tokens - num_computed_tokens` tokens computed. A fresh prompt needs many (prefill, cut into chunks
by the per-step token budget so long prompts don't stall running decodes), a running request needs one
(decode). Requests join and leave the batch at every step. When cache blocks run out, the newest running
request is preempted: its blocks are freed and it is recomputed later (preemption by recompute).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmgen.engine.kv_cache import BlockManager
from lmgen.engine.outputs import EngineCoreOutput, Logprobs
from lmgen.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """Which requests run this step and how many new tokens each computes, in batch order."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SampledTokens:
    """What the model and the sampler produced in one step, by sequence id (vLLM v1's ModelRunnerOutput)."""

    token_ids: dict[str, int]  # sequences that reached their newest token: the token drawn for each
    logprobs: dict[str, Logprobs] = field(default_factory=dict)  # top-k + chosen, for those that asked
    chosen_logprobs: dict[str, float] = field(default_factory=dict)  # the drawn token's logprob, when computed
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # prompt positions computed this step


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 eos_token_ids: frozenset[int] = frozenset(), sliding_window: int | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_token_ids, self.sliding_window = frozenset(eos_token_ids), sliding_window
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        max_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        if req.num_tokens >= max_tokens:
            raise ValueError(f"prompt of {req.num_tokens} tokens does not fit the KV cache ({max_tokens} slots)")
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A forked beam that already shares its parent's cache blocks joins the running batch."""
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # 1. Running requests first: their decode tokens (or the next chunk of their prompt).
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new == 0:  # a beam scored already, waiting for the rest of its group
                i += 1
                continue
            while not bm.allocate_slots(req, num_new):
                victim = self.running.pop()  # the newest running request gives its blocks back
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append((req, num_new))
                budget -= num_new
                i += 1
                continue
            break  # `req` itself was preempted: nothing after it is left
        # 2. Then admit waiting requests, oldest first, while blocks, budget and the seq limit allow. An n > 1
        #    sibling waits until its leader's prompt is computed, then finds it in the prefix cache.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if req.waits_for_leader:
                break
            fresh = not req.block_table
            if fresh:
                req.num_cached_tokens = bm.allocate_prefix(req)
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not bm.allocate_slots(req, num_new):
                if fresh:
                    bm.free_request(req)  # give the prefix-cache references back; retry next step
                    req.num_cached_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return out

    def update_from_output(self, sched: SchedulerOutput, sampled: SampledTokens) -> list[EngineCoreOutput]:
        """After the forward pass: advance computed-token counters, register full blocks in the prefix cache,
        release blocks out of the sliding window, append drawn tokens and finish sequences on a stop token
        id / EOS / max_tokens / the context window. Returns the news of every sequence that got a token."""
        outputs = []
        for req, n in sched.scheduled:
            if req.params.prompt_logprobs is not None and req.num_computed_tokens == 0:
                req.prompt_logprobs = [None]  # (re)computing the prompt from its start; the first token has no prediction
            req.num_computed_tokens += n
            if req.request_id in sampled.prompt_logprobs:
                req.prompt_logprobs.extend(sampled.prompt_logprobs[req.request_id])
            self.block_manager.cache_full_blocks(req)
            if self.sliding_window is not None:
                self.block_manager.release_out_of_window(req, self.sliding_window)
            token = sampled.token_ids.get(req.request_id)
            if token is None:  # a prompt chunk short of the newest token: nothing drawn yet
                continue
            if req.beam_group is not None:  # a beam: its group picks the continuations from the scores
                req.beam_group.report(req, sampled.logprobs[req.request_id])
                continue
            req.output_token_ids.append(token)
            entry = sampled.logprobs.get(req.request_id)
            if req.logprobs is not None and entry is not None:
                req.logprobs.append(entry)
            req.cumulative_logprob += sampled.chosen_logprobs.get(req.request_id, 0.0)
            grammar = req.grammar.advance(token) if req.grammar is not None else None  # structured output
            status = self._finish_status(req, token)
            text_end = grammar == "end" and status != RequestStatus.FINISHED_STOPPED  # ended on a text token, not EOS
            if text_end:
                status = RequestStatus.FINISHED_STOPPED
            elif grammar == "error":  # the constraint can no longer be enforced: never hand out unchecked text
                status = RequestStatus.FINISHED_ABORTED
            if status is not None:
                self.finish(req, status)
            outputs.append(EngineCoreOutput(
                req.parent_id, req.index, (token,), (entry,) if entry is not None and req.logprobs is not None else None,
                req.cumulative_logprob, req.finish_reason, req.stop_reason, req.num_prompt_tokens, req.num_cached_tokens,
                len(req.output_token_ids),
                tuple(req.prompt_logprobs) if req.prompt_logprobs is not None and len(req.output_token_ids) == 1 else None,
                last_token_is_text=text_end,
            ))
        return outputs

    def _finish_status(self, req: Request, token: int) -> RequestStatus | None:
        params = req.params
        if token in (params.stop_token_ids or ()):
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED  # the end token itself never reaches the text
        if not params.ignore_eos and token in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= req.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _preempt(self, req: Request) -> None:
        self.block_manager.free_request(req)
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Marks `req` finished and frees its blocks, wherever it is (running, waiting or preempted)."""
        req.status = status
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free_request(req)
