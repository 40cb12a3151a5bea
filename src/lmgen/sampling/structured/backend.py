"""GrammarBackend: llguidance's view of one model's vocabulary, the per-request matchers compiled against it, and the
batch's token masks (computed in parallel by llguidance, optionally while the forward pass runs).

Token ids only: the vocabulary is handed to llguidance once (the tokenizer's own JSON), then the engine feeds
matchers ids and reads back masks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import llguidance
import llguidance.numpy as llg_np  # not llguidance.torch: its import loads torch's compiler (~1 s per start)
import numpy as np
import torch

from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import StructuredOutput, grammar_limits

logger = logging.getLogger("lmgen.structured")

__all__ = ["GrammarBackend", "GrammarMatcher", "bitmask_to_bool", "COMPILED_CACHE"]

COMPILED_CACHE = 16  # compiled grammars kept per model (a bounded LRU: repeated schemas compile once)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed ``(rows, ceil(vocab/32))`` int32 (bit j of word w = token 32w+j allowed) -> ``(rows, vocab)`` bool.

    Read as bytes (little-endian words: byte 4w+k holds tokens 32w+8k..32w+8k+7, lowest bit first), each byte looked
    up in a 256 x 8 table: one byte of index per 8 tokens instead of a 32-wide int32 expansion."""
    rows = bitmask.shape[0]
    table = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8): bits of each byte value
    data = bitmask.contiguous().view(torch.uint8).long()  # (rows, 4 * words)
    return table[data].reshape(rows, -1)[:, :vocab_size]


class GrammarMatcher:
    """One sequence's position in its grammar: which tokens may come next, advanced with every accepted token."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def fork(self) -> "GrammarMatcher":
        """An independent copy at the same position (the n > 1 siblings of a request)."""
        return GrammarMatcher(self.matcher.deep_copy())

    def advance(self, token: int) -> str | None:
        """Consumes an accepted token: None while the grammar goes on, "end" when it has ended (nothing but EOS may
        follow), "error" when the matcher failed (a step over its limits, a token it refuses): the caller aborts."""
        self.matcher.consume_token(token)
        if self.matcher.is_error():
            logger.warning("structured output: the grammar matcher failed, the sequence is aborted: %s",
                           " ".join(self.matcher.get_error().split())[:400])
            return "error"
        return "end" if self.matcher.is_stopped() else None

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarBackend:
    """Per model (built once, cached on the LLM's engine): the llguidance tokenizer, created on first use because
    it takes ~0.3 s, and a worker thread for masks computed while the model runs."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], overlap: bool = False):
        self._tokenizer = tokenizer  # lmgen Tokenizer: only its vocabulary is read, once
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.overlap = overlap  # compute a step's masks on a worker thread while the forward pass runs
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> matcher at its start
        # (seconds, rows) of the most recent mask computations (bounded): what benchmarks/structured_bench.py reports
        self.mask_times: deque[tuple[float, int]] = deque(maxlen=4096)

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                tk = self._tokenizer.backend_tokenizer
                if tk is None:
                    raise InvalidRequestError("structured output needs a tokenizers-based vocabulary; this model's "
                                              "tokenizer (tiktoken) is not supported", param="structured", value=None)
                self._ll = llguidance.LLTokenizer(tk.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
                self._executor = llguidance.LLExecutor()
            return self._ll

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for `spec`, compiled against this vocabulary (bounded by `grammar_limits`) or copied from
        the last `COMPILED_CACHE` compiled grammars (the server compiles off the engine thread first, so the engine
        only copies); an error names the field."""
        grammar = spec.compiled()
        ll = self.ll_tokenizer()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(ll, grammar, log_level=0, limits=grammar_limits())
            if template.is_error():
                param = spec.param or spec.kind
                raise InvalidRequestError(f"{param}: the constraint cannot be compiled: "
                                          f"{' '.join(template.get_error().split())[:400]}", param=param, value=None)
            with self._lock:
                self._compiled[grammar] = template
                while len(self._compiled) > COMPILED_CACHE:
                    self._compiled.popitem(last=False)
        return GrammarMatcher(template.deep_copy())

    # ---- masks ------------------------------------------------------------------------------------
    def masks(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        """``(len(matchers), vocab)`` bool: the tokens each matcher allows next (computed in parallel)."""
        self.ll_tokenizer()
        t0 = time.perf_counter()
        bitmask = np.full(llg_np.get_bitmask_shape(len(matchers), self.vocab_size), -1, dtype=np.int32)
        if len(matchers) == 1:  # one row: no thread hand-off
            llg_np.fill_next_token_bitmask(matchers[0].matcher, bitmask)
        else:
            llg_np.fill_next_token_bitmask_par(self._executor, [(m.matcher, i) for i, m in enumerate(matchers)], bitmask)
        allowed = bitmask_to_bool(torch.from_numpy(bitmask), self.vocab_size)  # (rows, vocab)
        self.mask_times.append((time.perf_counter() - t0, len(matchers)))
        return allowed

    def start_masks(self, matchers: list[GrammarMatcher]) -> Future:
        """`masks(matchers)`, on the worker thread when `overlap` (the caller runs the model meanwhile)."""
        if not self.overlap:
            done: Future = Future()
            done.set_result(self.masks(matchers))
            return done
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmgen-grammar")
            pool = self._pool
        return pool.submit(self.masks, matchers)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
