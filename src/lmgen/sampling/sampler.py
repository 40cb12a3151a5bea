"""Batched token sampler.

``SamplingMetadata.build`` turns the per-request ``SamplingParams`` of one
batch into per-row tensors (as vLLM's ``SamplingMetadata``); ``Sampler``
turns a ``(batch, vocab)`` logits tensor into one token per row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Hashable, NamedTuple, Sequence

import torch

from .logits import (
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    token_counts,
)
from .params import SamplingParams

__all__ = ["SamplingMetadata", "SamplerOutput", "Sampler", "RowInputs"]


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

    def key(self) -> Hashable:
        seen = None
        if self.repetition_penalty != 1.0:
            seen = frozenset(self.prompt_token_ids) | frozenset(self.output_token_ids)
        counts = None
        if self.presence_penalty != 0.0 or self.frequency_penalty != 0.0:
            counts = tuple(sorted(Counter(self.output_token_ids).items()))
        return self[:10] + (seen, counts)


@dataclass
class SamplingMetadata:
    """Per-row tensors describing how to sample each row of one batch.

    Rows are sequences.  The per-row scalar parameters are ``(batch,)``
    tensors; the ``(batch, vocab)`` tensors (``seen_mask``,
    ``output_counts``, ``logit_bias``, ``min_tokens_mask``) are built on
    first use, and are ``None`` when no row needs them, so that the sampler
    skips the corresponding transform entirely.

    ``logits_rows`` (optional): row ``i`` samples from ``logits[logits_rows[i]]``
    instead of ``logits[i]``; e.g. the ``n`` samples of one prompt share its
    logits row at their first step.  Rows that share a logits row and have
    identical transform inputs are transformed once and then each draws with
    its own generator.
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
    logits_rows: list[int] | None = None

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
            logits_rows=None,
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
        logits_rows: list[int] | None = None,
    ) -> "SamplingMetadata":
        """Build the metadata for a batch.

        ``stop_ids_for_min_tokens[i]`` is the set of ids (EOS and the request's
        ``stop_token_ids``) to suppress while row ``i`` has generated fewer than
        ``params[i].min_tokens`` tokens.  ``generators[i]`` is the row's random
        generator (seeded when ``params[i].seed`` is set); it must live on
        ``device``.  ``None`` means "use the sampler's own entropy-seeded
        generator" (never the global RNG).  ``logits_rows``: see the class
        docstring.  The token-id lists are read, not copied: do not change
        them while the metadata is in use.
        """
        batch = len(params)
        for name, seq in (
            ("prompt_token_ids", prompt_token_ids),
            ("output_token_ids", output_token_ids),
            ("generators", generators),
            ("stop_ids_for_min_tokens", stop_ids_for_min_tokens),
        ) + ((("logits_rows", logits_rows),) if logits_rows is not None else ()):
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
                )
            )

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
            logits_rows=list(logits_rows) if logits_rows is not None else None,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # (batch,) int64
    # (batch,) float32: log-prob of the chosen token under the model's raw
    # distribution (log_softmax of the sampler's input logits); None when no
    # row of the batch asked for logprobs.
    logprobs: torch.Tensor | None
    # ids (batch, k) int64 and values (batch, k) float32 of the k largest raw
    # log-probs, k = largest ``logprobs`` requested in the batch; None when
    # no row asked for logprobs or k == 0.  Rows asking for fewer use the
    # first entries (sorted, largest first).
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None


