"""ModelRunner: turns a SchedulerOutput into input tensors, runs the model, returns logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmgen.engine.kv_cache import KVCache
from lmgen.engine.request import Request
from lmgen.engine.scheduler import SchedulerOutput
from lmgen.layers.attention import AttentionMetadata
from lmgen.models.base import CausalLM


@dataclass
class ModelRunnerOutput:
    """Logits for the requests that reached the end of their known tokens this step (they sample next)."""

    sample_requests: list[Request]  # in row order of `logits`
    logits: torch.Tensor  # (len(sample_requests), vocab) float32
    # request -> (positions' logits (chunk_len, vocab), the token ids those positions predict) for prompt_logprobs
    prompt_logits: dict[str, tuple[torch.Tensor, list[int]]]
    # speculative decoding: request -> logits (k + 1, vocab) at its newest token and each of its k proposed tokens
    spec_logits: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache):
        self.model, self.kv_cache = model, kv_cache
        self.device = model.device
        self.block_size = kv_cache.block_size

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache slots of positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids (tokens,), positions (tokens,) and the AttentionMetadata of one step.  A model that mixes
        sliding-window and global layers (config.layer_types, Gemma 3) gets the windowed view in `meta.sliding`."""
        config = self.model.config
        mixed = config.layer_types is not None and "sliding_attention" in config.layer_types
        window = config.sliding_window if config.layer_types is None else None
        build = self._prepare_decode if all(n == 1 for _, n in sched.scheduled) else self._prepare_general
        input_ids, positions, meta = build(sched, window)
        if mixed:
            meta.sliding = build(sched, config.sliding_window)[2]
        return input_ids, positions, meta

    def _prepare_general(self, sched: SchedulerOutput, window: int | None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Any mix of prefill chunks and decode tokens; a query at p sees positions > p - window (None: all)."""
        ids, positions, slot_mapping, kv_rows, q_lens, kv_lens = [], [], [], [], [], []
        token_seq, token_kv_start, token_kv_len = [], [], []  # per token: its sequence, the span of it that it sees
        for b, (req, n) in enumerate(sched.scheduled):
            start = req.num_computed_tokens
            tokens = req.all_token_ids + req.spec_token_ids  # proposed tokens are scored after the newest one
            ids.extend(tokens[start:start + n])
            positions.append(torch.arange(start, start + n))
            kv_slots = self._slots(req.block_table, 0, start + n)  # (context,)
            slot_mapping.append(kv_slots[start:])
            kv_rows.append(kv_slots)
            q_lens.append(n)
            kv_lens.append(start + n)
            for p in range(start, start + n):  # position p sees positions [p + 1 - seen, p]
                seen = p + 1 if window is None else min(p + 1, window)
                token_seq.append(b)
                token_kv_start.append(p + 1 - seen)
                token_kv_len.append(seen)
        batch, max_q, max_kv = len(q_lens), max(q_lens), max(kv_lens)
        windowed = window is not None and max_kv > window  # some query cannot see its whole context
        q_len_t, kv_len_t = torch.tensor(q_lens), torch.tensor(kv_lens)
        q_start = torch.cumsum(q_len_t, 0) - q_len_t  # (batch,) first token row of each sequence
        q_off = torch.arange(max_q)  # (max_q,)
        q_valid = q_off[None, :] < q_len_t[:, None]  # (batch, max_q)
        query_index = torch.where(q_valid, q_start[:, None] + q_off[None, :], 0)  # (batch, max_q)
        output_index = (torch.arange(batch)[:, None] * max_q + q_off[None, :])[q_valid]  # (tokens,)
        kv_index = torch.zeros(batch, max_kv, dtype=torch.long)  # (batch, max_kv), padding reads slot 0
        for b, rows in enumerate(kv_rows):
            kv_index[b, : rows.numel()] = rows
        # a prefill from position 0: plain causal
        causal = batch == 1 and max_q > 1 and q_lens[0] == kv_lens[0] and not windowed
        if ((batch == 1 and max_q == 1) or causal) and not windowed:
            mask = None  # a single decode token sees its whole context; causal: SDPA's is_causal does the masking
        else:
            # query at position p (= kv_len - q_len + offset) sees cached positions <= p (and > p - window); padded
            # query rows see position 0 only, so softmax never divides by zero (their output is discarded).
            q_pos = (kv_len_t - q_len_t)[:, None] + q_off[None, :]  # (batch, max_q)
            q_pos = torch.where(q_valid, q_pos, 0)
            kv_pos = torch.arange(max_kv)  # (max_kv,)
            mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < kv_len_t[:, None, None])
            if windowed:
                mask &= kv_pos[None, None, :] > q_pos[:, :, None] - window
            mask = mask[:, None, :, :]  # (batch, 1, max_q, max_kv)
        dev = self.device
        single = batch == 1  # one sequence: no padding, queries are the tokens themselves
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping).to(dev),
            query_index=None if single else query_index.to(dev),
            output_index=None if single else output_index.to(dev),
            kv_index=kv_index.to(dev),
            mask=None if mask is None else mask.to(dev),
            decode_kv_lens=kv_len_t.to(dev) if max_q == 1 and not windowed else None,
            causal=causal,
            token_seq=torch.tensor(token_seq, device=dev),
            token_kv_start=torch.tensor(token_kv_start, device=dev),
            token_kv_len=torch.tensor(token_kv_len, device=dev),
            max_position=max_kv - 1,
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.cat(positions).to(dev), meta

    def _prepare_decode(self, sched: SchedulerOutput, window: int | None) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """`prepare` for a pure decode step (one new token per sequence), with the same tensors, built from Python
        ints and a handful of tensor ops: this runs once per generated token, where `prepare`'s per-sequence
        arange/index ops over the whole context cost about as much as a layer of the model."""
        bs = self.block_size
        ids, positions, slots, tables = [], [], [], []
        for req, _ in sched.scheduled:
            pos = req.num_computed_tokens
            ids.append(req.prompt_token_ids[pos] if pos < req.num_prompt_tokens
                       else req.output_token_ids[pos - req.num_prompt_tokens])
            positions.append(pos)
            slots.append(req.block_table[pos // bs] * bs + pos % bs)
            tables.append(req.block_table[: pos // bs + 1])
        batch, max_blocks = len(ids), max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])  # (batch, max_blocks)
        context_t = torch.tensor(positions) + 1  # (batch,) tokens of each sequence so far
        if window is None or max(positions) < window:
            kv_len_t = context_t
            max_kv = max(positions) + 1
            # (batch, max_kv) flat slots of each sequence's context
            kv_index = (table[:, :, None] * bs + torch.arange(bs)).view(batch, -1)[:, :max_kv]
        else:  # sliding window: each sequence's last `window` positions only
            kv_len_t = torch.clamp(context_t, max=window)  # (batch,)
            start = context_t - kv_len_t  # (batch,) first visible position
            max_kv = int(kv_len_t.max())
            kv_pos = start[:, None] + torch.arange(max_kv)[None, :]  # (batch, max_kv)
            kv_pos = torch.where(kv_pos < (start + kv_len_t)[:, None], kv_pos, start[:, None])  # padding: in range
            kv_index = table.gather(1, kv_pos // bs) * bs + kv_pos % bs
        if batch == 1:
            query_index = output_index = mask = None  # one sequence: no padding, it sees its whole context
            kv_index = kv_index.contiguous()
        else:
            query_index = torch.arange(batch)[:, None]  # (batch, 1)
            output_index = torch.arange(batch)  # (batch,)
            valid = torch.arange(max_kv)[None, :] < kv_len_t[:, None]  # (batch, max_kv)
            mask = valid[:, None, None, :]  # (batch, 1, 1, max_kv)
            # padding reads slot 0, as in `_prepare_general`: an unwritten slot of the cache (torch.empty) may hold
            # NaN, and a masked NaN value still poisons SDPA's weighted sum (0 * NaN)
            kv_index = torch.where(valid, kv_index, 0)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=dev),
            query_index=None if query_index is None else query_index.to(dev),
            output_index=None if output_index is None else output_index.to(dev),
            kv_index=kv_index.to(dev),
            mask=None if mask is None else mask.to(dev),
            decode_kv_lens=kv_len_t.to(dev),
            token_seq=torch.arange(batch, device=dev),  # one token per sequence, seeing its whole kv_index row
            token_kv_start=torch.zeros(batch, dtype=torch.long, device=dev),
            token_kv_len=kv_len_t.to(dev),
            max_position=max(positions),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), torch.tensor(positions, device=dev), meta

    def forward(self, sched: SchedulerOutput) -> torch.Tensor:
        """The step's hidden states (tokens, hidden); a pipeline-parallel model gets the step in micro-batches of
        whole sequences (one per stage), so that its stages overlap."""
        parts = getattr(self.model, "micro_batches", 1)
        if parts > 1 and len(sched.scheduled) > 1:
            return self.model.forward_micro_batches([self.prepare(p) for p in split_schedule(sched, parts)],
                                                    self.kv_cache.layers)
        input_ids, positions, meta = self.prepare(sched)
        return self.model(input_ids, positions, self.kv_cache.layers, meta)

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        hidden = self.forward(sched)  # (tokens, hidden)
        rows, sample_requests, prompt_logits, spec_logits = [], [], {}, {}
        offset = 0
        for req, n in sched.scheduled:
            end_pos = req.num_computed_tokens + n
            if req.params.prompt_logprobs is not None and req.num_computed_tokens < req.num_prompt_tokens:
                # position p predicts token p+1; only prompt positions are reported
                last = min(end_pos, req.num_prompt_tokens - 1)
                if last > req.num_computed_tokens:
                    chunk = hidden[offset:offset + last - req.num_computed_tokens]
                    targets = req.prompt_token_ids[req.num_computed_tokens + 1:last + 1]
                    prompt_logits[req.request_id] = (self.model.compute_logits(chunk), targets)
            if req.spec_token_ids:  # the newest token and k proposals: logits at all k + 1 positions
                k1 = len(req.spec_token_ids) + 1
                spec_logits[req.request_id] = self.model.compute_logits(hidden[offset + n - k1:offset + n])
            elif end_pos == req.num_tokens:  # reached the newest token: its logits give the next one
                rows.append(offset + n - 1)
                sample_requests.append(req)
            offset += n
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        else:
            logits = hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32)
        return ModelRunnerOutput(sample_requests, logits, prompt_logits, spec_logits)


def split_schedule(sched: SchedulerOutput, parts: int) -> list[SchedulerOutput]:
    """The step's sequences in up to `parts` consecutive groups of about equal token counts (batch order kept)."""
    total, groups, current, count = sched.num_tokens, [], [], 0
    for req, n in sched.scheduled:
        current.append((req, n))
        count += n
        if count * parts >= total * (len(groups) + 1) and len(groups) < parts - 1:
            groups.append(SchedulerOutput(current))
            current = []
    if current:
        groups.append(SchedulerOutput(current))
    return groups
