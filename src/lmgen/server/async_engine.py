"""AsyncEngine: the synchronous, not thread-safe Engine driven by ONE background thread, fed from asyncio.

Only the engine thread touches the Engine (add_request, step, abort, release). Coroutines talk to it
through a thread-safe command queue (add / abort / stop); the thread answers each request on that
request's own asyncio.Queue through `loop.call_soon_threadsafe` (one call per step for all of them). The
thread blocks on the command queue while there is nothing to run, and otherwise alternates "take every
pending command" with one `engine.step()`, so a new request joins the running batch at the next step
(continuous batching).

The engine thread also runs the OutputProcessor (text, stop strings), so what a coroutine receives are frozen
values: `StepOutput`s as they come, then the finished `RequestOutput`. It talks to the engine only through
add_request / abort / step / snapshot. `RequestStream` and the errors are in `request_stream`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator, Callable

from lmgen.engine.output_processor import OutputProcessor
from lmgen.engine.outputs import StepOutput
from lmgen.errors import EngineClosedError, EngineStepError, InvalidRequestError, QueueFullError, WorkerLostError
from lmgen.sampling.params import SamplingParams
from lmgen.server.metrics import ServerMetrics
from lmgen.server.request_stream import ACCEPTED, DONE, RequestStream

logger = logging.getLogger("lmgen.server")


class AsyncEngine:
    """Runs `llm.engine` in a background thread and serves many asyncio callers at once."""

    def __init__(self, llm, max_queue: int = 256, max_num_seqs: int | None = None, metrics: ServerMetrics | None = None,
                 max_n: int = 128):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        if not isinstance(max_n, int) or max_n < 1:
            raise ValueError(f"max_n must be a positive integer, got {max_n!r}")
        self.llm = llm
        self.engine = llm.engine
        self.processor = OutputProcessor(llm.tokenizer)  # engine thread only
        if max_num_seqs is not None:
            self.engine.set_max_num_seqs(max_num_seqs)
        self.max_queue, self.max_n = max_queue, max_n
        self.metrics = metrics or ServerMetrics()
        self.metrics.update(self.engine.snapshot())  # no engine thread yet: safe to read here
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only (len() is read elsewhere)
        # adds submitted by the event loop / taken by the engine thread: each counter has one writer
        self._adds_submitted = 0
        self._adds_taken = 0
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        self._stopping = False  # engine thread
        self.dead: BaseException | None = None  # set if the engine thread itself crashed, or lost a worker
        # called (on the engine thread) when the engine can never step again (a tensor-parallel worker died):
        # `lmgen serve` uses it to stop the server, which then exits with status 1
        self.on_fatal: Callable[[BaseException], None] | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmgen-engine", daemon=True)
                self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    @property
    def num_in_flight(self) -> int:
        """User requests accepted and not finished (plus those on their way to the thread)."""
        return len(self._streams) + self.num_pending

    @property
    def num_pending(self) -> int:
        """Requests handed to the engine thread that it has not picked up yet."""
        return self._adds_submitted - self._adds_taken

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stops taking requests, lets in-flight ones finish for up to `timeout` seconds, aborts the
        rest, then stops the thread."""
        self._closed = True
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline and self._thread.is_alive():
            await asyncio.sleep(0.05)
        if self.num_in_flight:
            logger.warning("shutdown: aborting %d request(s) still running after %.0fs", self.num_in_flight, timeout)
        self._submit(("stop",))
        await asyncio.to_thread(self._thread.join, 30.0)

    # ---- requests (event loop side) ---------------------------------------------------------------
    async def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                          observer=None) -> RequestStream:
        """Hands a request to the engine and returns its stream once the engine accepted it. Raises what
        the engine raised on admission (ValueError / ContextOverflowError), QueueFullError, or
        EngineClosedError. `observer`: see Engine.add_request (called on the engine thread)."""
        fan_out = max(params.n, params.beam_width)
        if fan_out > self.max_n:  # n sequences (or beams) per request: bounded, so one request cannot flood the queue
            which = "n" if params.n >= params.beam_width else "beam_width"
            raise InvalidRequestError(f"{which} must be at most {self.max_n} on this server (its --max-n), got {fan_out}",
                                      param=which, value=fan_out)
        if self._closed or self.dead is not None:
            raise EngineClosedError("the server is shutting down" if self._closed else f"the engine stopped: {self.dead}")
        self.start()
        stream = RequestStream(request_id, asyncio.get_running_loop(), lambda rid: self._submit(("abort", rid)))
        self._adds_submitted += 1
        self._submit(("add", stream, list(prompt_ids), params, observer))
        try:
            await stream.wait_accepted()
        except asyncio.CancelledError:
            stream.finished = False
            stream.abort()  # it may have been accepted meanwhile
            raise
        return stream

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[StepOutput]:
        """Yields the request's StepOutputs as the engine produces them; cancelling (or closing) the
        generator aborts the request and frees its blocks."""
        stream = await self.add_request(prompt_ids, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    async def call(self, fn):
        """Runs `fn()` on the engine thread between two steps (so never at the same time as a step on the same
        model) and returns its result or raises its exception; for the inspector's on-demand reads."""
        if self._closed or self.dead is not None:
            raise EngineClosedError("the server is shutting down" if self._closed else f"the engine stopped: {self.dead}")
        self.start()
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(ok: bool, value) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        self._submit(("call", fn, lambda ok, value: loop.call_soon_threadsafe(deliver, ok, value)))
        return await future

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.engine.has_unfinished():
                    self._guarded(self._handle, self._commands.get())  # idle: sleep until something arrives
                while not self._stopping:
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        break
                    self._guarded(self._handle, cmd)
                self.metrics.update(self.engine.snapshot())  # admissions and aborts change what /metrics shows
                if not self._stopping and self.engine.has_unfinished():
                    self._guarded(self._step)
        except BaseException as e:  # a bug in this loop itself: fail everyone, refuse new work
            logger.exception("engine thread crashed")
            self.dead = e
        finally:
            err = EngineClosedError("the server shut down before this request finished") if self.dead is None else \
                EngineClosedError(f"the engine stopped: {self.dead}" if isinstance(self.dead, WorkerLostError)
                                  else f"the engine stopped: {self.dead!r}")
            for rid in list(self._streams):
                self._fail(rid, err, abort=True)
            # anything still queued gets an answer too
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "add":
                    self._adds_taken += 1
                    cmd[1].put(err)
                elif cmd[0] == "call":
                    cmd[2](False, err)

    def _guarded(self, fn, *args) -> None:
        """Runs one unit of the loop; an exception there (a bug, or an engine call failing outside a
        step) is logged and recovered from like a failed step, never allowed to end the loop."""
        try:
            fn(*args)
        except Exception as e:
            logger.exception("engine loop: %s failed", getattr(fn, "__name__", fn))
            try:
                self._recover(e)
            except Exception:
                logger.exception("engine loop: recovery failed")

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, stream, ids, params, observer = cmd
            self._adds_taken += 1
            self._add(stream, ids, params, observer)
        elif kind == "call":
            _, fn, reply = cmd
            try:
                reply(True, fn())
            except Exception as e:  # the caller hears about it; the loop carries on
                reply(False, e)
        elif kind == "abort":
            rid = cmd[1]
            if self._streams.pop(rid, None) is not None:
                self.engine.abort(rid)
                self.processor.abort(rid)
                self.metrics.request_finished("abort")
        elif kind == "stop":
            self._stopping = True

    def _queue_is_full(self) -> bool:
        free_seats = max(0, self.engine.max_num_seqs - self.engine.num_running)
        return self.engine.num_waiting >= self.max_queue + free_seats

    def _add(self, stream: RequestStream, ids: list[int], params: SamplingParams, observer=None) -> None:
        if stream.finished:  # cancelled before the thread got to it
            return
        if self._queue_is_full():
            self.metrics.request_rejected("queue_full")
            stream.put(QueueFullError(
                f"the server is busy: {self.engine.num_waiting} sequences are already waiting "
                f"(limit {self.max_queue}); retry later"))
            return
        if stream.request_id in self._streams:
            stream.put(ValueError(f"request id {stream.request_id!r} is already running"))
            return
        try:
            extra = {} if observer is None else {"observer": observer}  # the inspector's requests only
            self.engine.add_request(ids, params, stream.request_id, **extra)
        except Exception as e:  # invalid for the engine: only this request hears about it
            self.metrics.request_rejected("invalid")
            stream.put(e)
            return
        self.processor.add_request(stream.request_id, None, ids, params)
        self._streams[stream.request_id] = stream
        stream.put(ACCEPTED)

    def _step(self) -> None:
        try:
            processed = self.processor.process(self.engine.step())
            self.engine.stop_sequences(processed.stop_in_core)
        except Exception as e:
            self._recover(e)
            return
        self.metrics.update(self.engine.snapshot(drain_latencies=True))
        items = []  # the step's outputs, handed to the event loop at once
        for so in processed.steps:
            stream = self._streams.get(so.request_id)
            if stream is not None:  # None: aborted meanwhile
                items.append((stream, so))
        for out in processed.finished:
            stream = self._streams.pop(out.request_id, None)
            if stream is not None:
                self.metrics.request_finished(out.outputs[0].finish_reason if out.outputs else None)
                items += [(stream, out), (stream, DONE)]
        RequestStream.put_many(items)

    def _recover(self, error: Exception) -> None:
        """A step raised. If nothing runs and the oldest waiting request can never be scheduled, only it
        fails; otherwise the step's batch is unknown, so every live request fails with the error and the
        loop carries on with a clean engine."""
        self.metrics.engine_error()
        if isinstance(error, WorkerLostError):  # the model cannot run any more: fail everything, take nothing new
            logger.error("engine stopped: %s", error)
            self.dead, self._stopping, self._closed = error, True, True
            if self.on_fatal is not None:
                self.on_fatal(error)
            return
        stuck = self.engine.unschedulable_request()
        if stuck is not None:
            culprits = [stuck]
        else:
            culprits = list(self._streams)
            logger.exception("engine step failed; failing %d request(s)", len(culprits), exc_info=error)
        err = error if isinstance(error, (ValueError, RuntimeError)) else EngineStepError(repr(error))
        for rid in culprits:
            self._fail(rid, err, abort=True)
        for rid in self.engine.request_ids():  # orphans (no stream): never leave them stuck
            if rid not in self._streams:
                self.engine.abort(rid)
                self.processor.abort(rid)

    def _fail(self, rid: str, error: BaseException, abort: bool) -> None:
        stream = self._streams.pop(rid, None)
        if abort:
            try:
                self.engine.abort(rid)
                self.processor.abort(rid)
            except Exception:  # pragma: no cover - a broken engine must not stop the failing
                logger.exception("abort of %s failed", rid)
        if stream is not None:
            self.metrics.request_finished("error")
            stream.put(error)
