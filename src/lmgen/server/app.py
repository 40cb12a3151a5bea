"""OpenAI-compatible HTTP server: FastAPI routes over an AsyncEngine.

Routes: POST /v1/completions, POST /v1/chat/completions (both with SSE streaming), GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text).

Every error is answered in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for
a malformed body, wrong types, invalid sampling values or a context overflow, 401 for a missing or
wrong API key, 404 for an unknown model or route, 413 for a body over `max_request_bytes` (before it is
parsed), 503 when the waiting queue is full or the server is shutting down. A request is only accepted
(and a stream only opened with 200) once the engine took it, so admission errors are never hidden inside
an already-started stream.

This module holds the routes and `lmgen serve`; the pieces they use live in errors.py (error shaping),
service.py (`ServerContext`: checks, admission, logprobs, prompts), outputs.py (accumulated outputs) and
streaming.py (SSE) and body_limit.py (the 413). Chat templates render and prompts tokenize in worker
threads (service.py), never on the event loop, so /health answers while a slow one runs.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from lmgen.errors import WorkerLostError
from lmgen.chat.tool_calls import parse_tool_calls
from lmgen.chat.tools import Tools
from lmgen.inspect.api import register_inspector
from lmgen.server.protocol import requests as Q
from lmgen.server.protocol import responses as R
from lmgen.server.protocol.api_error import APIError
from lmgen.server.protocol.sampling import check_token_ids, resolve_max_tokens, sampling_params
from lmgen.server.async_engine import AsyncEngine
from lmgen.server.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from lmgen.server.errors import parse_body, install_error_handlers
from lmgen.server.metrics import CONTENT_TYPE, ServerMetrics
from lmgen.server.outputs import visible_logprobs
from lmgen.server.service import completion_prompts, ServerContext
from lmgen.server.streaming import chat_stream, ClientGone, completion_stream, SSEResponse, unless_disconnected

logger = logging.getLogger("lmgen.server")

DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds in-flight requests get to finish on SIGTERM
GIL_SWITCH_INTERVAL_S = 0.0005  # the longest a thread waits for the GIL held by another (see `serve`)


def create_app(llm, served_model_name: str | list[str] | None = None, api_key: str | None = None, max_queue: int = 256,
               max_num_seqs: int | None = None, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
               trust_request_chat_template: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_n: int = 128,
               allowed_origins: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving `llm` (an lmgen.LLM). The engine thread starts with the app's lifespan
    (or at the first request) and stops on shutdown, after in-flight requests had `shutdown_timeout`
    seconds to finish. A request's `chat_template` (Jinja text only) is refused with 400 unless
    `trust_request_chat_template`; a body over `max_request_bytes` gets 413. `allowed_origins`: the browser origins
    CORS admits (none by default: a web page elsewhere cannot call the server)."""
    BodyLimit(None, max_request_bytes)  # a bad limit fails here, not at the first request
    names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name or [llm.model_name])
    metrics = ServerMetrics()
    engine = AsyncEngine(llm, max_queue=max_queue, max_num_seqs=max_num_seqs, metrics=metrics, max_n=max_n)
    srv = ServerContext(llm, engine, names, api_key, trust_request_chat_template)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(shutdown_timeout)
        srv.pool.shutdown(wait=False, cancel_futures=True)
        logger.info("engine stopped")

    app = FastAPI(title="lmgen", version="0.1.0", lifespan=lifespan)
    app.state.lmgen = srv
    app.state.engine = engine
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])

    # ---- plain routes ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.is_running and engine._thread is not None:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(engine.num_pending), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        srv.auth(request)
        cards = [R.ModelCard(id=n, created=srv.created, root=llm.model_name, max_model_len=srv.context_length) for n in names]
        return R.ModelList(data=cards).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.auth(request)
        srv.check_model(model_id)
        return R.ModelCard(id=model_id, created=srv.created, root=llm.model_name, max_model_len=srv.context_length).model_dump()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        srv.auth(request)
        req = await parse_body(request, Q.TokenizeRequest)
        srv.check_model(req.model, required=False)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if req.prompt is not None:
            ids = await srv.offload(srv.tok.encode, req.prompt, True if req.add_special_tokens is None else req.add_special_tokens)
        else:
            ids = await srv.render_messages(req.messages, req.add_generation_prompt, fit_context=False)
        return R.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=srv.context_length).model_dump()

    @app.post("/detokenize")
    async def detokenize(request: Request):
        srv.auth(request)
        req = await parse_body(request, Q.DetokenizeRequest)
        srv.check_model(req.model, required=False)
        check_token_ids(req.tokens, srv.vocab_size, "tokens")
        return R.DetokenizeResponse(prompt=await srv.offload(srv.tok.decode, req.tokens)).model_dump()

    # ---- completions ----------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.auth(request)
        req: Q.CompletionRequest = await parse_body(request, Q.CompletionRequest)
        srv.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of is not supported (other than best_of == n), got {req.best_of}", param="best_of")
        prompts = await completion_prompts(srv, req)
        structured = await srv.offload(srv.constraint, req)
        k = req.logprobs
        jobs = []
        for _, ids in prompts:
            max_tokens = resolve_max_tokens(req.max_tokens, len(ids), srv.context_length)
            jobs.append((ids, sampling_params(req, max_tokens, k, srv.vocab_size,
                                                prompt_logprobs=k if (req.echo and k is not None) else None,
                                                structured=structured)))
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.admit(jobs, rid)
        if req.stream:
            return SSEResponse(completion_stream(srv, req, rid, created, prompts, streams),
                                lambda: [s.abort() for s in streams])
        try:
            results = await unless_disconnected(request, srv.collect(streams))
        except ClientGone:
            return Response(status_code=499)
        choices, completion_tokens = [], 0
        for pi, ((text, ids), result) in enumerate(zip(prompts, results)):
            for j, seq in enumerate(result.outputs):
                completion_tokens += len(seq.token_ids)
                body = seq.text
                logprobs = None
                if k is not None:
                    pairs = visible_logprobs(seq.token_ids, seq.logprobs, seq.finish_reason, seq.stop_reason)
                    if req.echo:
                        plp = result.prompt_logprobs or ([None] * len(ids))
                        logprobs, off = srv.completion_logprobs(list(zip(ids, plp)), k, 0)
                        more, _ = srv.completion_logprobs(pairs, k, off)
                        for f in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                            getattr(logprobs, f).extend(getattr(more, f))
                    else:
                        logprobs, _ = srv.completion_logprobs(pairs, k, 0)
                if req.echo:
                    body = text + body
                choices.append(R.CompletionChoice(index=pi * req.n + j, text=body, logprobs=logprobs,
                                                  finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        usage = srv.usage([len(ids) for _, ids in prompts], [r.num_cached_tokens for r in results], completion_tokens,
                          srv.spec_counts(results))
        return R.CompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=choices, usage=usage).model_dump(mode="json")

    # ---- chat completions -----------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv.auth(request)
        req: Q.ChatCompletionRequest = await parse_body(request, Q.ChatCompletionRequest)
        srv.check_model(req.model)
        for legacy in ("functions", "function_call"):
            if getattr(req, legacy) is not None:
                raise APIError(400, f"{legacy} (OpenAI's deprecated function calling) is not supported; use tools and "
                                    "tool_choice", param=legacy)
        tools = Tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        extra = dict(req.chat_template_kwargs or {})
        structured = await srv.offload(srv.constraint, req, tools)
        ids = await srv.render_messages(req.messages, req.add_generation_prompt, req.chat_template, extra, tools=tools)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = resolve_max_tokens(requested, len(ids), srv.context_length, param, what="messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        sp = sampling_params(req, max_tokens, k, srv.vocab_size, structured=structured)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await srv.admit([(ids, sp)], rid)
        if req.stream:
            return SSEResponse(chat_stream(srv, req, rid, created, len(ids), streams[0], tools.active), streams[0].abort)
        try:
            result = (await unless_disconnected(request, srv.collect(streams)))[0]
        except ClientGone:
            return Response(status_code=499)
        choices = []
        for j, seq in enumerate(result.outputs):
            logprobs = None
            if k is not None:
                pairs = visible_logprobs(seq.token_ids, seq.logprobs, seq.finish_reason, seq.stop_reason)
                logprobs = srv.chat_logprobs(pairs, k)
            content, calls = parse_tool_calls(seq.text) if tools.active else (seq.text, [])
            finish = "tool_calls" if calls and seq.finish_reason == "stop" else seq.finish_reason
            choices.append(R.ChatChoice(index=j, message=R.AssistantMessage(
                content=content, tool_calls=[c.to_openai() for c in calls] or None), logprobs=logprobs,
                finish_reason=finish, stop_reason=seq.stop_reason))
        usage = srv.usage([len(ids)], [result.num_cached_tokens], sum(len(s.token_ids) for s in result.outputs),
                          srv.spec_counts([result]))
        return R.ChatCompletionResponse(id=rid, created=created, model=req.model, system_fingerprint=srv.fingerprint, choices=choices, usage=usage).model_dump(mode="json")

    register_inspector(app, srv, engine)  # GET /inspect (the page) and /v1/inspect/* (its JSON API)
    return app


# ---- the `lmgen serve` entry point -------------------------------------------------------------------
def serve(args, llm) -> int:
    """Serves `llm` (loaded by the CLI, like `lmgen generate`) with uvicorn on args.host:args.port
    (loopback by default). SIGTERM / Ctrl-C: uvicorn stops accepting connections and lets open
    requests finish (bounded by the shutdown timeout), then the engine thread stops."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = getattr(args, "served_model_name", None) or llm.model_name
    api_key = getattr(args, "api_key", None) or os.environ.get("LMGEN_API_KEY") or None
    timeout = float(getattr(args, "shutdown_timeout", None) or os.environ.get("LMGEN_SHUTDOWN_TIMEOUT") or DEFAULT_SHUTDOWN_TIMEOUT)
    app = create_app(llm, name, api_key=api_key, max_queue=getattr(args, "max_queue", 256),
                     max_num_seqs=getattr(args, "max_num_seqs", None), shutdown_timeout=timeout,
                     max_n=getattr(args, "max_n", 128), allowed_origins=getattr(args, "allowed_origins", None),
                     trust_request_chat_template=bool(getattr(args, "trust_request_chat_template", False)),
                     max_request_bytes=DEFAULT_MAX_REQUEST_BYTES if getattr(args, "max_request_bytes", None) is None
                     else args.max_request_bytes)
    # Chat template renders and big tokenizations run in worker threads, in Python, holding the GIL; each time the
    # event loop comes back from a socket call it waits for the GIL up to the interpreter's switch interval (5 ms
    # by default), and one HTTP exchange makes dozens of such calls (/health measured 0.26 s during a hostile
    # 5 s render on a quiet host, 1.1 s on a loaded one). The server process shortens the interval for all its threads.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    host = getattr(args, "host", None) or "127.0.0.1"
    # http / loop "auto": httptools and uvloop (dependencies, as in uvicorn[standard]) where installed, else h11 / asyncio
    config = uvicorn.Config(app, host=host, port=args.port, log_level="info", timeout_graceful_shutdown=int(timeout) + 1,
                            lifespan="on", access_log=bool(getattr(args, "access_log", False)))
    server = uvicorn.Server(config)
    engine = app.state.engine
    engine.on_fatal = lambda error: setattr(server, "should_exit", True)  # a lost worker: stop serving, exit 1
    logger.info("serving %s as %r on http://%s:%d (API key %s)", llm.model_name, name, host, args.port,
                "required" if api_key else "not required")
    server.run()
    if isinstance(engine.dead, WorkerLostError):
        raise engine.dead
    return 0
