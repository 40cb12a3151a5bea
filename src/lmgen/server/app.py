"""OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text).

Every error is answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
a malformed body, wrong types, invalid sampling values or a context overflow, 401 for a missing or
wrong API key, 404 for an unknown model or route, 503 when the waiting queue is full or the server is
shutting down. A request is only accepted (and a stream only opened with 200) once the engine took it,
so admission errors are never hidden inside an already-started stream.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmgen.engine.engine import ContextOverflowError
from lmgen.engine.request import StepOutput
from lmgen.sampling.params import SamplingParams
from lmgen.server import protocol as P
from lmgen.server.async_engine import AsyncEngine, EngineClosedError, QueueFullError, RequestStream
from lmgen.server.metrics import CONTENT_TYPE, ServerMetrics

logger = logging.getLogger("lmgen.server")

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get to finish on SIGTERM


# ---- errors ------------------------------------------------------------------------------------------
def _api_error(e: BaseException) -> P.APIError:
    if isinstance(e, P.APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return P.APIError(400, str(e), param="messages" if "in the messages" in str(e) or "your messages" in str(e) else "prompt", code="context_length_exceeded")
    if isinstance(e, QueueFullError):
        return P.APIError(503, str(e), type="server_overloaded", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, EngineClosedError):
        return P.APIError(503, str(e), type="server_unavailable", code="shutting_down")
    if isinstance(e, (ValueError, TypeError)):
        return P.APIError(400, str(e), param=P.param_of(e) if isinstance(e, ValueError) else None)
    logger.error("internal error: %r", e, exc_info=e)
    return P.APIError(500, f"internal server error: {type(e).__name__}: {e}", type="internal_server_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _api_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON body: {first['msg']}", None
    if not first["loc"]:
        return f"the request body must be a JSON object: {first['msg']}", None
    param = str(first["loc"][0])
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(x) for x in err["loc"])
        got = err.get("input")
        parts.append(f"{loc}: {err['msg']}" + (f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, dict) else ""))
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param


async def _parse(request: Request, model: type[BaseModel]):
    body = await request.body()
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        message, param = _validation_message(e)
        raise P.APIError(400, message, param=param) from None


# ---- token text for logprobs -------------------------------------------------------------------------
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _TokenText:
    """Per-token strings and raw bytes (for logprobs), cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        from lmgen.tokenizer.gguf_vocab import BYTE_DECODER

        self._byte_decoder = BYTE_DECODER
        self.text = functools.lru_cache(maxsize=1 << 16)(self._text)
        self.bytes = functools.lru_cache(maxsize=1 << 16)(self._bytes)

    def _text(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    def _bytes(self, tid: int) -> list[int]:
        text = self._text(tid)
        if "\ufffd" not in text:
            return list(text.encode("utf-8"))
        piece = self.tokenizer.convert_ids_to_tokens([tid])[0]
        m = _BYTE_TOKEN.fullmatch(piece)
        if m:
            return [int(m.group(1), 16)]
        if piece and all(c in self._byte_decoder for c in piece):  # GPT-2 byte alphabet
            return [self._byte_decoder[c] for c in piece]
        return list(text.encode("utf-8"))


# ---- one sequence's accumulated output ---------------------------------------------------------------
class _Seq:
    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.stop_reason = None
        self.num_output_tokens = 0
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.prompt_logprobs = None

    def add(self, so: StepOutput) -> None:
        snap = so.request
        self.text.append(so.delta_text)
        self.token_ids.extend(so.new_token_ids)
        if snap.logprobs:
            self.logprobs.extend(snap.logprobs)
        if snap.prompt_logprobs is not None:
            self.prompt_logprobs = snap.prompt_logprobs
        self.num_output_tokens = snap.num_output_tokens
        self.num_prompt_tokens = snap.num_prompt_tokens
        self.num_cached_tokens = snap.num_cached_tokens
        if so.finished:
            self.finish_reason, self.stop_reason = so.finish_reason, snap.stop_reason


def _visible(token_ids: list[int], entries: list[dict[int, float]], finished_by_token: bool) -> list[tuple[int, dict[int, float]]]:
    """Logprob entries of the tokens that belong to the text: an EOS / stop token that ended the
    sequence is not part of it (OpenAI does not report it)."""
    pairs = list(zip(token_ids, entries))
    if finished_by_token and pairs:
        pairs = pairs[:-1]
    return pairs


def _ended_by_token(so_finish: str | None, stop_reason) -> bool:
    return so_finish == "stop" and not isinstance(stop_reason, str)


# ---- the app -----------------------------------------------------------------------------------------
def _step_logprob_pairs(so: StepOutput, k: int | None) -> list[tuple[int, dict[int, float]]]:
    """This step's (token, logprobs) pairs a streaming client sees; empty when logprobs were not asked for."""
    if k is None or not so.request.logprobs:
        return []
    ended = so.finished and _ended_by_token(so.finish_reason, so.request.stop_reason)
    return _visible(so.new_token_ids, so.request.logprobs, ended)


class _SSEResponse(StreamingResponse):
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


def _sse(obj: BaseModel | dict) -> str:
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


_DONE = "data: [DONE]\n\n"


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, awaitable):
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
    raise _ClientGone()


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


