"""Log-probabilities the sampler reports: those of the raw model distribution, before any transform.

Kept apart from the draw so the reported numbers never depend on penalties, bias or warpers.
"""

from __future__ import annotations

import torch

__all__ = ["raw_logprobs", "top_logprobs", "chosen_logprobs"]


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` of the (float32) input logits, as vLLM and the OpenAI API report them."""
    return torch.log_softmax(logits, dim=-1)


def top_logprobs(
    raw: torch.Tensor, k: int, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Ids and values of the ``k`` largest raw log-probs per row (largest first); ``None`` when ``k == 0``.

    ``raw`` has one row per group; ``rows`` maps each batch row to its group
    (``None`` when groups and batch rows coincide).
    """
    if k <= 0:
        return None
    values, ids = torch.topk(raw, min(k, raw.shape[-1]), dim=-1)
    return (ids, values) if rows is None else (ids[rows], values[rows])


def chosen_logprobs(raw: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Raw log-prob of ``tokens[i]`` for each batch row ``i`` (group ``rows[i]`` of ``raw``)."""
    return raw[rows, tokens]
