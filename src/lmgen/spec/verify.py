"""Exact verification: the target scores k + 1 positions; greedy rows accept the longest prefix of drafts equal to
the target's argmax, sampled rows use the rejection rule of Leviathan et al. / Chen et al. (2023).

p and q are the final distributions after lmgen's own transform pipeline (penalties, bias, min_tokens,
temperature, top-k, top-p, min-p), built per position with the draft tokens before it counted as output, so
the tokens kept follow the target's distribution exactly (greedy: are the target's tokens)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from lmgen.engine.request import Request
from lmgen.sampling.metadata import SamplingMetadata
from lmgen.sampling.sampler import Sampler


@dataclass
class Verdict:
    """One request's result: the drafts accepted, then one token the target chose (correction or bonus)."""

    tokens: list[int]  # accepted drafts + the final token
    num_accepted: int
    entries: list[dict[int, float]] | None  # per token: the target's raw top-k logprobs + the token's own
    chosen: list[float]  # per token: its logprob under the target's raw distribution (0.0 unless logprobs were asked)


@contextmanager
def one_thread() -> Iterator[None]:
    """Runs the verification math (a few (k + 1, vocab) rows) on one intra-op thread: on a busy host, waking the
    pool for such small ops costs ~20 ms each (measured: argmax of 5 x 49152 floats, 23 ms on 2 threads under load
    vs 1.5 ms on one), more than the forward pass speculation saves."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


def final_distributions(logits: torch.Tensor, reqs: list[Request], histories: list[list[int]],
                        stop_ids: list[set[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For rows of `logits` (rows, vocab), row i belonging to `reqs[i]` with output so far `histories[i]`:
    (greedy argmax after penalties (rows,), softmax after all transforms (rows, vocab), or None if all greedy)."""
    meta = SamplingMetadata.build([r.params for r in reqs], [r.prompt_token_ids for r in reqs], histories,
                                  [None] * len(reqs), stop_ids, logits.shape[-1], logits.device)
    y = Sampler.apply_penalties_bias_min_tokens(logits.to(torch.float32), meta)
    argmax = Sampler.greedy_tokens(y)  # (rows,) lowest id among equal maxima, as the sampler
    probs = None if meta.all_greedy else torch.softmax(Sampler.apply_warpers(y, meta), dim=-1)
    return argmax, probs


def uniform(gen: torch.Generator | None) -> float:
    """One float64 uniform in [0, 1) from the request's generator (the process RNG never)."""
    return float(torch.rand((), generator=gen, dtype=torch.float64))


def draw(probs: torch.Tensor, u: float) -> int:
    """The token where `u` falls in the cumulative distribution of `probs` (vocab,) (float64, id order)."""
    cdf = torch.cumsum(probs.to(torch.float64), dim=0)
    tok = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=torch.float64), right=True)[0])
    positive = torch.nonzero(probs > 0)
    return min(tok, int(positive[-1])) if positive.numel() else 0


def verify(req: Request, drafts: list[int], draft_probs: torch.Tensor | None, argmax: torch.Tensor,
           probs: torch.Tensor | None, gen: torch.Generator | None) -> tuple[list[int], int]:
    """Accepted drafts + one target token, and how many drafts were accepted.

    argmax (k+1,), probs (k+1, vocab) are the target's at the k + 1 positions; draft_probs (k, vocab) is q, the
    draft's distribution each draft was drawn from (None: a deterministic proposal, q = one-hot)."""
    k = len(drafts)
    if req.params.greedy:
        am = argmax.tolist()
        a = 0
        while a < k and am[a] == drafts[a]:
            a += 1
        return drafts[:a] + [am[a]], a
    for i, d in enumerate(drafts):
        p = probs[i]
        q_d = 1.0 if draft_probs is None else float(draft_probs[i, d])
        p_d = float(p[d])
        if q_d > 0 and uniform(gen) < min(1.0, p_d / q_d):
            continue
        # rejected: draw from normalize(max(0, p - q))
        if draft_probs is None:
            residual = p.clone()
            residual[d] = 0.0
        else:
            residual = torch.clamp(p - draft_probs[i].to(p.dtype), min=0.0)
        if float(residual.sum()) <= 0.0:
            residual = p
        return drafts[:i] + [draw(residual, uniform(gen))], i
    return drafts + [draw(probs[k], uniform(gen))], k


def logprob_entries(raw: torch.Tensor, tokens: list[int], k: int | None) -> tuple[list[dict[int, float]] | None, list[float]]:
    """Per kept token: the target's raw top-k logprobs + the token's own (None unless asked), and its logprob.
    raw: (positions >= len(tokens), vocab) log_softmax of the target's logits."""
    idx = torch.arange(len(tokens))
    chosen = raw[idx, torch.tensor(tokens)].tolist()
    if k is None:
        return None, chosen
    entries = []
    if k:
        values, ids = torch.topk(raw[: len(tokens)], min(k, raw.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
    for i, t in enumerate(tokens):
        entry = dict(zip(ids[i], values[i])) if k else {}
        entry[t] = chosen[i]
        entries.append(entry)
    return entries, chosen
