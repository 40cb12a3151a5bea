"""One step's candidates as the sampler sees them: raw probability, probability after penalties and temperature,
and what top-k, top-p and min-p each did to them, computed with lmgen's own transforms (sampling/logits.py, in the
Sampler's order), and the token the Sampler itself draws, so the kept set shown is exactly the sampler's."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmgen.sampling.logits import apply_min_p, apply_temperature, apply_top_k, apply_top_p
from lmgen.sampling.logprobs import raw_logprobs
from lmgen.sampling.metadata import SamplingMetadata
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.sampler import Sampler

__all__ = ["StepFilter", "step_generator", "filter_step"]

# per-filter verdict for one candidate
OFF, KEPT, CUT, UPSTREAM = "off", "kept", "cut", None  # UPSTREAM: an earlier filter already removed it


@dataclass(frozen=True)
class StepFilter:
    """The sampler's view of one step's logits, for the candidates asked about."""

    candidates: list[dict]  # id, raw_prob, raw_logprob, adjusted_prob, final_prob, top_k, top_p, min_p, kept
    sampler_token: int  # what lmgen's Sampler draws from these logits with these params and this draw
    greedy: bool
    kept_count: int  # tokens of the whole vocabulary the sampler may draw
    kept_raw_mass: float  # their probability under the raw distribution


def step_generator(seed: int, draw_index: int, device) -> torch.Generator:
    """A generator seeded `seed` that already drew `draw_index` uniforms: the state the engine's per-request generator
    has at the request's `draw_index`-th sampled step (one float64 uniform per step, sampling/draw.py)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    if draw_index:
        torch.rand((draw_index,), generator=g, dtype=torch.float64, device=device)
    return g


def _verdicts(before: torch.Tensor, after: torch.Tensor, active: bool) -> list:
    """Per token of `before` (finite = still in the race): off / kept / cut / already removed upstream."""
    alive, survives = torch.isfinite(before).tolist(), torch.isfinite(after).tolist()
    if not active:
        return [OFF if a else UPSTREAM for a in alive]
    return [(KEPT if s else CUT) if a else UPSTREAM for a, s in zip(alive, survives)]


def filter_step(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int],
                stop_ids: set[int], draw_index: int, top_n: int, extra_ids: list[int] = ()) -> StepFilter:
    """`logits` (vocab,) raw float32 of one step -> the top `top_n` candidates (by raw and by adjusted probability,
    plus `extra_ids`), sorted by adjusted probability, each with the verdict of every filter."""
    x = logits.reshape(1, -1).to(torch.float32)  # (1, vocab)
    vocab = x.shape[-1]
    gen = step_generator(params.seed if params.seed is not None else 0, draw_index, x.device)
    meta = SamplingMetadata.build([params], [list(prompt_ids)], [list(output_ids)], [gen], [set(stop_ids)], vocab, x.device)
    row = meta.rows[0]
    raw = raw_logprobs(x)[0]  # (vocab,)
    adjusted = Sampler.apply_penalties_bias_min_tokens(x, meta)  # (1, vocab): penalties, bias, min_tokens
    if row.greedy:
        scaled = adjusted
        final = torch.full_like(adjusted, float("-inf"))
        final[0, int(Sampler.greedy_tokens(adjusted)[0])] = 0.0  # the argmax is the only token it can take
        after_k = after_p = after_m = scaled
    else:
        scaled = apply_temperature(adjusted, meta.temperature)
        after_k = apply_top_k(scaled, meta.top_k)
        after_p = apply_top_p(after_k, meta.top_p)
        after_m = apply_min_p(after_p, meta.min_p)
        final = Sampler.apply_warpers(adjusted, meta)  # the sampler's own chain: the source of truth
        if not torch.equal(torch.isfinite(final), torch.isfinite(after_m)):
            raise RuntimeError("the inspector's filter chain disagrees with the Sampler's")
    sampler_token = int(Sampler()(x, meta).token_ids[0])

    scaled_prob = torch.softmax(scaled[0], dim=-1)
    final_prob = torch.softmax(final[0], dim=-1)
    raw_prob = raw.exp()
    n = min(top_n, vocab)
    ids = list(dict.fromkeys(torch.topk(raw, n).indices.tolist() + torch.topk(scaled[0], n).indices.tolist()
                             + [sampler_token] + [t for t in extra_ids if 0 <= t < vocab]))
    idx = torch.tensor(ids, dtype=torch.int64)
    verdict_k = _verdicts(scaled[0, idx], after_k[0, idx], (not row.greedy) and row.top_k > 0)
    verdict_p = _verdicts(after_k[0, idx], after_p[0, idx], (not row.greedy) and row.top_p < 1.0)
    verdict_m = _verdicts(after_p[0, idx], after_m[0, idx], (not row.greedy) and row.min_p > 0.0)
    kept = torch.isfinite(final[0, idx]).tolist()
    cands = []
    for j, tid in enumerate(ids):
        cands.append({"id": tid, "raw_prob": float(raw_prob[tid]), "raw_logprob": float(raw[tid]),
                      "adjusted_prob": float(scaled_prob[tid]), "final_prob": float(final_prob[tid]),
                      "top_k": verdict_k[j], "top_p": verdict_p[j], "min_p": verdict_m[j], "kept": bool(kept[j])})
    cands.sort(key=lambda c: (-c["adjusted_prob"], -c["raw_prob"], c["id"]))
    kept_all = torch.isfinite(final[0])
    return StepFilter(cands, sampler_token, row.greedy, int(kept_all.sum()), float(raw_prob[kept_all].sum()))
