"""Continuous batching: every step, decide which requests run and how many tokens each computes.

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


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_num_seqs and max_num_batched_tokens must be >= 1, got {max_num_seqs}, {max_num_batched_tokens}")
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        max_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        if req.num_tokens >= max_tokens:
            raise ValueError(f"prompt of {req.num_tokens} tokens does not fit the KV cache ({max_tokens} slots)")
        self.waiting.append(req)

    def add_running(self, req: Request) -> None:
        """A forked child (n > 1) that already shares its parent's cache blocks joins the running batch."""
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
        # 2. Then admit waiting requests, oldest first, while blocks, budget and the seq limit allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
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