class _Server:
    def __init__(self, llm, engine: AsyncEngine, model_names: list[str], api_key: str | None):
        self.llm, self.engine = llm, engine
        self.model_names = model_names
        self.api_key = api_key
        self.tok = llm.tokenizer
        self.vocab_size = llm.config.vocab_size
        self.context_length = llm.context_length
        self.token_text = _TokenText(llm.tokenizer)
        self.created = int(time.time())

    # ---- checks ---------------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise P.APIError(401, "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'.",
                             type="invalid_request_error", code="invalid_api_key")

    def check_model(self, name: str | None, required: bool = True) -> None:
        if name is None and not required:
            return
        if name not in self.model_names:
            raise P.APIError(404, f"The model `{name}` does not exist. Available: {', '.join(self.model_names)}.",
                             param="model", code="model_not_found")

    # ---- admission ------------------------------------------------------------------------------
    async def admit(self, jobs: list[tuple[list[int], SamplingParams]], rid: str) -> list[RequestStream]:
        """Adds every job or none."""
        streams: list[RequestStream] = []
        try:
            for i, (ids, sp) in enumerate(jobs):
                streams.append(await self.engine.add_request(ids, sp, rid if len(jobs) == 1 else f"{rid}-{i}"))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams

    @staticmethod
    async def collect(streams: list[RequestStream], n: int) -> list[list[_Seq]]:
        async def one(stream: RequestStream) -> list[_Seq]:
            seqs = [_Seq() for _ in range(n)]
            async for so in stream:
                seqs[so.index].add(so)
            return seqs

        try:
            return list(await asyncio.gather(*(one(s) for s in streams)))
        finally:
            for s in streams:
                s.abort()

    @staticmethod
    def usage(prompt_lens: list[int], cached: list[int], seqs: list[_Seq]) -> P.Usage:
        completion = sum(s.num_output_tokens for s in seqs)
        prompt = sum(prompt_lens)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                       prompt_tokens_details=P.PromptTokensDetails(cached_tokens=sum(cached)))

    # ---- logprobs -------------------------------------------------------------------------------
    def completion_logprobs(self, pairs: list[tuple[int, dict | None]], k: int, offset: int) -> tuple[P.CompletionLogprobs, int]:
        """OpenAI legacy logprobs for (token, entry) pairs; entries hold top-k plus the chosen token.
        `top_logprobs` lists the k best and the chosen one (as vLLM). Returns the next text offset."""
        lp = P.CompletionLogprobs()
        for tid, entry in pairs:
            text = self.token_text.text(tid)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:  # the first prompt token has no prediction
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(entry.get(tid))
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            if tid not in dict(ranked):
                ranked.append((tid, entry[tid]))
            top: dict[str, float] = {}
            for t, v in ranked:
                top.setdefault(self.token_text.text(t), v)
            lp.top_logprobs.append(top)
        return lp, offset

    def chat_logprobs(self, pairs: list[tuple[int, dict]], k: int) -> P.ChoiceLogprobs:
        content = []
        for tid, entry in pairs:
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(P.TokenLogprob(
                token=self.token_text.text(tid), logprob=entry[tid], bytes=self.token_text.bytes(tid),
                top_logprobs=[P.TopLogprob(token=self.token_text.text(t), logprob=v, bytes=self.token_text.bytes(t))
                              for t, v in ranked]))
        return P.ChoiceLogprobs(content=content)

    # ---- chat prompt ----------------------------------------------------------------------------
    def render_messages(self, messages: list[P.ChatMessage], add_generation_prompt: bool, chat_template: str | None = None,
                        extra: dict | None = None) -> list[int]:
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise P.APIError(400, f"messages[{i}].content: only text parts are supported, got type {part.type!r}",
                                         param="messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
            if m.name is not None:
                d["name"] = m.name
            for key, value in (m.model_extra or {}).items():
                if value is not None:
                    d[key] = value
            msgs.append(d)
        if not msgs:
            raise P.APIError(400, "messages must not be empty", param="messages")
        try:
            return self.llm.render_chat(msgs, chat_template, add_generation_prompt, **(extra or {}))
        except P.APIError:
            raise
        except Exception as e:  # the template raised (bad roles, raise_exception(), ...)
            raise P.APIError(400, f"could not apply the chat template: {e}", param="messages") from None


def create_app(llm, served_model_name: str | list[str] | None = None, api_key: str | None = None, max_queue: int = 256,
               max_num_seqs: int | None = None, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> FastAPI:
    """The FastAPI app serving `llm` (an lmgen.LLM). The engine thread starts with the app's lifespan
    (or at the first request) and stops on shutdown, after in-flight requests had `shutdown_timeout`
    seconds to finish."""
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [llm.model_name])
    metrics = ServerMetrics()
    engine = AsyncEngine(llm, max_queue=max_queue, max_num_seqs=max_num_seqs, metrics=metrics)
    srv = _Server(llm, engine, names, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(shutdown_timeout)
        logger.info("engine stopped")

    app = FastAPI(title="lmgen", version="0.1.0", lifespan=lifespan)
    app.state.lmgen = srv
    app.state.engine = engine

    # ---- error handlers -------------------------------------------------------------------------
    @app.exception_handler(P.APIError)
    async def _on_api_error(request: Request, e: P.APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(P.APIError(e.status_code, str(e.detail), type=kind, code=e.status_code).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, e: RequestValidationError):
        return JSONResponse(P.APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    async def _on_known(request: Request, e: Exception):
        return _error_response(e)

    for exc in (ValueError, TypeError, QueueFullError, EngineClosedError):
        app.add_exception_handler(exc, _on_known)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, e: Exception):
        return _error_response(e)

    # ---- plain routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.is_running and engine._thread is not None:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(llm.engine, engine.num_pending), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        srv.auth(request)
        cards = [P.ModelCard(id=n, created=srv.created, root=llm.model_name, max_model_len=srv.context_length) for n in names]
        return P.ModelList(data=cards).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        srv.auth(request)
        req = await _parse(request, P.TokenizeRequest)
        srv.check_model(req.model, required=False)
        if (req.prompt is None) == (req.messages is None):
            raise P.APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if req.prompt is not None:
            ids = srv.tok.encode(req.prompt, add_special_tokens=True if req.add_special_tokens is None else req.add_special_tokens)
        else:
            ids = srv.render_messages(req.messages, req.add_generation_prompt)
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=srv.context_length).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        srv.auth(request)
        req = await _parse(request, P.DetokenizeRequest)
        srv.check_model(req.model, required=False)
        P.check_token_ids(req.tokens, srv.vocab_size, "tokens")
        return P.DetokenizeResponse(prompt=srv.tok.decode(req.tokens)).model_dump()

    # ---- completions ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.auth(request)
        req: P.CompletionRequest = await _parse(request, P.CompletionRequest)
        srv.check_model(req.model)
        if req.suffix:
            raise P.APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise P.APIError(400, f"best_of is not supported (other than best_of == n), got {req.best_of}", param="best_of")
        prompts = _completion_prompts(srv, req)
        k = req.logprobs
        jobs = []
        for _, ids in prompts:
            max_tokens = P.resolve_max_tokens(req.max_tokens, len(ids), srv.context_length)
            jobs.append((ids, P.sampling_params(req, max_tokens, k, srv.vocab_size,
                                                prompt_logprobs=k if (req.echo and k is not None) else None)))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.admit(jobs, rid)
        if req.stream:
            return _SSEResponse(_completion_stream(srv, req, rid, created, prompts, streams),
                                lambda: [s.abort() for s in streams])
        try:
            results = await _unless_disconnected(request, srv.collect(streams, req.n))
        except _ClientGone:
            return Response(status_code=499)
        choices, all_seqs = [], []
        for pi, ((text, ids), seqs) in enumerate(zip(prompts, results)):
            for j, seq in enumerate(seqs):
                all_seqs.append(seq)
                body = "".join(seq.text)
                logprobs = None
                if k is not None:
                    pairs = _visible(seq.token_ids, seq.logprobs, _ended_by_token(seq.finish_reason, seq.stop_reason))
                    if req.echo:
                        plp = seq.prompt_logprobs or ([None] * len(ids))
                        logprobs, off = srv.completion_logprobs(list(zip(ids, plp)), k, 0)
                        more, _ = srv.completion_logprobs(pairs, k, off)
                        for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(logprobs, f).extend(getattr(more, f))
                    else:
                        logprobs, _ = srv.completion_logprobs(pairs, k, 0)
                if req.echo:
                    body = text + body
                choices.append(P.CompletionChoice(index=pi * req.n + j, text=body, logprobs=logprobs,
                                                  finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        usage = srv.usage([len(ids) for _, ids in prompts], [seqs[0].num_cached_tokens for seqs in results], all_seqs)
        return P.CompletionResponse(id=rid, created=created, model=req.model, choices=choices, usage=usage).model_dump(mode="json")

    # ---- chat completions -----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv.auth(request)
        req: P.ChatCompletionRequest = await _parse(request, P.ChatCompletionRequest)
        srv.check_model(req.model)
        if req.response_format is not None and req.response_format.type != "text":
            raise P.APIError(400, f"response_format {req.response_format.type!r} is not supported (only 'text')",
                             param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise P.APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        extra = dict(req.chat_template_kwargs or {})
        if req.tools:
            extra["tools"] = req.tools
        ids = srv.render_messages(req.messages, req.add_generation_prompt, req.chat_template, extra)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = P.resolve_max_tokens(requested, len(ids), srv.context_length, param, what="messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        sp = P.sampling_params(req, max_tokens, k, srv.vocab_size)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.admit([(ids, sp)], rid)
        if req.stream:
            return _SSEResponse(_chat_stream(srv, req, rid, created, len(ids), streams[0]), streams[0].abort)
        try:
            seqs = (await _unless_disconnected(request, srv.collect(streams, req.n)))[0]
        except _ClientGone:
            return Response(status_code=499)
        choices = []
        for j, seq in enumerate(seqs):
            logprobs = None
            if k is not None:
                pairs = _visible(seq.token_ids, seq.logprobs, _ended_by_token(seq.finish_reason, seq.stop_reason))
                logprobs = srv.chat_logprobs(pairs, k)
            choices.append(P.ChatChoice(index=j, message=P.AssistantMessage(content="".join(seq.text)), logprobs=logprobs,
                                        finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        usage = srv.usage([len(ids)], [seqs[0].num_cached_tokens], seqs)
        return P.ChatCompletionResponse(id=rid, created=created, model=req.model, choices=choices, usage=usage).model_dump(mode="json")

    return app


def _completion_prompts(srv: _Server, req: P.CompletionRequest) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids) for each prompt of a completions request."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise P.APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    out = []
    for p in items:
        if isinstance(p, str):
            ids = srv.tok.encode(p, add_special_tokens=req.add_special_tokens)
            text = p
        else:
            P.check_token_ids(p, srv.vocab_size, "prompt")
            ids, text = list(p), srv.tok.decode(p)
        if not ids:
            raise P.APIError(400, "the prompt is empty: give at least one token", param="prompt")
        out.append((text, ids))
    return out


async def _completion_stream(srv: _Server, req: P.CompletionRequest, rid: str, created: int,
                             prompts: list[tuple[str, list[int]]], streams: list[RequestStream]) -> AsyncIterator[str]:
    n, k = req.n, req.logprobs
    offsets: dict[int, int] = {}
    seqs: dict[int, _Seq] = {}

    def chunk(index: int, text: str, logprobs=None, finish=None, stop_reason=None) -> str:
        return _sse(P.CompletionChunk(id=rid, created=created, model=req.model, choices=[P.CompletionChoice(
            index=index, text=text, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)]))

    try:
        if req.echo:
            for pi, (text, ids) in enumerate(prompts):
                for j in range(n):
                    offsets[pi * n + j] = len(text)
                    yield chunk(pi * n + j, text)
        async for pi, so in _merge(streams):
            index = pi * n + so.index
            seq = seqs.setdefault(index, _Seq())
            seq.add(so)
            logprobs = None
            pairs = _step_logprob_pairs(so, k)
            if pairs:
                logprobs, offsets[index] = srv.completion_logprobs(pairs, k, offsets.get(index, 0))
            if not (so.delta_text or logprobs or so.finished):
                continue
            yield chunk(index, so.delta_text, logprobs, so.finish_reason if so.finished else None,
                        so.request.stop_reason if so.finished else None)
        if req.stream_options and req.stream_options.include_usage:
            cached = [next((s.num_cached_tokens for i, s in seqs.items() if i // n == pi), 0) for pi in range(len(prompts))]
            usage = srv.usage([len(ids) for _, ids in prompts], cached, list(seqs.values()))
            yield _sse(P.CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield _DONE
    except Exception as e:  # the engine failed this request after the stream had started
        yield _sse(_api_error(e).body())
        yield _DONE
    finally:
        for s in streams:
            s.abort()


async def _chat_stream(srv: _Server, req: P.ChatCompletionRequest, rid: str, created: int, prompt_len: int,
                       stream: RequestStream) -> AsyncIterator[str]:
    k = (req.top_logprobs or 0) if req.logprobs else None
    seqs: dict[int, _Seq] = {}

    def chunk(index: int, delta: P.DeltaMessage, logprobs=None, finish=None, stop_reason=None) -> str:
        return _sse(P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[P.ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)]))

    try:
        for j in range(req.n):
            yield chunk(j, P.DeltaMessage(role="assistant", content=""))
        async for so in stream:
            seq = seqs.setdefault(so.index, _Seq())
            seq.add(so)
            logprobs = None
            pairs = _step_logprob_pairs(so, k)
            if pairs:
                logprobs = srv.chat_logprobs(pairs, k)
            if not (so.delta_text or logprobs or so.finished):
                continue
            yield chunk(so.index, P.DeltaMessage(content=so.delta_text or None), logprobs,
                        so.finish_reason if so.finished else None, so.request.stop_reason if so.finished else None)
        if req.stream_options and req.stream_options.include_usage:
            cached = next(iter(seqs.values())).num_cached_tokens if seqs else 0
            usage = srv.usage([prompt_len], [cached], list(seqs.values()))
            yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield _DONE
    except Exception as e:
        yield _sse(_api_error(e).body())
        yield _DONE
    finally:
        stream.abort()


# ---- the `lmgen serve` entry point -------------------------------------------------------------------
def serve(args) -> int:
    """Loads the model (like `lmgen generate`), then serves it with uvicorn on args.host:args.port
    (loopback by default). SIGTERM / Ctrl-C: uvicorn stops accepting connections and lets open
    requests finish (bounded by the shutdown timeout), then the engine thread stops."""
    import uvicorn

    from lmgen.cli import load_llm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    llm = load_llm(args)
    name = getattr(args, "served_model_name", None) or llm.model_name
    api_key = getattr(args, "api_key", None) or os.environ.get("LMGEN_API_KEY") or None
    timeout = float(getattr(args, "shutdown_timeout", None) or os.environ.get("LMGEN_SHUTDOWN_TIMEOUT") or DEFAULT_SHUTDOWN_TIMEOUT)
    app = create_app(llm, name, api_key=api_key, max_queue=getattr(args, "max_queue", 256),
                     max_num_seqs=getattr(args, "max_num_seqs", None), shutdown_timeout=timeout)
    host = getattr(args, "host", None) or "127.0.0.1"
    config = uvicorn.Config(app, host=host, port=args.port, log_level="info", timeout_graceful_shutdown=int(timeout) + 1,
                            lifespan="on")
    server = uvicorn.Server(config)
    logger.info("serving %s as %r on http://%s:%d (API key %s)", llm.model_name, name, host, args.port,
                "required" if api_key else "not required")
    server.run()
    return 0
