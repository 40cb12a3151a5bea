"""What an AsyncEngine caller holds: a request's RequestStream (its StepOutputs as an async iterator, then
its RequestOutput), and the errors admission can raise (QueueFullError, EngineClosedError).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from lmgen.engine.outputs import RequestOutput, StepOutput


ACCEPTED = object()  # first item on a stream: the engine took the request
DONE = object()  # last item: every one of the request's n sequences finished (after its RequestOutput)


class RequestStream:
    """One request's outputs, as an async iterator of StepOutputs (all n sequences interleaved); once it is
    exhausted, `result` holds the finished RequestOutput.

    `abort()` (or leaving an `async for` early through `aclose`) cancels the request and frees its
    cache blocks; it is a no-op once the request finished."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, on_abort: Callable[[str], None]):
        self.request_id, self._loop, self._on_abort = request_id, loop, on_abort
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.result: RequestOutput | None = None

    # engine thread -> event loop
    def put(self, item) -> None:
        RequestStream.put_many([(self, item)])

    @staticmethod
    def put_many(items: list[tuple["RequestStream", object]]) -> None:
        """Hands each stream its item (in order) with one call per event loop: a step's outputs for 32 streams
        wake the loop once, not 32 times (each wake-up is a pipe write here and a GIL hand-off there)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in items:
            by_loop.setdefault(stream._loop, []).append((stream._queue, item))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, pairs)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    async def wait_accepted(self) -> None:
        item = await self._queue.get()
        if item is not ACCEPTED:
            self.finished = True
            raise item

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StepOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            if isinstance(item, RequestOutput):
                self.result = item
                item = await self._queue.get()
        except BaseException:  # cancelled (client gone): cancel the request too
            self.abort()
            raise
        if item is DONE:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._on_abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)
