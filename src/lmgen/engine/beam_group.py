"""A beam-search request inside the engine: its live beams are ordinary sequences of the running batch (batched with
other requests); after each step that scored all of them, the group advances its BeamSearch, forks the surviving
beams' KV blocks (full blocks shared, the partial last block copied), frees the pruned ones, and at the end hands
out the n best hypotheses."""

from __future__ import annotations

from lmgen.engine.kv_cache import BlockManager, KVCache
from lmgen.engine.outputs import EngineCoreOutput, Logprobs
from lmgen.engine.request import Request, RequestStatus
from lmgen.engine.scheduler import Scheduler
from lmgen.sampling.beam import BeamSearch


class BeamGroup:
    def __init__(self, request_id: str, root: Request, search: BeamSearch):
        self.request_id, self.search = request_id, search
        self.live: dict[tuple[int, ...], Request] = {(): root}  # generated tokens of a live beam -> its sequence
        self.reports: dict[str, Logprobs] = {}  # sequence id -> the log-probs its last step produced
        self._forks = 0
        root.beam_group = self

    def report(self, req: Request, logprobs: Logprobs) -> None:
        self.reports[req.request_id] = logprobs

    @property
    def ready(self) -> bool:
        """Every live beam has been scored this round."""
        return all(r.request_id in self.reports for r in self.live.values())

    def sequences(self) -> list[Request]:
        return list(self.live.values())

    def advance(self, scheduler: Scheduler, block_manager: BlockManager, kv_cache: KVCache) -> tuple[list[Request], list[Request]]:
        """Runs one BeamSearch step. Returns (new sequences to register, sequences that left the group)."""
        self.search.advance({seq: self.reports[req.request_id] for seq, req in self.live.items()})
        self.reports.clear()
        if self.search.done:
            gone = list(self.live.values())
            for req in gone:
                scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            self.live = {}
            return [], gone
        children: dict[tuple[int, ...], list[int]] = {}  # parent beam -> the tokens its survivors append
        for seq in self.search.pending():
            children.setdefault(seq[:-1], []).append(seq[-1])
        live, new, gone = {}, [], []
        for parent_seq, parent in self.live.items():
            tokens = children.get(parent_seq)
            if tokens is None:  # pruned: its blocks go back (shared ones stay with the other beams)
                scheduler.finish(parent, RequestStatus.FINISHED_STOPPED)
                gone.append(parent)
                continue
            for token in tokens[1:]:  # extra survivors fork the parent before it moves on
                child = self._fork(parent, token, scheduler, block_manager, kv_cache)
                live[parent_seq + (token,)] = child
                new.append(child)
            parent.output_token_ids.append(tokens[0])  # the first survivor continues in the parent's own blocks
            live[parent_seq + (tokens[0],)] = parent
        self.live = live
        return new, gone

    def _fork(self, parent: Request, token: int, scheduler: Scheduler, bm: BlockManager, kv_cache: KVCache) -> Request:
        self._forks += 1
        child = Request(f"{self.request_id}#beam{self._forks}", parent.prompt_token_ids, parent.params, parent.generator,
                        index=0, parent_id=self.request_id)
        child.output_token_ids = parent.output_token_ids + [token]
        child.arrival_time, child.num_cached_tokens, child.beam_group = parent.arrival_time, parent.num_cached_tokens, self
        copy = bm.fork(parent, child) if parent.status == RequestStatus.RUNNING else None
        if child.block_table:
            if copy is not None:
                kv_cache.copy_block(*copy)
            scheduler.add_running(child)
        else:  # the parent holds no blocks (preempted), or none were free: recompute it like a preempted sequence
            scheduler.add(child)
        return child

    def outputs(self, num_prompt_tokens: int, num_cached_tokens: int) -> list[EngineCoreOutput]:
        """The n best hypotheses, as the group's final outputs (whole token lists; text is the processor's)."""
        return [EngineCoreOutput(self.request_id, i, tuple(r.token_ids), None, r.cumulative_logprob, r.finish_reason, None,
                                 num_prompt_tokens, num_cached_tokens, len(r.token_ids), score=r.score)
                for i, r in enumerate(self.search.results())]
