"""Engine: the step loop. schedule -> run the model -> sample -> append tokens, detokenize, check stops."""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from lmgen.engine.kv_cache import BlockManager, KVCache
from lmgen.errors import ContextOverflowError
from lmgen.engine.request import Request, RequestStatus, StepOutput
from lmgen.engine.runner import ModelRunner
from lmgen.engine.scheduler import Scheduler
from lmgen.model.transformer import Transformer
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.sampler import Sampler, SamplingMetadata
from lmgen.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class EngineStats:
    """Counters since start, read by `--stats` and the server's /metrics."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prefill_tokens: int = 0  # prompt tokens actually computed (prefix-cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0
    prefill_seconds: float = 0.0  # time in steps that computed prompt tokens
    decode_seconds: float = 0.0  # time in pure decode steps
    # Latency samples, the most recent `max_samples` of each (bounded, so a long offline run does not grow them;
    # the server moves them into its /metrics histograms after every step)
    max_samples: int = 4096
    ttft: deque = field(init=False)  # seconds from arrival to first token, per request
    itl: deque = field(init=False)  # seconds between consecutive tokens

    def __post_init__(self) -> None:
        self.ttft, self.itl = deque(maxlen=self.max_samples), deque(maxlen=self.max_samples)


class Engine:
    """Owns the model, KV cache, scheduler and sampler; `step()` advances every running request by one step."""

    def __init__(
        self,
        model: Transformer,
        tokenizer,
        *,
        context_length: int,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
    ):
        cfg = model.config
        self.model, self.tokenizer, self.context_length = model, tokenizer, context_length
        self.kv_cache = KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler()
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | frozenset(getattr(tokenizer, "eos_token_ids", ()) or ())
        self.requests: dict[str, Request] = {}  # every live sequence (n>1 children included), by sequence id
        self.children: dict[str, list[str]] = {}  # user request id -> its sequence ids
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.last_token_time: dict[str, float] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queues a request; raises ValueError (ContextOverflowError) for inputs it can never serve."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.context_length:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens but the context window is {self.context_length} tokens "
                f"(at least one must be left to generate)",
                needed=len(ids) + 1, context_length=self.context_length, prompt_tokens=len(ids), max_tokens=params.max_tokens,
            )
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.children:
            raise ValueError(f"request id {request_id!r} is already running")
        req = Request(request_id, ids, params, self._generator(params.seed, 0), max_total_tokens=self.context_length)
        self.scheduler.add(req)
        self.requests[request_id] = req
        self.children[request_id] = [request_id]
        self.detokenizers[request_id] = self._detokenizer(req)
        self.stats.prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancels a user request (all of its n sequences) and frees its cache blocks."""
        for seq_id in self.children.pop(request_id, []):
            req = self.requests.pop(seq_id, None)
            if req is not None and not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self.detokenizers.pop(seq_id, None)
            self.last_token_time.pop(seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        """An explicit RNG per sequence: seeded (seed + index for the n-th sample) or from OS entropy."""
        g = torch.Generator(device=self.model.device)
        g.manual_seed((seed + index) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g

    def _detokenizer(self, req: Request) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, stop=req.params.stop or (), skip_special_tokens=req.params.skip_special_tokens,
            prompt_token_ids=req.prompt_token_ids,
        )

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One iteration of continuous batching; returns news for every sequence that produced a token."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"request {req.request_id!r} needs more KV-cache blocks than exist")
            return []
        t0 = time.perf_counter()
        out = self.runner.run(sched)
        prefill, window = 0, self.model.config.sliding_window
        for req, n in sched.scheduled:
            prefill += min(n, max(0, req.num_prompt_tokens - req.num_computed_tokens))
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req)
            if window is not None:
                self.block_manager.release_out_of_window(req, window)
        for seq_id, (logits, targets) in out.prompt_logits.items():
            self._record_prompt_logprobs(self.requests[seq_id], logits, targets)
        results = self._sample(out.sample_requests, out.logits) if out.sample_requests else []
        dt = time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.prefill_tokens += prefill
        if prefill:
            self.stats.prefill_seconds += dt
        else:
            self.stats.decode_seconds += dt
        return results

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[StepOutput]:
        # n > 1: the parent's prompt was prefilled once; its children fork its blocks and share its logits row.
        rows = list(range(len(reqs)))
        for i, req in enumerate(list(reqs)):
            if req.fork_pending:
                req.fork_pending = False
                for child in self._fork(req):
                    reqs.append(child)
                    rows.append(i)
        meta = SamplingMetadata.build(
            [r.params for r in reqs],
            [r.prompt_token_ids for r in reqs],
            [r.output_token_ids for r in reqs],
            [r.generator for r in reqs],
            [self._min_tokens_stop_ids(r) for r in reqs],
            logits.shape[-1],
            logits.device,
            logits_rows=rows if len(rows) != logits.shape[0] else None,  # the sampler shares the forked rows' work
        )
        sampled = self.sampler(logits, meta)
        tokens = sampled.token_ids.tolist()
        chosen = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top = (sampled.top_logprobs[0].tolist(), sampled.top_logprobs[1].tolist()) if sampled.top_logprobs is not None else None
        now = time.monotonic()
        results = []
        for row, (req, token) in enumerate(zip(reqs, tokens)):
            if req.params.logprobs is not None and chosen is not None:
                entry = {}
                if top is not None:
                    entry = dict(zip(top[0][row][: req.params.logprobs], top[1][row][: req.params.logprobs]))
                entry[token] = chosen[row]
                req.logprobs.append(entry)
            if chosen is not None:
                req.cumulative_logprob += chosen[row]
            results.append(self._append_token(req, token, now))
        return results

    def _fork(self, parent: Request) -> list[Request]:
        children = []
        for i in range(1, parent.params.n):
            seq_id = f"{parent.request_id}#{i}"
            child = Request(seq_id, parent.prompt_token_ids, parent.params, self._generator(parent.params.seed, i),
                            max_total_tokens=self.context_length, index=i, parent_id=parent.request_id)
            child.fork_pending = False
            child.arrival_time = parent.arrival_time
            copy = self.block_manager.fork(parent, child)
            if copy is not None:
                self.kv_cache.copy_block(*copy)
            self.scheduler.add_running(child)
            self.requests[seq_id] = child
            self.children[parent.request_id].append(seq_id)
            self.detokenizers[seq_id] = self._detokenizer(child)
            children.append(child)
        return children

    def _min_tokens_stop_ids(self, req: Request) -> set[int]:
        ids = set(req.params.stop_token_ids or ())
        if not req.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def _append_token(self, req: Request, token: int, now: float) -> StepOutput:
        req.output_token_ids.append(token)
        self.stats.generation_tokens += 1
        last = self.last_token_time.get(req.request_id)
        if last is None:
            req.first_token_time = now
            self.stats.ttft.append(now - req.arrival_time)
        else:
            self.stats.itl.append(now - last)
        self.last_token_time[req.request_id] = now
        detok = self.detokenizers[req.request_id]
        params, delta, status = req.params, "", None
        if token in (params.stop_token_ids or ()) or (not params.ignore_eos and token in self.eos_token_ids):
            status = RequestStatus.FINISHED_STOPPED  # the end token itself never reaches the text
            req.stop_reason = token if token in (params.stop_token_ids or ()) else None
        else:
            delta = detok.add_tokens([token])
            if detok.stop_string is not None:
                status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = detok.stop_string
                if params.include_stop_str_in_output:
                    delta += detok.stop_string
            elif len(req.output_token_ids) >= req.max_output_tokens:
                status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if detok.stop_string is None:
                delta += detok.flush()
            self.scheduler.finish(req, status)
            self.last_token_time.pop(req.request_id, None)
        return StepOutput(req.parent_id, req.index, [token], delta, req.is_finished, req.finish_reason, req)

    def _record_prompt_logprobs(self, req: Request, logits: torch.Tensor, targets: list[int]) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)  # (positions, vocab)
        k = req.params.prompt_logprobs
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]  # the first prompt token has no prediction
        top_v, top_i = logprobs.topk(k, dim=-1) if k else (None, None)
        target_lp = logprobs.gather(1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].tolist()
        for p, target in enumerate(targets):
            entry = dict(zip(top_i[p].tolist(), top_v[p].tolist())) if k else {}
            entry[target] = target_lp[p]
            req.prompt_logprobs.append(entry)

    def release(self, request_id: str) -> None:
        """Forgets a finished user request's bookkeeping (outputs already handed out)."""
        for seq_id in self.children.pop(request_id, []):
            self.requests.pop(seq_id, None)
            self.detokenizers.pop(seq_id, None)
