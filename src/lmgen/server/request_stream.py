"""What an AsyncEngine caller holds: a request's RequestStream (its outputs as an async iterator), the
RequestSnapshot inside each output, and the errors admission can raise (QueueFullError, EngineClosedError).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmgen.engine.request import StepOutput

if TYPE_CHECKING:
    from lmgen.server.async_engine import AsyncEngine


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (`max_queue`); the server answers 503."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down (or its thread died) and takes no new requests."""


class EngineStepError(RuntimeError):
    """An engine step failed; the requests it was running were failed with this error."""


@dataclass(frozen=True)
class RequestSnapshot:
    """A Request's state right after one step, copied in the engine thread.

    `logprobs` holds only the entries of this step's new tokens ({token_id: logprob}, top-k plus the
    chosen one), or None when the request did not ask for logprobs. `output_token_ids` is the full
    list, copied only at the final step (None before). `prompt_logprobs` is sent with the first output
    only (None afterwards)."""

    request_id: str
    index: int
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    cumulative_logprob: float
    logprobs: list[dict[int, float]] | None
    prompt_logprobs: list[dict[int, float] | None] | None
    output_token_ids: list[int] | None
    stop_reason: int | str | None
    finish_reason: str | None


_ACCEPTED = object()  # first item on a stream: the engine took the request
_DONE = object()  # last item: every one of the request's n sequences finished


class RequestStream:
    """One request's outputs, as an async iterator of StepOutputs (all n sequences interleaved).

    `abort()` (or leaving an `async for` early through `aclose`) cancels the request and frees its
    cache blocks; it is a no-op once the request finished."""

    def __init__(self, engine: "AsyncEngine", request_id: str, n: int, loop: asyncio.AbstractEventLoop):
        self._engine, self.request_id, self.n, self._loop = engine, request_id, n, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.remaining = n  # engine thread: sequences still running
        self.sent_prompt_logprobs = False  # engine thread

    # engine thread -> event loop
    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def _accepted(self) -> None:
        item = await self._queue.get()
        if item is not _ACCEPTED:
            self.finished = True
            raise item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled (client gone): cancel the request too
            self.abort()
            raise
        if item is _DONE:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine._submit(("abort", self.request_id))

    async def aclose(self) -> None:
        self.abort()
