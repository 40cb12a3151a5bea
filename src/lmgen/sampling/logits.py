"""Batched logits transforms, one small function per transform.

Every function takes ``logits`` of shape ``(batch, vocab)`` plus per-row
parameter tensors (a batch mixes requests with different parameters), and
returns a **new** tensor; the input is never modified in place.  A row whose
parameter has its "off" value comes back bit-for-bit unchanged:

=====================  ==========================
transform              "off" value for a row
=====================  ==========================
repetition penalty     ``1.0``
presence / frequency   ``0.0`` / ``0.0``
logit bias             all-zero bias row
min_tokens             no token to suppress
grammar mask           every token allowed
temperature            ``1.0`` (and ``0.0``: greedy rows are left alone)
top-k                  ``k <= 0`` or ``k >= vocab``
top-p                  ``1.0``
min-p                  ``0.0``
=====================  ==========================

Removed tokens get ``-inf``.
"""

from __future__ import annotations

import torch

__all__ = [
    "apply_repetition_penalty",
    "apply_presence_frequency_penalties",
    "apply_logit_bias",
    "apply_min_tokens",
    "apply_grammar_mask",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "token_mask",
    "token_counts",
]

_NEG_INF = float("-inf")


def _col(values: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row parameter as a ``(batch, 1)`` column of the logits' dtype."""
    return values.to(device=logits.device, dtype=logits.dtype).reshape(-1, 1)


# ---------------------------------------------------------------------------
# helpers to build per-row token tensors
# ---------------------------------------------------------------------------

def token_counts(token_ids: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """``(batch, vocab)`` int32 count of each token id in each row's list.

    Ids outside ``[0, vocab_size)`` are ignored.
    """
    batch = len(token_ids)
    rows: list[int] = []
    cols: list[int] = []
    for i, ids in enumerate(token_ids):
        kept = [t for t in ids if 0 <= t < vocab_size]
        rows.extend([i] * len(kept))
        cols.extend(kept)
    counts = torch.zeros((batch, vocab_size), dtype=torch.int32)
    if cols:
        counts.index_put_(
            (torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)),
            torch.ones(len(cols), dtype=torch.int32),
            accumulate=True,
        )
    return counts.to(device) if device is not None else counts


def token_mask(token_ids: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """``(batch, vocab)`` bool: whether each token id occurs in each row's list."""
    return token_counts(token_ids, vocab_size, device) > 0


# ---------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------

def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """Hugging Face ``RepetitionPenaltyLogitsProcessor``, per row.

    ``seen``: ``(batch, vocab)`` bool, tokens of the prompt and the output so
    far.  ``penalty``: ``(batch,)``.  For a seen token, ``l -> l * p`` when
    ``l < 0`` else ``l / p``.
    """
    p = _col(penalty, logits)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    apply = seen.to(logits.device) & (p != 1.0)
    return torch.where(apply, penalised, logits)


def apply_presence_frequency_penalties(
    logits: torch.Tensor,
    output_counts: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
) -> torch.Tensor:
    """OpenAI penalties over the output tokens, per row.

    ``l[j] -= presence * (count[j] > 0) + frequency * count[j]`` where
    ``count`` (``(batch, vocab)``) counts token ``j`` in the generated output.
    """
    counts = output_counts.to(device=logits.device)
    pres = _col(presence_penalty, logits)
    freq = _col(frequency_penalty, logits)
    delta = pres * (counts > 0).to(logits.dtype) + freq * counts.to(logits.dtype)
    # Subtracting an exact 0.0 leaves every value unchanged (also -inf/+inf),
    # but be explicit so that "off" rows are untouched even for NaN inputs.
    apply = (counts > 0) & ((pres != 0.0) | (freq != 0.0))
    return torch.where(apply, logits - delta, logits)


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add a dense ``(batch, vocab)`` bias (zero where a request has none)."""
    bias = bias.to(device=logits.device, dtype=logits.dtype)
    return torch.where(bias != 0.0, logits + bias, logits)


def apply_min_tokens(logits: torch.Tensor, suppress: torch.Tensor) -> torch.Tensor:
    """Set the logits of suppressed tokens (``(batch, vocab)`` bool) to -inf.

    The caller marks EOS / stop token ids only for rows that have generated
    fewer than ``min_tokens`` tokens.
    """
    return logits.masked_fill(suppress.to(logits.device), _NEG_INF)


def apply_grammar_mask(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Structured output: set the logits of tokens the row's grammar forbids (``allowed``: ``(batch, vocab)`` bool,
    all True for unconstrained rows) to -inf."""
    return logits.masked_fill(~allowed.to(logits.device), _NEG_INF)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature.

    Rows with temperature ``1.0`` (no-op) or ``0.0`` (greedy; decided by the
    caller with an argmax) are returned unchanged.
    """
    t = _col(temperature, logits)
    keep = (t == 1.0) | (t == 0.0)
    safe_t = torch.where(keep, torch.ones_like(t), t)
    return torch.where(keep, logits, logits / safe_t)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the tokens whose logit is at least the k-th largest.

    Tokens tied with the k-th largest value are all kept (as Hugging Face's
    ``TopKLogitsWarper``), so the kept set is deterministic.  ``k <= 0`` or
    ``k >= vocab`` disables top-k for the row.
    """
    vocab = logits.shape[-1]
    k = top_k.to(device=logits.device, dtype=torch.int64).reshape(-1)
    active = (k > 0) & (k < vocab)
    if not bool(active.any()):
        return logits.clone()
    k_max = int(k[active].max())
    top_vals = torch.topk(logits, k_max, dim=-1).values  # (batch, k_max), descending
    idx = (k.clamp(min=1, max=k_max) - 1).unsqueeze(1)
    kth = top_vals.gather(1, idx)  # (batch, 1)
    remove = (logits < kth) & active.unsqueeze(1)
    return logits.masked_fill(remove, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    cumulative probability reaches ``p`` (always at least one token).

    Tokens are ranked by logit, ties broken by lower token id first (a stable
    sort), so among equally likely tokens at the boundary the lower ids are
    kept.  A token is kept when the probability mass of the tokens ranked
    strictly before it is below ``p``.  ``p >= 1`` disables the filter.
    """
    p = _col(top_p, logits).to(torch.float32)
    active = (p < 1.0).reshape(-1)
    if not bool(active.any()):
        return logits.clone()
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.to(torch.float32), dim=-1)
    # Accumulate in float64: with large vocabularies float32 cumsums drift.
    mass_before = torch.cumsum(probs.to(torch.float64), dim=-1) - probs.to(torch.float64)
    remove_sorted = mass_before >= p.to(torch.float64)
    remove_sorted[:, 0] = False
    remove_sorted &= active.unsqueeze(1)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with ``prob >= min_p * max_prob`` (probabilities of the
    row's softmax).  ``min_p == 0`` disables the filter; the most likely
    token is always kept.
    """
    m = _col(min_p, logits).to(torch.float32)
    active = (m > 0.0).reshape(-1)
    if not bool(active.any()):
        return logits.clone()
    probs = torch.softmax(logits.to(torch.float32), dim=-1)
    threshold = m * probs.max(dim=-1, keepdim=True).values
    remove = (probs < threshold) & active.unsqueeze(1)
    return logits.masked_fill(remove, _NEG_INF)
