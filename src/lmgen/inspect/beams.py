"""The beam-search tree of a prompt: lmgen's own BeamSearch (sampling/beam.py, transformers' semantics, the engine's
bookkeeping) driven step by step over the model's raw log-probs, recording every continuation it ranked: the ones
that stay live, the ones that finish, and the ones it prunes."""

from __future__ import annotations

from typing import Awaitable, Callable

import torch

from lmgen.errors import InvalidRequestError
from lmgen.sampling.beam import BeamSearch, candidates_needed
from lmgen.sampling.logprobs import raw_logprobs

MAX_BEAM_WIDTH = 4
MAX_BEAM_TOKENS = 32

ForwardMany = Callable[[list[list[int]]], Awaitable[list[torch.Tensor]]]  # ids per sequence -> (vocab,) logits each


def check_beam_args(beam_width, max_tokens) -> None:
    for name, value, hi in (("beam_width", beam_width, MAX_BEAM_WIDTH), ("max_tokens", max_tokens, MAX_BEAM_TOKENS)):
        lo = 2 if name == "beam_width" else 1
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise InvalidRequestError(f"{name} must be an integer in [{lo}, {hi}] in the inspector, got {value!r}",
                                      param=name, value=value)


async def beam_tree(prompt_ids: list[int], forward_many: ForwardMany, *, beam_width: int, max_tokens: int,
                    eos_token_ids: set[int], length_penalty: float = 1.0, early_stopping: bool | str = False,
                    context_length: int) -> dict:
    """Runs the search; returns {"nodes": [...], "steps": [...], "results": [...]} where a node is one continuation
    (its parent, token, log-prob, cumulative log-prob, the step it was ranked at, and its fate)."""
    check_beam_args(beam_width, max_tokens)
    max_tokens = min(max_tokens, context_length - len(prompt_ids))  # the engine's own cap
    if max_tokens < 1:
        raise InvalidRequestError("the prompt leaves no room in the context window for a beam", param="prompt",
                                  value=len(prompt_ids))
    search = BeamSearch(len(prompt_ids), beam_width=beam_width, max_tokens=max_tokens, eos_token_ids=eos_token_ids,
                        length_penalty=length_penalty, early_stopping=early_stopping, n=beam_width)
    k = candidates_needed(beam_width, set(eos_token_ids))
    nodes: dict[tuple[int, ...], dict] = {(): {"id": 0, "parent": None, "token": None, "logprob": 0.0,
                                               "cumulative_logprob": 0.0, "step": -1, "status": "live"}}
    steps = []
    while not search.done:
        seqs = search.pending()
        rows = await forward_many([prompt_ids + list(seq) for seq in seqs])
        dists = {}
        for seq, logits in zip(seqs, rows):
            values, ids = torch.topk(raw_logprobs(logits.reshape(1, -1).float())[0], k)  # the engine's top-k
            dists[seq] = dict(zip(ids.tolist(), values.tolist()))
        live_before = [tuple(s) for s in search.running]
        search.advance(dists)
        live_after = {tuple(s) for s in search.running} if not search.done else set()
        finished = {tuple(s) for s, ok in zip(search.finished, search.is_finished.tolist()) if ok}
        step_nodes = []
        for seq in dict.fromkeys(live_before):
            parent = nodes[seq]
            base = parent["cumulative_logprob"]
            for tok, lp in sorted(dists[seq].items(), key=lambda kv: -kv[1]):
                child = seq + (tok,)
                cum = float(torch.tensor(base, dtype=torch.float32) + torch.tensor(lp, dtype=torch.float32))
                status = "live" if child in live_after else "finished" if child in finished else "pruned"
                node = {"id": len(nodes), "parent": parent["id"], "token": tok, "logprob": lp,
                        "cumulative_logprob": cum, "step": len(steps), "status": status}
                nodes[child] = node
                step_nodes.append(node["id"])
        steps.append({"index": len(steps), "live": [nodes[tuple(s)]["id"] for s in search.running if tuple(s) in nodes]
                      if not search.done else [], "nodes": step_nodes})
    # a node can be ranked live at one step and still end up among the finished hypotheses (length limit)
    results = []
    for r in search.results():
        node = nodes.get(tuple(r.token_ids))
        if node is not None:
            node["status"] = "finished"
        results.append({"token_ids": r.token_ids, "cumulative_logprob": r.cumulative_logprob, "score": r.score,
                        "finish_reason": r.finish_reason, "node": None if node is None else node["id"]})
    return {"beam_width": beam_width, "max_tokens": max_tokens, "nodes": list(nodes.values()), "steps": steps,
            "results": results}
