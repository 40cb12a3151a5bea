"""Beam search over a scoring callback, reproducing Hugging Face transformers.

``BeamSearch`` is the bookkeeping as a step-wise state machine: it names the
live beams to score (``pending``), takes their log-probabilities (``advance``)
and says when it is ``done``; the engine runs it inside its step loop (its beams
share a batch with other requests) and ``beam_search`` drives it over a
``next_logprobs(seqs)`` callback.  It is written to give exactly what
``transformers``' ``model.generate(num_beams=K, num_return_sequences=n,
do_sample=False, length_penalty=..., early_stopping=..., max_new_tokens=...)``
gives (transformers 4.5x / 5.x vectorised ``_beam_search``), scores included.
The arithmetic is done on float32 tensors with the same operations, so scores
match bit for bit when the log-probabilities do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["BeamResult", "BeamSearch", "beam_search", "candidates_needed"]

_BIG = -1.0e9  # transformers' "impossible" score


@dataclass
class BeamResult:
    token_ids: list[int]  # generated tokens (prompt excluded), ending with the EOS id when finish_reason == "stop"
    cumulative_logprob: float  # sum of the generated tokens' log-probs (float32 accumulation)
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty (transformers' sequences_scores)
    finish_reason: str  # "stop" (ended with EOS) | "length" (hit max_tokens)


def candidates_needed(beam_width: int, eos_token_ids: set[int]) -> int:
    """How many top log-probs ``next_logprobs`` must return per sequence.

    ``max(2, 1 + len(eos_token_ids)) * beam_width``: the number of
    continuations transformers keeps at each step (``2 * beam_width`` with a
    single EOS id).  Returning the full distribution is always fine.
    """
    return max(2, 1 + len(eos_token_ids)) * beam_width


def _greedy(
    prompt: list[int],
    next_logprobs: Callable[[list[list[int]]], list[dict[int, float]]],
    max_tokens: int,
    eos_token_ids: set[int],
    length_penalty: float,
) -> list[BeamResult]:
    generated: list[int] = []
    cumulative = torch.zeros((), dtype=torch.float32)
    reason = "length"
    for _ in range(max_tokens):
        dist = next_logprobs([prompt + generated])[0]
        # argmax, lowest id on ties (torch.argmax over the full vocabulary)
        token = min(dist, key=lambda t: (-dist[t], t))
        cumulative = cumulative + torch.tensor(dist[token], dtype=torch.float32)
        generated.append(token)
        if token in eos_token_ids:
            reason = "stop"
            break
    score = cumulative / (len(generated) ** length_penalty)
    return [BeamResult(generated, float(cumulative), float(score), reason)]


def beam_search(
    prompt_token_ids: list[int],
    next_logprobs: Callable[[list[list[int]]], list[dict[int, float]]],
    *,
    beam_width: int,
    max_tokens: int,
    eos_token_ids: set[int],
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    n: int = 1,
) -> list[BeamResult]:
    """Deterministic beam search with Hugging Face transformers' semantics.

    ``next_logprobs(seqs)`` receives full sequences (prompt + generated so far)
    and returns one ``{token_id: logprob}`` per sequence holding at least the
    ``candidates_needed(beam_width, eos_token_ids)`` most likely tokens
    (``2 * beam_width`` with one EOS id), or the whole distribution.  Fewer
    than ``2 * beam_width`` is a ``ValueError``; with ``m > 1`` EOS ids and
    fewer than ``(1 + m) * beam_width`` entries the search still works but
    may, rarely, differ from transformers (which ranks ``(1 + m) * K``
    continuations per step).  All
    sequences of one call have the same length; identical sequences are
    asked for once.  Returns the ``n`` best finished hypotheses, best first.

    Semantics (transformers ``GenerationMixin._beam_search``):

    * ``beam_width == 1`` is greedy decoding, as ``generate(num_beams=1)``:
      argmax (lowest id on ties) until an EOS id or ``max_tokens``; its score
      uses the same length normalisation as below.
    * At every step each of the ``K = beam_width`` live beams is extended by
      every token; the ``2K`` (``(1 + #eos) * K``) best continuations by
      cumulative log-prob are kept.  At the first step only beam 0 is real
      (the other beams start at -1e9), so the ``K`` beams differ.
    * A continuation "finishes" when its last token is an EOS id or it
      reaches ``max_tokens`` generated tokens.  Only finishing continuations
      ranked in the top ``K`` of those ``2K`` are added to the finished
      hypotheses (EOS continuations ranked lower are dropped); the next live
      beams are the best ``K`` non-finishing continuations.
    * A finished hypothesis is scored ``cumulative_logprob / L **
      length_penalty`` where ``L`` is the number of generated tokens
      including the EOS token and excluding the prompt.  The best ``K``
      finished hypotheses are kept, ordered by that score.
    * Stopping: the search ends when every live continuation hits the length
      limit, or once ``K`` hypotheses are finished and, for
      ``early_stopping=True``, immediately; for ``False``, when the best live
      beam's cumulative log-prob divided by ``cur_len ** length_penalty``
      (``cur_len`` = generated tokens so far) is not above the worst finished
      score; for ``"never"``, the same but dividing by ``max_tokens **
      length_penalty`` when ``length_penalty > 0`` (the best it could reach).
    * At the length limit the top ``K`` continuations all finish (reason
      "length") and compete with the earlier finished hypotheses.

    Scores are accumulated and normalised in float32 exactly as transformers
    does, so ``score`` equals ``sequences_scores``.
    """
    prompt = list(prompt_token_ids)
    if beam_width == 1:
        BeamSearch.validate(1, max_tokens, n, early_stopping)
        return _greedy(prompt, next_logprobs, max_tokens, set(eos_token_ids), length_penalty)
    search = BeamSearch(len(prompt), beam_width=beam_width, max_tokens=max_tokens, eos_token_ids=eos_token_ids,
                        length_penalty=length_penalty, early_stopping=early_stopping, n=n)
    while not search.done:
        seqs = search.pending()
        dists = next_logprobs([prompt + list(seq) for seq in seqs])
        if len(dists) != len(seqs):
            raise ValueError(f"next_logprobs returned {len(dists)} results for {len(seqs)} sequences")
        search.advance(dict(zip(seqs, dists)))
    return search.results()


class BeamSearch:
    """One beam search (K = beam_width > 1) as a state machine, with transformers' arithmetic (see `beam_search`)."""

    @staticmethod
    def validate(beam_width: int, max_tokens: int, n: int, early_stopping) -> None:
        if beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {beam_width}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if not 1 <= n <= beam_width:
            raise ValueError(f"n must be in [1, beam_width={beam_width}], got {n}")
        if not (isinstance(early_stopping, bool) or early_stopping == "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {early_stopping!r}')

    def __init__(self, prompt_len: int, *, beam_width: int, max_tokens: int, eos_token_ids: set[int],
                 length_penalty: float = 1.0, early_stopping: bool | str = False, n: int = 1):
        self.validate(beam_width, max_tokens, n, early_stopping)
        if beam_width == 1:
            raise ValueError("beam_width 1 is greedy decoding, not a beam search")
        K = self.K = beam_width
        self.n, self.eos, self.length_penalty, self.early_stopping = n, set(eos_token_ids), length_penalty, early_stopping
        self.prompt_len, self.max_length = prompt_len, prompt_len + max_tokens
        self.beams_to_keep = candidates_needed(K, self.eos)
        self.top_num_beam_mask = torch.arange(self.beams_to_keep) < K
        # live beams (generated tokens only) and their cumulative log-probs
        self.running: list[list[int]] = [[] for _ in range(K)]
        self.running_scores = torch.full((K,), _BIG, dtype=torch.float32)
        self.running_scores[0] = 0.0
        # finished hypotheses: K slots, -1e9 placeholders at first
        self.finished: list[list[int]] = [[] for _ in range(K)]
        self.finished_cum = torch.zeros((K,), dtype=torch.float32)
        self.finished_scores = torch.full((K,), _BIG, dtype=torch.float32)
        self.is_finished = torch.zeros((K,), dtype=torch.bool)
        self.heuristic_unsatisfied = True
        self.cur_len = prompt_len
        self.done = False

    def pending(self) -> list[tuple[int, ...]]:
        """The distinct live beams (generated tokens) whose next-token log-probs `advance` needs."""
        return list(dict.fromkeys(tuple(seq) for seq in self.running))

    def advance(self, dists: dict[tuple[int, ...], dict[int, float]]) -> None:
        """One step: extend every live beam by its candidates, keep the best, collect finished hypotheses."""
        K, eos, running = self.K, self.eos, self.running
        # b. candidate continuations, beam-major then token id (transformers' flattened (beam, vocab) layout)
        cand_beam: list[int] = []
        cand_tok: list[int] = []
        cand_lp: list[float] = []
        for b, seq in enumerate(running):
            dist = dists[tuple(seq)]
            if len(dist) < 2 * K:
                raise ValueError(
                    f"next_logprobs must return at least {2 * K} log-probs per sequence "
                    f"(2 * beam_width), got {len(dist)}"
                )
            for tok in sorted(dist):
                cand_beam.append(b)
                cand_tok.append(tok)
                cand_lp.append(dist[tok])
        accumulated = torch.tensor(cand_lp, dtype=torch.float32) + self.running_scores[torch.tensor(cand_beam)]

        # c. top-(2K) continuations
        keep_now = min(self.beams_to_keep, len(cand_tok))
        topk_scores, topk_idx = torch.topk(accumulated, k=keep_now)
        topk_seqs = [running[cand_beam[i]] + [cand_tok[i]] for i in topk_idx.tolist()]
        at_limit = self.cur_len + 1 >= self.max_length
        hits = torch.tensor([at_limit or seq[-1] in eos for seq in topk_seqs], dtype=torch.bool)

        # e. next live beams: best K continuations that did not finish
        topk_running_scores = topk_scores + hits.to(torch.float32) * _BIG
        next_idx = torch.topk(topk_running_scores, k=K)[1]
        self.running = [topk_seqs[i] for i in next_idx.tolist()]
        self.running_scores = topk_running_scores[next_idx]

        # f. finished hypotheses: only the top-K continuations may finish
        just_finished = hits & self.top_num_beam_mask[:keep_now]
        normalised = topk_scores / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = bool(self.is_finished.all()) and self.early_stopping is True
        normalised = normalised + float(full) * _BIG
        normalised = normalised + float(not self.heuristic_unsatisfied) * _BIG
        normalised = normalised + (~just_finished) * _BIG
        merged_scores = torch.cat((self.finished_scores, normalised))
        merged_seqs = self.finished + topk_seqs
        merged_cum = torch.cat((self.finished_cum, topk_scores))
        merged_finished = torch.cat((self.is_finished, just_finished))
        keep = torch.topk(merged_scores, k=K)[1]
        self.finished = [merged_seqs[i] for i in keep.tolist()]
        self.finished_scores = merged_scores[keep]
        self.finished_cum = merged_cum[keep]
        self.is_finished = merged_finished[keep]

        # g. stopping condition
        self.cur_len += 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = self.running_scores[:1] / (best_len**self.length_penalty)
        worst_finished = torch.where(self.is_finished, torch.min(self.finished_scores), torch.tensor(_BIG))
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool(torch.any(best_possible > worst_finished))
        exists_open_beam = not (bool(self.is_finished.all()) and self.early_stopping is True)
        valid_continuations = not bool(hits.all())
        self.done = not (self.heuristic_unsatisfied and exists_open_beam and valid_continuations)

    def results(self) -> list[BeamResult]:
        """The n best finished hypotheses, best first."""
        results = []
        for i in range(self.n):
            if not bool(self.is_finished[i]):
                continue  # a never-filled slot (only with -inf log-probs)
            seq = self.finished[i]
            reason = "stop" if seq and seq[-1] in self.eos else "length"
            results.append(BeamResult(list(seq), float(self.finished_cum[i]), float(self.finished_scores[i]), reason))
        return results
