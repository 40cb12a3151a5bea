"""Engine: the core step loop, schedule -> execute -> update, on token ids only (text is the OutputProcessor's)."""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import Future
from typing import Callable

import torch

from lmgen.engine.beam_group import BeamGroup
from lmgen.engine.kv_cache import BlockManager, KVCache, resolve_kv_cache_dtype
from lmgen.engine.outputs import EngineCoreOutput
from lmgen.engine.request import Request, RequestStatus
from lmgen.engine.runner import ModelRunner, ModelRunnerOutput
from lmgen.engine.sampled import per_sequence, prompt_logprobs, row_masks, verdict_fields
from lmgen.engine.scheduler import SampledTokens, Scheduler
from lmgen.engine.stats import EngineSnapshot, EngineStats
from lmgen.errors import ContextOverflowError, InvalidRequestError
from lmgen.models.base import CausalLM
from lmgen.sampling.beam import BeamSearch, candidates_needed
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.sampler import Sampler
from lmgen.sampling.structured.backend import GrammarBackend
from lmgen.sampling.metadata import SamplingMetadata
from lmgen.spec.speculator import Speculator


class Engine:
    """Owns the model, KV cache, scheduler and sampler; `step()` advances every running sequence by one step."""

    def __init__(
        self,
        model: CausalLM,
        *,
        eos_token_ids: frozenset[int],
        context_length: int,
        num_blocks: int,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        kv_cache: KVCache | None = None,
        grammar_backend: GrammarBackend | None = None,
        speculator: Speculator | None = None,
        kv_cache_dtype: str = "auto",
    ):
        cfg = model.config
        self.model, self.context_length = model, context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, model.dtype, model.device)
        # kv_cache: a cache built by the caller (tensor parallelism: one that mirrors block copies on every rank)
        self.kv_cache = kv_cache or KVCache(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, cache_dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # blocks behind the sliding window are released only when every layer slides (Mistral); Gemma 3's global
        # layers need the whole context
        window = cfg.sliding_window if cfg.layer_types is None else None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, self.eos_token_ids, window)
        self.runner = ModelRunner(model, self.kv_cache)
        self.sampler = Sampler()
        self.grammar_backend = grammar_backend  # structured output: compiles each request's grammar, computes masks
        self.speculator = speculator  # speculative decoding (lmgen.spec), None: one token per step
        self.sequences: dict[str, Request] = {}  # every live sequence (n > 1 siblings included), by sequence id
        self.requests: dict[str, list[str]] = {}  # user request id -> its live sequence ids
        self.beam_groups: dict[str, BeamGroup] = {}  # beam-search requests, by user request id
        self.last_token_time: dict[str, float] = {}
        # sequence id -> a callback handed that sequence's raw logits row (vocab,) each step (the inspector); empty
        # unless someone inspects, so the step pays one dict check
        self.observers: dict[str, Callable[[torch.Tensor], None]] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    observer: Callable[[torch.Tensor], None] | None = None) -> str:
        """Queues a request as its n sequences; raises ValueError (ContextOverflowError) for inputs it can never serve.

        n > 1: the siblings wait until the first has computed the prompt, then share its blocks via the prefix cache.
        `observer` (n == 1, no beams): called on this thread with a copy of the request's raw logits (vocab,) each
        time it samples (the inspector reads the full distribution this way)."""
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
        if observer is not None and (params.n != 1 or params.beam_width > 1):
            raise ValueError("an observer watches one sequence: n and beam_width must be 1")
        if params.beam_width > 1:
            return self._add_beam_request(ids, params, request_id)
        n = params.n
        seq_ids = [_seq_id(request_id, i) for i in range(n)]
        if request_id in self.requests or any(s in self.sequences for s in seq_ids):
            raise ValueError(f"request id {request_id!r} is already running")
        # siblings wait for the first sequence only when its prompt blocks can reach them through the prefix cache
        bm = self.block_manager
        shares = bm.enable_prefix_caching and params.prompt_logprobs is None and (len(ids) - 1) // bm.block_size > 0
        leader = None
        grammar = self._grammar(params)
        for i, seq_id in enumerate(seq_ids):
            req = Request(seq_id, ids, params, self._generator(params.seed, i), max_total_tokens=self.context_length,
                          index=i, parent_id=request_id, leader=leader)
            req.grammar = grammar.fork() if grammar is not None and i else grammar
            self.scheduler.add(req)
            self.sequences[seq_id] = req
            leader = leader or (req if shares else None)
        self.requests[request_id] = seq_ids
        if observer is not None:
            self.observers[request_id] = observer
        self.stats.prompt_tokens += len(ids) * n
        return request_id

    def _grammar(self, params: SamplingParams):
        """The request's compiled grammar matcher (structured output), or None."""
        if params.structured is None:
            return None
        if self.grammar_backend is None:
            raise InvalidRequestError("structured output needs a grammar backend; this engine has none",
                                      param="structured", value=params.structured.kind)
        return self.grammar_backend.matcher(params.structured)

    def _add_beam_request(self, ids: list[int], params: SamplingParams, request_id: str) -> str:
        """A beam search as one root sequence (the prompt); its group forks the beams as they survive."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        eos = set() if params.ignore_eos else set(self.eos_token_ids) | set(params.stop_token_ids or ())
        max_tokens = min(params.max_tokens or self.context_length, self.context_length - len(ids))
        search = BeamSearch(len(ids), beam_width=params.beam_width, max_tokens=max_tokens, eos_token_ids=eos,
                            length_penalty=params.length_penalty, early_stopping=params.early_stopping, n=params.n)
        # each beam is scored by the model's raw log-probs: the top (1 + #eos) * K of them (transformers' rule); the
        # user-facing cap of 20 logprobs does not apply to this internal request, so the field is set after validation
        score = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, ignore_eos=True)
        score.logprobs = candidates_needed(params.beam_width, eos)
        root = Request(request_id, ids, score, self._generator(0, 0), parent_id=request_id)
        self.scheduler.add(root)
        self.beam_groups[request_id] = BeamGroup(request_id, root, search)
        self.sequences[request_id] = root
        self.requests[request_id] = [request_id]
        self.stats.prompt_tokens += len(ids)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancels a user request (all of its n sequences) and frees its cache blocks."""
        self.beam_groups.pop(request_id, None)
        for seq_id in list(self.requests.get(request_id, ())):
            self._finish(request_id, seq_id, RequestStatus.FINISHED_ABORTED)

    def stop_sequences(self, seqs: list[tuple[str, int]]) -> None:
        """Ends sequences, as (request id, index), that the output processor saw reach a stop string."""
        for request_id, index in seqs:
            self._finish(request_id, _seq_id(request_id, index), RequestStatus.FINISHED_STOPPED)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def set_max_num_seqs(self, max_num_seqs: int) -> None:
        """How many sequences may run in one batch (the server's --max-num-seqs)."""
        if not isinstance(max_num_seqs, int) or isinstance(max_num_seqs, bool) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
        self.scheduler.max_num_seqs = max_num_seqs

    def request_ids(self) -> list[str]:
        """The user requests with a live sequence."""
        return list(self.requests)

    def unschedulable_request(self) -> str | None:
        """The oldest waiting request, if nothing runs (so it can never get the blocks it needs), else None."""
        sched = self.scheduler
        return sched.waiting[0].parent_id if sched.waiting and not sched.running else None

    def _finish(self, request_id: str, seq_id: str, status: RequestStatus | None) -> None:
        """Frees a sequence's blocks (unless the scheduler finished it already) and forgets it."""
        req = self.sequences.pop(seq_id, None)
        if req is not None and status is not None and not req.is_finished:
            self.scheduler.finish(req, status)
        self.last_token_time.pop(seq_id, None)
        if self.speculator is not None:
            self.speculator.release(seq_id)
        self.observers.pop(seq_id, None)
        seqs = self.requests.get(request_id)
        if seqs is not None and seq_id in seqs:
            seqs.remove(seq_id)
            if not seqs:
                del self.requests[request_id]

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        """An explicit RNG per sequence: seeded (seed + index for the n-th sample) or from OS entropy."""
        g = torch.Generator(device=self.model.device)
        g.manual_seed((seed + index) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One iteration of continuous batching: schedule -> execute (model + sampler) -> update."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                req = self.scheduler.waiting[0]
                raise RuntimeError(f"request {req.parent_id!r} needs more KV-cache blocks than exist")
            return []
        t0 = time.perf_counter()
        if self.speculator is not None:
            self.speculator.extend(sched, self.block_manager, self.scheduler.max_num_batched_tokens, self._min_tokens_stop_ids)
        prefill = sum(min(n, max(0, req.num_prompt_tokens - req.num_computed_tokens)) for req, n in sched.scheduled)
        masks = self._start_grammar_masks(sched)  # structured output (on a worker thread while the model runs, on GPU)
        sampled = self._sample(self.runner.run(sched), masks)
        outputs = self.scheduler.update_from_output(sched, sampled)
        outputs += self._advance_beams({r.parent_id for r, _ in sched.scheduled if r.beam_group is not None})
        now, dt = time.monotonic(), time.perf_counter() - t0
        for req, _ in sched.scheduled:
            if req.request_id in sampled.token_ids:
                self._record_latency(req, now)
            if req.is_finished:
                self._finish(req.parent_id, req.request_id, None)
        self.stats.steps += 1
        self.stats.generation_tokens += sum(len(o.new_token_ids) for o in outputs)  # a finished beam brings all its tokens
        self.stats.prefill_tokens += prefill
        if prefill:
            self.stats.prefill_seconds += dt
        else:
            self.stats.decode_seconds += dt
        return outputs

    def _advance_beams(self, request_ids: set[str]) -> list[EngineCoreOutput]:
        """Advances every beam group whose live beams were all scored; a finished group yields its n results."""
        outputs = []
        for rid in request_ids:
            group = self.beam_groups.get(rid)
            if group is None or not group.ready:
                continue
            new, gone = group.advance(self.scheduler, self.block_manager, self.kv_cache)
            for req in gone:
                self._finish(rid, req.request_id, None)
            for req in new:
                self.sequences[req.request_id] = req
                self.requests.setdefault(rid, []).append(req.request_id)
            if group.search.done:
                del self.beam_groups[rid]
                outputs += group.outputs(group.search.prompt_len, gone[0].num_cached_tokens if gone else 0)
        return outputs

    def _start_grammar_masks(self, sched) -> tuple[list[str], Future] | None:
        """Structured rows that draw a token this step (their chunk reaches the newest token): start their masks."""
        reqs = [r for r, n in sched.scheduled if r.grammar is not None and r.num_computed_tokens + n >= r.num_tokens]
        if not reqs:
            return None
        return [r.request_id for r in reqs], self.grammar_backend.start_masks([r.grammar for r in reqs])

    def _sample(self, out: ModelRunnerOutput, masks: tuple[list[str], Future] | None = None) -> SampledTokens:
        reqs = out.sample_requests
        prompt_lp = {seq_id: prompt_logprobs(logits, targets, self.sequences[seq_id].params.prompt_logprobs)
                     for seq_id, (logits, targets) in out.prompt_logits.items()}
        spec = self._verify(out)
        if not reqs:
            return SampledTokens(spec.get("token_ids", {}), spec.get("logprobs", {}), spec.get("chosen_logprobs", {}),
                                 prompt_lp, spec.get("accepted", {}))
        if self.observers:
            for row, req in enumerate(reqs):
                if req.request_id in self.observers:
                    self.observers[req.request_id](out.logits[row].clone())
        meta = SamplingMetadata.build(
            [r.params for r in reqs], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            [r.generator for r in reqs], [self._min_tokens_stop_ids(r) for r in reqs], out.logits.shape[-1], out.logits.device,
            row_masks(reqs, masks),
        )
        token_ids, entries, chosen_by_seq = per_sequence(reqs, self.sampler(out.logits, meta))
        if spec:  # the speculating sequences' final tokens (their accepted proposals go in `accepted`)
            token_ids.update(spec["token_ids"])
            entries.update(spec["logprobs"])
            chosen_by_seq.update(spec["chosen_logprobs"])
        return SampledTokens(token_ids, entries, chosen_by_seq, prompt_lp, spec.get("accepted", {}))

    def _verify(self, out: ModelRunnerOutput) -> dict[str, dict]:
        """SampledTokens fields for the sequences that scored proposals this step (empty without speculation)."""
        if not out.spec_logits:
            return {}
        return verdict_fields(self.speculator.verify(out.spec_logits, self.sequences, self._min_tokens_stop_ids),
                              self.sequences)

    def _min_tokens_stop_ids(self, req: Request) -> set[int]:
        ids = set(req.params.stop_token_ids or ())
        if not req.params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def _record_latency(self, req: Request, now: float) -> None:
        last = self.last_token_time.get(req.request_id)
        if last is None:
            req.first_token_time = now
            self.stats.ttft.append(now - req.arrival_time)
        else:
            self.stats.itl.append(now - last)
        self.last_token_time[req.request_id] = now

    # ---- state for observers --------------------------------------------------------------------
    def snapshot(self, drain_latencies: bool = False) -> EngineSnapshot:
        """A frozen view of queue, cache and counters; with `drain_latencies`, hands over (and clears) the
        TTFT / ITL samples gathered since the last draining call. Call it on the thread that steps the engine."""
        bm, st, sched = self.block_manager, self.stats, self.scheduler
        ttft, itl = (tuple(st.ttft), tuple(st.itl)) if drain_latencies else ((), ())
        if drain_latencies:
            st.ttft.clear()
            st.itl.clear()
        spec = self.speculator.stats if self.speculator is not None else None
        return EngineSnapshot(len(sched.running), len(sched.waiting), bm.num_used_blocks, bm.num_blocks, bm.prefix_hits,
                              bm.prefix_queries, st.prompt_tokens, st.prefill_tokens, st.generation_tokens, st.steps, ttft, itl,
                              *((spec.draft_tokens, spec.accepted_tokens, spec.stepped_back) if spec else ()))


def _seq_id(request_id: str, index: int) -> str:
    """The engine's id of a request's index-th sequence."""
    return request_id if index == 0 else f"{request_id}#{index}"