class Sampler:
    """Pick one token per row of a ``(batch, vocab)`` logits tensor.

    Order of operations, each row with its own parameters:

    1. penalties: repetition (prompt + output tokens, transformers
       semantics), then presence and frequency (output tokens, OpenAI
       semantics);
    2. logit_bias;
    3. min_tokens suppression (EOS / stop ids -> -inf while too short);
    4. temperature;
    5. top-k;
    6. top-p;
    7. min-p;
    8. draw: greedy rows (temperature 0 or beam search) take the argmax of the
       logits after steps 1-3 (lowest id on ties); the other rows draw from
       the softmax of the logits after step 7.

    Log-probabilities (``SamplerOutput.logprobs`` / ``top_logprobs``) are
    those of the model's distribution **before** any transform, i.e.
    ``log_softmax`` of the input logits (in float32), as vLLM and the OpenAI
    API report them.

    Randomness: each sampled row draws one uniform ``u`` in ``[0, 1)``
    (float64) from its own ``torch.Generator`` (``SamplingMetadata.generators``)
    and takes the token where ``u`` falls in the cumulative distribution
    (float64 cumsum over the vocabulary in id order; tokens of probability 0
    can never be chosen).  A row consumes exactly one random number per step
    whatever else is in the batch, so a seeded request gives the same tokens
    alone or in any batch.  Rows without a generator use the sampler's own
    entropy-seeded generator, never the global RNG.

    Work sharing: rows that read the same logits row (``meta.logits_rows``,
    or a logits tensor expanded along the batch dimension, i.e. with batch
    stride 0) and have identical transform inputs are transformed once; each
    still draws with its own generator.
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

    # -- steps 1-7 --------------------------------------------------------
    @staticmethod
    def apply_penalties_bias_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Steps 1-3 (the logits greedy rows take their argmax of)."""
        x = logits
        if meta.seen_mask is not None:
            x = apply_repetition_penalty(x, meta.seen_mask, meta.repetition_penalty)
        if meta.output_counts is not None:
            x = apply_presence_frequency_penalties(
                x, meta.output_counts, meta.presence_penalty, meta.frequency_penalty
            )
        if meta.logit_bias is not None:
            x = apply_logit_bias(x, meta.logit_bias)
        if meta.min_tokens_mask is not None:
            x = apply_min_tokens(x, meta.min_tokens_mask)
        return x

    @staticmethod
    def apply_warpers(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Steps 4-7 for rows that sample (greedy rows have every warper off)."""
        rows = meta.rows
        x = logits
        if any(r.temperature not in (0.0, 1.0) for r in rows):
            x = apply_temperature(x, meta.temperature)
        if any(r.top_k > 0 for r in rows):
            x = apply_top_k(x, meta.top_k)
        if any(r.top_p < 1.0 for r in rows):
            x = apply_top_p(x, meta.top_p)
        if any(r.min_p > 0.0 for r in rows):
            x = apply_min_p(x, meta.min_p)
        return x

    # -- step 8 -----------------------------------------------------------
    def _uniforms(self, rows: list[int], meta: SamplingMetadata, device) -> torch.Tensor:
        """One float64 uniform per row in ``rows``, each from its row's generator."""
        dtype = torch.float64 if torch.device(device).type != "mps" else torch.float32
        u = torch.empty((len(rows),), dtype=dtype, device=device)
        shared = []
        for j, i in enumerate(rows):
            gen = meta.generators[i]
            if gen is None:
                shared.append(j)
            else:
                u[j] = torch.rand((), generator=gen, dtype=dtype, device=device)
        if shared:
            gen = self._fallback_generator(torch.device(device))
            u[shared] = torch.rand((len(shared),), generator=gen, dtype=dtype, device=device)
        return u

    @staticmethod
    def _inverse_cdf(probs: torch.Tensor, groups: list[int], u: torch.Tensor) -> torch.Tensor:
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

    # -- grouping ---------------------------------------------------------
    @staticmethod
    def _groups(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[list[int], list[int], list[int]]:
        """(source logits row per group, representative row per group, group per row)."""
        batch = meta.batch_size
        if meta.logits_rows is not None:
            src = list(meta.logits_rows)
        elif logits.shape[0] > 1 and logits.stride(0) == 0:
            src = [0] * batch  # expanded tensor: every row is the same
        else:
            src = list(range(batch))
        if len(set(src)) == batch:
            return src, list(range(batch)), list(range(batch))
        index: dict[tuple, int] = {}
        group_src, group_rep, group_of = [], [], []
        for i in range(batch):
            key = (src[i], meta.rows[i].key())
            g = index.get(key)
            if g is None:
                g = index[key] = len(group_src)
                group_src.append(src[i])
                group_rep.append(i)
            group_of.append(g)
        return group_src, group_rep, group_of

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        batch = meta.batch_size
        if logits.dim() != 2:
            raise ValueError(f"logits must be 2-D (rows, vocab), got shape {tuple(logits.shape)}")
        if meta.logits_rows is None and logits.shape[0] != batch:
            raise ValueError(f"logits must have shape (batch={batch}, vocab), got {tuple(logits.shape)}")
        if meta.logits_rows is not None and any(not 0 <= r < logits.shape[0] for r in meta.logits_rows):
            raise ValueError(f"logits_rows out of range for {logits.shape[0]} logits rows")

        group_src, group_rep, group_of = self._groups(logits, meta)
        identity = len(group_rep) == batch and group_src == list(range(batch))
        if identity:
            x = logits.to(torch.float32)
            gmeta = meta
        else:
            src = torch.tensor(group_src, dtype=torch.int64, device=logits.device)
            x = logits.index_select(0, src).to(torch.float32)
            gmeta = meta.select(group_rep)
        rows_g = torch.tensor(group_of, dtype=torch.int64, device=logits.device)

        # Logprobs of the raw model distribution (before any transform).
        top_out = None
        raw_logprobs = None
        k = meta.max_num_logprobs
        if k is not None:
            raw_logprobs = torch.log_softmax(x, dim=-1)
            if k > 0:
                values, ids = torch.topk(raw_logprobs, min(k, x.shape[-1]), dim=-1)
                top_out = (ids, values) if identity else (ids[rows_g], values[rows_g])

        y = self.apply_penalties_bias_min_tokens(x, gmeta)
        token_g = None
        if any(gmeta.greedy_rows):
            token_g = torch.argmax(y, dim=-1)  # first (lowest) id among equal maxima
        tokens = token_g[rows_g] if token_g is not None else torch.zeros(
            (batch,), dtype=torch.int64, device=logits.device
        )

        sampled = meta.sampled_rows
        if sampled:
            probs = torch.softmax(self.apply_warpers(y, gmeta), dim=-1)
            u = self._uniforms(sampled, meta, logits.device)
            drawn = self._inverse_cdf(probs, [group_of[i] for i in sampled], u)
            if len(sampled) == batch:
                tokens = drawn
            else:
                tokens = tokens.clone()
                tokens[torch.tensor(sampled, dtype=torch.int64, device=logits.device)] = drawn

        logprobs_out = None
        if raw_logprobs is not None:
            logprobs_out = raw_logprobs[rows_g, tokens]
        return SamplerOutput(token_ids=tokens, logprobs=logprobs_out, top_logprobs=top_out)
