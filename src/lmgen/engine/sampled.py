"""Pure helpers of the engine's sampling step: sampler output and speculative verdicts as per-sequence values,
each sampled row's grammar mask, prompt logprobs."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from lmgen.engine.request import Request


def per_sequence(reqs: list[Request], sampled) -> tuple[dict[str, int], dict[str, dict], dict[str, float]]:
    """A SamplerOutput's rows as (token id, logprob entry where asked for, chosen logprob) by sequence id."""
    tokens = sampled.token_ids.tolist()
    chosen = sampled.logprobs.tolist() if sampled.logprobs is not None else None
    top = (sampled.top_logprobs[0].tolist(), sampled.top_logprobs[1].tolist()) if sampled.top_logprobs is not None else None
    entries, chosen_by_seq = {}, {}
    for row, (req, token) in enumerate(zip(reqs, tokens)):
        if chosen is not None:
            chosen_by_seq[req.request_id] = chosen[row]
            if req.params.logprobs is not None:
                k = req.params.logprobs
                entry = dict(zip(top[0][row][:k], top[1][row][:k])) if top is not None else {}
                entry[token] = chosen[row]
                entries[req.request_id] = entry
    return {r.request_id: t for r, t in zip(reqs, tokens)}, entries, chosen_by_seq


def verdict_fields(verdicts: dict, sequences: dict[str, Request]) -> dict[str, dict]:
    """SampledTokens fields for the sequences whose proposals were verified: the final token, its logprobs, and
    the accepted proposals before it."""
    fields = dict(token_ids={}, logprobs={}, chosen_logprobs={}, accepted={})
    for seq_id, v in verdicts.items():
        # logprobs count toward cumulative_logprob only where asked for, as on the one-token path
        chosen = v.chosen if sequences[seq_id].params.logprobs is not None else [0.0] * len(v.tokens)
        fields["token_ids"][seq_id] = v.tokens[-1]
        fields["chosen_logprobs"][seq_id] = chosen[-1]
        if v.entries is not None:
            fields["logprobs"][seq_id] = v.entries[-1]
        fields["accepted"][seq_id] = (v.tokens[:-1], None if v.entries is None else v.entries[:-1], chosen[:-1])
    return fields


def row_masks(reqs: list[Request], masks: tuple[list[str], Future] | None) -> list[torch.Tensor | None] | None:
    """Each sampled row's grammar mask ((vocab,) bool), None for unconstrained rows; None when no row has one."""
    if masks is None:
        return None
    ids, future = masks
    by_id = dict(zip(ids, future.result()))
    return [by_id.get(r.request_id) for r in reqs]


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[dict[int, float]]:
    """Per prompt position: the logprob of the token that follows it, plus the top-k candidates."""
    logprobs = torch.log_softmax(logits, dim=-1)  # (positions, vocab)
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (None, None)
    target_lp = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
    entries = []
    for p, target in enumerate(targets):
        entry = dict(zip(top_i[p].tolist(), top_v[p].tolist())) if k else {}
        entry[target] = target_lp[p]
        entries.append(entry)
    return entries
