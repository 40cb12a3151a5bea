"""Server-sent events for the streaming routes: the SSE response, the client-disconnect guard, merging several
request streams, and the completion / chat chunk generators (framing: sse.py)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmgen.chat.tool_calls import ToolCallStream
from lmgen.engine.outputs import StepOutput
from lmgen.server.protocol import requests as Q
from lmgen.server.protocol import responses as R
from lmgen.server.request_stream import RequestStream
from lmgen.server.errors import api_error
from lmgen.server.outputs import step_logprob_pairs
from lmgen.server.sse import DONE, TextFrames, sse

if TYPE_CHECKING:
    from lmgen.server.service import ServerContext


class SSEResponse(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends (done, client gone, cancelled), so a
    stream whose body never started still aborts its requests."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class ClientGone(Exception):
    pass


async def unless_disconnected(request: Request, awaitable):
    """Awaits `awaitable`, but cancels it (aborting its requests) if the client hangs up first."""
    task = asyncio.ensure_future(awaitable)

    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:
        pass
    raise ClientGone()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StepOutput]]:
    """(prompt index, output) from several request streams as they come."""
    if len(streams) == 1:
        async for so in streams[0]:
            yield 0, so
        return
    out: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for so in stream:
                await out.put((i, so))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await out.put((i, e))
        finally:
            await out.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(streams)
        while live:
            i, item = await out.get()
            if item is end:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


async def completion_stream(srv: ServerContext, req: Q.CompletionRequest, rid: str, created: int,
                             prompts: list[tuple[str, list[int]]], streams: list[RequestStream]) -> AsyncIterator[str]:
    n, k = req.n, req.logprobs
    offsets: dict[int, int] = {}
    last: dict[int, StepOutput] = {}  # choice index -> its latest output

    def chunk_model(index: int, text: str, logprobs=None, finish=None, stop_reason=None) -> R.CompletionChunk:
        return R.CompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=[R.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)])

    text_frames = TextFrames(chunk_model)

    def chunk(index: int, text: str, logprobs=None, finish=None, stop_reason=None) -> str:
        if logprobs is None and finish is None and stop_reason is None:
            return text_frames.frame(index, text)
        return sse(chunk_model(index, text, logprobs, finish, stop_reason))

    try:
        if req.echo:
            for pi, (text, ids) in enumerate(prompts):
                for j in range(n):
                    offsets[pi * n + j] = len(text)
                    yield chunk(pi * n + j, text)
        async for pi, so in _merge(streams):
            index = pi * n + so.index
            last[index] = so
            logprobs = None
            pairs = step_logprob_pairs(so, k)
            if pairs:
                logprobs, offsets[index] = srv.completion_logprobs(pairs, k, offsets.get(index, 0))
            if not (so.delta_text or logprobs or so.finished):
                continue
            yield chunk(index, so.delta_text, logprobs, so.finish_reason, so.stop_reason)
        if req.stream_options and req.stream_options.include_usage:
            cached = [next((s.num_cached_tokens for i, s in last.items() if i // n == pi), 0) for pi in range(len(prompts))]
            usage = srv.usage([len(ids) for _, ids in prompts], cached, sum(s.num_output_tokens for s in last.values()),
                              srv.spec_counts(list(last.values())))
            yield sse(R.CompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=[], usage=usage))
        yield DONE
    except Exception as e:  # the engine failed this request after the stream had started
        yield sse(api_error(e).body())
        yield DONE
    finally:
        for s in streams:
            s.abort()


async def chat_stream(srv: ServerContext, req: Q.ChatCompletionRequest, rid: str, created: int, prompt_len: int,
                       stream: RequestStream, tool_calls: bool = False) -> AsyncIterator[str]:
    """SSE chunks of a chat completion; with `tool_calls`, the output is read as it streams into content or
    `delta.tool_calls` fragments (OpenAI's shape), and a sequence that made calls finishes with "tool_calls"."""
    k = (req.top_logprobs or 0) if req.logprobs else None
    parsers: dict[int, ToolCallStream] = {}
    last: dict[int, StepOutput] = {}  # choice index -> its latest output

    def chunk_model(index: int, delta: R.DeltaMessage, logprobs=None, finish=None, stop_reason=None) -> R.ChatCompletionChunk:
        return R.ChatCompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=[R.ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)])

    content_frames = TextFrames(lambda index, text: chunk_model(index, R.DeltaMessage(content=text)))

    def chunk(index: int, content: str | None, calls=None, logprobs=None, finish=None, stop_reason=None) -> str:
        if content and calls is None and logprobs is None and finish is None and stop_reason is None:
            return content_frames.frame(index, content)
        return sse(chunk_model(index, R.DeltaMessage(content=content, tool_calls=calls), logprobs, finish, stop_reason))

    try:
        for j in range(req.n):
            yield sse(chunk_model(j, R.DeltaMessage(role="assistant", content="")))
        async for so in stream:
            last[so.index] = so
            logprobs = None
            pairs = step_logprob_pairs(so, k)
            if pairs:
                logprobs = srv.chat_logprobs(pairs, k)
            content, calls, finish = so.delta_text, None, so.finish_reason
            if tool_calls:
                parser = parsers.setdefault(so.index, ToolCallStream())
                content, calls = parser.feed(so.delta_text)
                finish = "tool_calls" if parser.calls and finish == "stop" else finish
            if not (content or calls or logprobs or so.finished):
                continue
            yield chunk(so.index, content or None, calls or None, logprobs, finish, so.stop_reason)
        if req.stream_options and req.stream_options.include_usage:
            cached = next(iter(last.values())).num_cached_tokens if last else 0
            usage = srv.usage([prompt_len], [cached], sum(s.num_output_tokens for s in last.values()),
                              srv.spec_counts(list(last.values())))
            yield sse(R.ChatCompletionChunk(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=[], usage=usage))
        yield DONE
    except Exception as e:
        yield sse(api_error(e).body())
        yield DONE
    finally:
        stream.abort()
