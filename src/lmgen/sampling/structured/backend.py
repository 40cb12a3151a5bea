"""GrammarBackend: llguidance's view of one model's vocabulary, the per-request matchers compiled against it, and the
batch's token masks (computed in parallel by llguidance, optionally while the forward pass runs).

Token ids only: the vocabulary is handed to llguidance once (the tokenizer's own JSON), then the engine feeds
matchers ids and reads back masks.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import llguidance
import llguidance.torch as llg_torch
import torch

from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import StructuredOutput, grammar_limits

__all__ = ["GrammarBackend", "GrammarMatcher", "bitmask_to_bool", "COMPILED_CACHE"]

COMPILED_CACHE = 64  # compiled grammars kept per model (a bounded LRU: repeated schemas compile once)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed ``(rows, ceil(vocab/32))`` int32 (bit j of word w = token 32w+j allowed) -> ``(rows, vocab)`` bool."""
    rows = bitmask.shape[0]
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # (32,) bit positions in a word
    return ((bitmask.unsqueeze(-1) >> bits) & 1).bool().reshape(rows, -1)[:, :vocab_size]


class GrammarMatcher:
    """One sequence's position in its grammar: which tokens may come next, advanced with every accepted token."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def fork(self) -> "GrammarMatcher":
        """An independent copy at the same position (the n > 1 siblings of a request)."""
        return GrammarMatcher(self.matcher.deep_copy())

    def advance(self, token: int) -> bool:
        """Consumes an accepted token; True when the grammar has ended (nothing but EOS may follow) or failed."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped() or self.matcher.is_error()

    @property
    def error(self) -> str:
        return self.matcher.get_error()


class GrammarBackend:
    """Per model (built once, cached on the LLM's engine): the llguidance tokenizer, created on first use because
    it takes ~0.3 s, and a worker thread for masks computed while the model runs."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int], overlap: bool = True):
        self._tokenizer = tokenizer  # lmgen Tokenizer: only its vocabulary is read, once
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.overlap = overlap  # compute a step's masks on a worker thread while the forward pass runs
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> matcher at its start

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
        bitmask = torch.full(llg_torch.get_bitmask_shape(len(matchers), self.vocab_size), -1, dtype=torch.int32)
        llg_torch.fill_next_token_bitmask_par(self._executor, [(m.matcher, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask_to_bool(bitmask, self.vocab_size)

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
