"""Step 8 for sampled rows: one uniform per row from its own generator, mapped through the inverse CDF.

Kept apart so the per-request randomness (seeded generators, entropy-seeded fallback) lives in one place.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["TokenDraw"]


class TokenDraw:
    """Draws one token per sampled row from a batch of distributions.

    Each row draws one uniform ``u`` in ``[0, 1)`` (float64; float32 on MPS)
    from its own ``torch.Generator`` and takes the token where ``u`` falls in
    the cumulative distribution (float64 cumsum over the vocabulary in id
    order; tokens of probability 0 can never be chosen).  Rows without a
    generator share this object's entropy-seeded generator (one per device),
    never the global RNG.
    """

    def __init__(self) -> None:
        self._fallback: dict[str, torch.Generator] = {}

    def _fallback_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._fallback.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.seed()  # non-deterministic seed from the OS
            self._fallback[key] = gen
        return gen

    def uniforms(self, rows: list[int], generators: Sequence[torch.Generator | None], device) -> torch.Tensor:
        """One float64 uniform per row in ``rows``, each from its row's generator (``generators[i]``)."""
        dtype = torch.float64 if torch.device(device).type != "mps" else torch.float32
        u = torch.empty((len(rows),), dtype=dtype, device=device)
        shared = []
        for j, i in enumerate(rows):
            gen = generators[i]
            if gen is None:
                shared.append(j)
            else:
                u[j] = torch.rand((), generator=gen, dtype=dtype, device=device)
        if shared:
            gen = self._fallback_generator(torch.device(device))
            u[shared] = torch.rand((len(shared),), generator=gen, dtype=dtype, device=device)
        return u

    @staticmethod
    def inverse_cdf(probs: torch.Tensor, groups: list[int], u: torch.Tensor) -> torch.Tensor:
        """Token for each uniform ``u[j]`` under distribution ``probs[groups[j]]``."""
        dtype = u.dtype
        cdf = torch.cumsum(probs.to(dtype), dim=-1)  # (G, V)
        vocab = probs.shape[-1]
        ids = torch.arange(vocab, device=probs.device)
        last_positive = torch.where(probs > 0, ids, -1).max(dim=-1).values  # (G,)
        # lay the uniforms out as a (G, max_per_group) matrix for one batched search
        slot: dict[int, int] = {}
        g_of, pos_of = [], []
        for g in groups:
            pos_of.append(slot.get(g, 0))
            slot[g] = pos_of[-1] + 1
            g_of.append(g)
        width = max(slot.values())
        g_idx = torch.tensor(g_of, dtype=torch.int64, device=probs.device)
        p_idx = torch.tensor(pos_of, dtype=torch.int64, device=probs.device)
        targets = torch.zeros((probs.shape[0], width), dtype=dtype, device=probs.device)
        targets[g_idx, p_idx] = u * cdf[g_idx, -1]
        found = torch.searchsorted(cdf, targets, right=True)[g_idx, p_idx]
        return torch.minimum(found, last_positive[g_idx])
