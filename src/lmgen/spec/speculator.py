"""Speculator: after the scheduler picks a step, extends the chunks that reach a sequence's newest token with
k proposed tokens; after the forward pass, verifies them (verify.py) and keeps the accepted prefix.

Auto step-back (measured, README "Speculative decoding"): a step whose batch has more than `max_batch`
sequences does not speculate (verification then costs as much as the decode it saves); a sequence whose rolling
acceptance (an exponential average, weight 1/2 per step) falls under `min_acceptance` proposes nothing for
`cooldown` steps, then tries again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lmgen.engine.kv_cache import BlockManager
from lmgen.engine.request import Request
from lmgen.engine.scheduler import SchedulerOutput
from lmgen.spec.config import SpeculativeConfig
from lmgen.spec.draft import DraftProposer
from lmgen.spec.ngram import NgramProposer
from lmgen.spec.verify import Verdict, final_distributions, logprob_entries, one_thread, verify


@dataclass
class SpecStats:
    """Counters since start (the server's /metrics)."""

    steps: int = 0  # steps that verified at least one proposal
    draft_tokens: int = 0
    accepted_tokens: int = 0
    stepped_back: int = 0  # steps that skipped speculation because the batch was too large


@dataclass
class _SeqState:
    ema: float = 1.0  # rolling acceptance rate
    cool: int = 0  # steps left without proposals


class Speculator:
    def __init__(self, config: SpeculativeConfig, draft: DraftProposer | None = None):
        self.config, self.draft = config, draft
        self.ngram = NgramProposer(config.ngram_min, config.ngram_max) if config.method == "ngram" else None
        self.stats = SpecStats()
        self.states: dict[str, _SeqState] = {}

    def release(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)
        if self.draft is not None:
            self.draft.release(seq_id)

    # ---- before the forward pass ----------------------------------------------------------------
    def extend(self, sched: SchedulerOutput, bm: BlockManager, max_tokens: int, stop_ids: Callable[[Request], set[int]]) -> None:
        """Adds proposals to the chunks of `sched` that end at their sequence's newest token (in place)."""
        for req, _ in sched.scheduled:
            req.spec_token_ids, req.spec_probs = [], None
        if len(sched.scheduled) > self.config.max_batch:
            self.stats.stepped_back += 1
            return
        picked, ks = [], []
        for i, (req, n) in enumerate(sched.scheduled):
            state = self.states.setdefault(req.request_id, _SeqState())
            # beams, and grammar-constrained requests (their masks would have to join p and q), decode plainly
            if req.num_computed_tokens + n != req.num_tokens or req.beam_group is not None or req.grammar is not None:
                continue
            if state.cool > 0:
                state.cool -= 1
                continue
            # a+1 tokens come out of a step with a accepted drafts: never more than the sequence may still take
            k = min(self.config.num_tokens, req.max_output_tokens - len(req.output_token_ids) - 1)
            if k >= 1:
                picked.append(i)
                ks.append(k)
        if not picked:
            return
        reqs = [sched.scheduled[i][0] for i in picked]
        if self.ngram is not None:
            proposals = [(self.ngram.propose(r.all_token_ids, k), None) for r, k in zip(reqs, ks)]
        else:
            proposals = self.draft.propose(reqs, ks, [stop_ids(r) for r in reqs])
        budget = max_tokens - sched.num_tokens
        for i, (drafts, q) in zip(picked, proposals):
            req, n = sched.scheduled[i]
            if not drafts or len(drafts) > budget or not bm.allocate_slots(req, n + len(drafts)):
                continue
            budget -= len(drafts)
            req.spec_token_ids, req.spec_probs = drafts, q
            sched.scheduled[i] = (req, n + len(drafts))

    # ---- after the forward pass -----------------------------------------------------------------
    def verify(self, logits: dict[str, torch.Tensor], reqs: dict[str, Request],
               stop_ids: Callable[[Request], set[int]]) -> dict[str, Verdict]:
        """logits: sequence id -> the target's (k + 1, vocab) logits at the newest token and each draft."""
        if not logits:
            return {}
        with one_thread():
            return self._verify(logits, reqs, stop_ids)

    def _verify(self, logits: dict[str, torch.Tensor], reqs: dict[str, Request],
                stop_ids: Callable[[Request], set[int]]) -> dict[str, Verdict]:
        ids = list(logits)
        rows_req, histories, stops = [], [], []
        for sid in ids:
            req = reqs[sid]
            for j in range(len(req.spec_token_ids) + 1):  # position j: the drafts before it count as output
                rows_req.append(req)
                histories.append(req.output_token_ids + req.spec_token_ids[:j])
                stops.append(stop_ids(req))
        parts = [logits[s] for s in ids]
        all_logits = (torch.cat(parts) if len(parts) > 1 else parts[0]).to(torch.float32)  # (rows, vocab)
        argmax, probs = final_distributions(all_logits, rows_req, histories, stops)
        out, row = {}, 0
        for sid in ids:
            req = reqs[sid]
            k = len(req.spec_token_ids)
            sl = slice(row, row + k + 1)
            tokens, a = verify(req, req.spec_token_ids, req.spec_probs, argmax[sl],
                               None if probs is None else probs[sl], req.generator)
            if req.params.logprobs is not None:  # the target's raw logprobs, as the one-token path reports them
                entries, chosen = logprob_entries(torch.log_softmax(all_logits[sl], dim=-1), tokens, req.params.logprobs)
            else:
                entries, chosen = None, [0.0] * len(tokens)
            out[sid] = Verdict(tokens, a, entries, chosen)
            row += k + 1
            self._account(req, k, a)
        self.stats.steps += 1
        return out

    def _account(self, req: Request, k: int, accepted: int) -> None:
        req.num_draft_tokens += k
        req.num_accepted_tokens += accepted
        self.stats.draft_tokens += k
        self.stats.accepted_tokens += accepted
        state = self.states.setdefault(req.request_id, _SeqState())
        state.ema = 0.5 * state.ema + 0.5 * (accepted / k)
        if state.ema < self.config.min_acceptance:
            state.cool, state.ema = self.config.cooldown, 1.0
