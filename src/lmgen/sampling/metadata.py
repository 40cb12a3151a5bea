"""Per-batch sampling metadata: one ``SamplingParams`` per request turned into per-row tensors.

``SamplingMetadata.build`` does the batching (as vLLM's ``SamplingMetadata``); the sampler only reads it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Hashable, NamedTuple, Sequence

import torch

from .logits import token_counts
from .params import SamplingParams

__all__ = ["RowInputs", "SamplingMetadata"]


class RowInputs(NamedTuple):
    """Everything steps 1-7 depend on for one row, besides its logits."""

    greedy: bool
    temperature: float  # 0.0 for greedy rows
    top_k: int  # 0 = off (also for greedy rows)
    top_p: float  # 1.0 = off
    min_p: float  # 0.0 = off
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: tuple[tuple[int, float], ...]  # sorted (token, bias) pairs
    suppressed: frozenset[int]  # ids set to -inf at this step (min_tokens)
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    grammar_row: int = -1  # structured output: this row's index in the batch (-1: unconstrained); never shared

    def key(self) -> Hashable:
        seen = None
        if self.repetition_penalty != 1.0:
            seen = frozenset(self.prompt_token_ids) | frozenset(self.output_token_ids)
        counts = None
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            counts = tuple(sorted(Counter(self.output_token_ids).items()))
        return self[:10] + (seen, counts, self.grammar_row)


@dataclass
class SamplingMetadata:
    """Per-row tensors describing how to sample each row of one batch.

    Rows are sequences.  The per-row scalar parameters are ``(batch,)``
    tensors; the ``(batch, vocab)`` tensors (``seen_mask``,
    ``output_counts``, ``logit_bias``, ``min_tokens_mask``) are built on
    first use, and are ``None`` when no row needs them, so that the sampler
    skips the corresponding transform entirely.
    """

    temperature: torch.Tensor  # (batch,) float32; 0 = greedy row
    greedy: torch.Tensor  # (batch,) bool
    top_k: torch.Tensor  # (batch,) int64; 0 = off
    top_p: torch.Tensor  # (batch,) float32; 1 = off
    min_p: torch.Tensor  # (batch,) float32; 0 = off
    repetition_penalty: torch.Tensor  # (batch,) float32; 1 = off
    presence_penalty: torch.Tensor  # (batch,) float32; 0 = off
    frequency_penalty: torch.Tensor  # (batch,) float32; 0 = off
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]  # per row, SamplingParams.logprobs
    rows: list[RowInputs]
    vocab_size: int
    device: torch.device
    grammar_mask: torch.Tensor | None = None  # (batch, vocab) bool: tokens the row's grammar allows; None: no grammar

    # -- summary (Python-side, no device sync) -----------------------------
    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def greedy_rows(self) -> list[bool]:
        return [r.greedy for r in self.rows]

    @property
    def all_greedy(self) -> bool:
        return all(r.greedy for r in self.rows)

    @property
    def sampled_rows(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not r.greedy]

    @property
    def max_num_logprobs(self) -> int | None:
        """Largest ``logprobs`` requested in the batch, ``None`` if no row asks."""
        wanted = [k for k in self.num_logprobs if k is not None]
        return max(wanted) if wanted else None

    # -- dense per-row tensors, built on first use -------------------------
    @cached_property
    def seen_mask(self) -> torch.Tensor | None:
        """(batch, vocab) bool: tokens of prompt + output (rows with a repetition penalty)."""
        if all(r.repetition_penalty == 1.0 for r in self.rows):
            return None
        histories = [
            list(r.prompt_token_ids) + list(r.output_token_ids) if r.repetition_penalty != 1.0 else []
            for r in self.rows
        ]
        return token_counts(histories, self.vocab_size, self.device) > 0

    @cached_property
    def output_counts(self) -> torch.Tensor | None:
        """(batch, vocab) int32: output token counts (rows with presence/frequency penalties)."""
        active = [r.presence_penalty != 0.0 or r.frequency_penalty != 0.0 for r in self.rows]
        if not any(active):
            return None
        outputs = [list(r.output_token_ids) if a else [] for r, a in zip(self.rows, active)]
        return token_counts(outputs, self.vocab_size, self.device)

    @cached_property
    def logit_bias(self) -> torch.Tensor | None:
        """(batch, vocab) float32 dense bias."""
        if not any(r.logit_bias for r in self.rows):
            return None
        rows, cols, values = [], [], []
        for i, r in enumerate(self.rows):
            for token, value in r.logit_bias:
                if 0 <= token < self.vocab_size:
                    rows.append(i)
                    cols.append(token)
                    values.append(value)
        dense = torch.zeros((self.batch_size, self.vocab_size), dtype=torch.float32)
        if cols:
            dense[torch.tensor(rows), torch.tensor(cols)] = torch.tensor(values, dtype=torch.float32)
        return dense.to(self.device)

    @cached_property
    def min_tokens_mask(self) -> torch.Tensor | None:
        """(batch, vocab) bool: tokens suppressed at this step (min_tokens)."""
        if not any(r.suppressed for r in self.rows):
            return None
        rows, cols = [], []
        for i, r in enumerate(self.rows):
            rows.extend([i] * len(r.suppressed))
            cols.extend(r.suppressed)
        mask = torch.zeros((self.batch_size, self.vocab_size), dtype=torch.bool)
        mask[torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)] = True
        return mask.to(self.device)

    def select(self, rows: list[int]) -> "SamplingMetadata":
        """The metadata of a subset of rows (in the given order)."""
        idx = torch.tensor(rows, dtype=torch.int64, device=self.temperature.device)
        return SamplingMetadata(
            temperature=self.temperature.index_select(0, idx),
            greedy=self.greedy.index_select(0, idx),
            top_k=self.top_k.index_select(0, idx),
            top_p=self.top_p.index_select(0, idx),
            min_p=self.min_p.index_select(0, idx),
            repetition_penalty=self.repetition_penalty.index_select(0, idx),
            presence_penalty=self.presence_penalty.index_select(0, idx),
            frequency_penalty=self.frequency_penalty.index_select(0, idx),
            generators=[self.generators[i] for i in rows],
            num_logprobs=[self.num_logprobs[i] for i in rows],
            rows=[self.rows[i] for i in rows],
            vocab_size=self.vocab_size,
            device=self.device,
            grammar_mask=None if self.grammar_mask is None else self.grammar_mask.index_select(
                0, idx.to(self.grammar_mask.device)),
        )

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        stop_ids_for_min_tokens: list[set[int]],
        vocab_size: int,
        device,
        grammar_masks: list[torch.Tensor | None] | None = None,
    ) -> "SamplingMetadata":
        """Build the metadata for a batch.

        ``stop_ids_for_min_tokens[i]`` is the set of ids (EOS and the request's
        ``stop_token_ids``) to suppress while row ``i`` has generated fewer than
        ``params[i].min_tokens`` tokens.  ``generators[i]`` is the row's random
        generator (seeded when ``params[i].seed`` is set); it must live on
        ``device``.  ``None`` means "use the sampler's own entropy-seeded
        generator" (never the global RNG).  ``grammar_masks[i]``: the ``(vocab,)``
        bool tokens row ``i``'s grammar allows (``None``: unconstrained).  The token-id lists are read, not copied: do not change
        them while the metadata is in use.
        """
        batch = len(params)
        for name, seq in (
            ("prompt_token_ids", prompt_token_ids),
            ("output_token_ids", output_token_ids),
            ("generators", generators),
            ("stop_ids_for_min_tokens", stop_ids_for_min_tokens),
        ):
            if len(seq) != batch:
                raise ValueError(f"{name} has {len(seq)} rows, expected {batch}")

        rows = []
        for i, p in enumerate(params):
            greedy = p.greedy
            suppressed: frozenset[int] = frozenset()
            if len(output_token_ids[i]) < p.min_tokens:
                suppressed = frozenset(t for t in stop_ids_for_min_tokens[i] if 0 <= t < vocab_size)
            rows.append(
                RowInputs(
                    greedy=greedy,
                    # greedy rows: temperature 0 and no filters (they take an argmax)
                    temperature=0.0 if greedy else p.temperature,
                    top_k=0 if (greedy or p.top_k <= 0 or p.top_k >= vocab_size) else p.top_k,
                    top_p=1.0 if greedy else p.top_p,
                    min_p=0.0 if greedy else p.min_p,
                    repetition_penalty=p.repetition_penalty,
                    presence_penalty=p.presence_penalty,
                    frequency_penalty=p.frequency_penalty,
                    logit_bias=tuple(sorted((p.logit_bias or {}).items())),
                    suppressed=suppressed,
                    prompt_token_ids=prompt_token_ids[i],
                    output_token_ids=output_token_ids[i],
                    grammar_row=i if grammar_masks is not None and grammar_masks[i] is not None else -1,
                )
            )
        dense_mask = None
        if grammar_masks is not None and any(m is not None for m in grammar_masks):
            everything = None
            rows_mask = []
            for m in grammar_masks:
                if m is None:
                    everything = torch.ones(vocab_size, dtype=torch.bool) if everything is None else everything
                rows_mask.append(everything if m is None else m)
            dense_mask = torch.stack(rows_mask).to(device)  # (batch, vocab)

        def col(name, dtype):
            return torch.tensor([getattr(r, name) for r in rows], dtype=dtype, device=device)

        return cls(
            temperature=col("temperature", torch.float32),
            greedy=col("greedy", torch.bool),
            top_k=col("top_k", torch.int64),
            top_p=col("top_p", torch.float32),
            min_p=col("min_p", torch.float32),
            repetition_penalty=col("repetition_penalty", torch.float32),
            presence_penalty=col("presence_penalty", torch.float32),
            frequency_penalty=col("frequency_penalty", torch.float32),
            generators=list(generators),
            num_logprobs=[p.logprobs for p in params],
            rows=rows,
            vocab_size=vocab_size,
            device=torch.device(device),
            grammar_mask=dense_mask,
        )
