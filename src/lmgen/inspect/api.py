"""The inspector's routes: the page (GET /inspect, its static files shipped in the package) and its JSON API under
/v1/inspect (documented in the README), which the page and notebooks both use.

Where the model runs: an inspected step is an ordinary request to the server's own engine (one token, greedy) that
hands its raw logits row to an observer on the engine thread (Engine.add_request(observer=...)); attention weights
are recomputed by a function the engine thread runs between two steps (AsyncEngine.call).  So the inspector never
runs the model at the same time as the engine, shares its KV cache and prefix cache, and costs serving nothing
while nobody inspects (the engine checks an empty dict of observers).  Each step re-submits the sequence: its full
16-token blocks come from the prefix cache, only the rest is computed (the KV panel shows both figures).
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from importlib import resources
from typing import Any, Literal, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from lmgen.errors import InvalidRequestError
from lmgen.inspect.attention import attention_weights
from lmgen.inspect.beams import beam_tree
from lmgen.inspect.session import ForwardResult, InspectSession, make_params
from lmgen.inspect.store import SessionStore
from lmgen.inspect.views import TokenView, session_json, step_json
from lmgen.sampling.params import SamplingParams
from lmgen.server.errors import parse_body
from lmgen.server.protocol.api_error import APIError
from lmgen.server.protocol.requests import Role

# the files the page needs, by name -> media type; nothing else under /inspect/static is served
STATIC = {"inspector.js": "text/javascript", "inspector.css": "text/css"}
FORWARD_PARAMS = SamplingParams(max_tokens=1, temperature=0.0)
ATTENTION_CHECK = 0.1  # largest difference of next-token probabilities between the recompute and the engine  # the token it draws is not used; the logits are


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Message(_Body):
    role: Role
    content: str


class CreateBody(_Body):
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True
    params: dict[str, Union[int, float, None]] = {}
    top_n: int = 20


class StepBody(_Body):
    count: int = 1
    force: Optional[int] = None
    at: Optional[int] = None


class BeamBody(_Body):
    beam_width: int = 2
    max_tokens: int = 8
    length_penalty: float = 1.0
    early_stopping: Union[bool, Literal["never"]] = False


class _Controls(_Body):
    temperature: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None


class AttentionBody(_Body):
    layer: int
    head: int
    step: Optional[int] = None  # the newest token of this step's context (default: the last step)


def static_text(name: str) -> str:
    return resources.files("lmgen.inspect").joinpath("static", name).read_text(encoding="utf-8")


def register_inspector(app: FastAPI, srv, engine) -> None:
    """Adds the inspector's routes to the server's app (`srv`: its ServerContext, `engine`: its AsyncEngine)."""
    llm = srv.llm
    store = SessionStore()
    tv = TokenView(llm.tokenizer)
    eos = set(llm.engine.eos_token_ids)
    block_manager = llm.engine.block_manager

    async def forward(ids: list[int]) -> ForwardResult:
        seen: dict[str, Any] = {}

        def observe(row):  # on the engine thread, inside the step: the sequence still holds its blocks
            seen.update(logits=row, t=time.perf_counter(), kv={
                "kv_blocks_used": block_manager.num_used_blocks, "kv_blocks_total": block_manager.num_blocks,
                "block_size": block_manager.block_size, "prefix_hits": block_manager.prefix_hits,
                "prefix_queries": block_manager.prefix_queries})

        t0 = time.perf_counter()
        stream = await engine.add_request(ids, FORWARD_PARAMS, f"inspect-{uuid.uuid4().hex}", observer=observe)
        result = (await srv.collect([stream]))[0]
        if "logits" not in seen:
            raise RuntimeError("the engine finished the inspected request without sampling it")
        return ForwardResult(seen["logits"], (seen["t"] - t0) * 1000.0, len(ids), result.num_cached_tokens, seen["kv"])

    def session(request: Request, sid: str) -> InspectSession:
        srv.auth(request)
        s = store.get(sid)
        if s is None:
            raise APIError(404, f"no inspector session {sid!r} (sessions are dropped after {store.max_sessions} newer "
                                f"ones, or when the server restarts)", param="session", code="session_not_found")
        return s

    def view(s: InspectSession) -> dict:
        return session_json(s, tv, srv.context_length)

    async def prompt_of(body: CreateBody) -> tuple[str, list[int], str]:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if body.prompt is not None:
            srv.check_prompt_chars(body.prompt, "prompt", "prompt")
            ids = await srv.offload(srv.tok.encode, body.prompt, body.add_special_tokens)
            return await srv.offload(srv.tok.decode, ids), ids, "completion"
        msgs = [m.model_dump() for m in body.messages]
        if not msgs:
            raise APIError(400, "messages must not be empty", param="messages")
        text = await srv.offload(lambda: srv.tok.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=llm.chat_template))
        srv.check_prompt_chars(text, "messages", "messages")
        return text, await srv.offload(srv.tok.encode, text, False), "chat"

    @app.get("/inspect")
    async def page():
        return Response(static_text("inspector.html"), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:"})

    @app.get("/inspect/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise APIError(404, f"no inspector file {name!r}", param="name", type="not_found")
        return Response(static_text(name), media_type=STATIC[name] + "; charset=utf-8")

    @app.get("/v1/inspect/info")
    async def info(request: Request):
        srv.auth(request)
        cfg = llm.config
        return {"model": srv.model_names[0], "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                "num_kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size, "context_length": srv.context_length,
                "eos_token_ids": sorted(eos), "max_sessions": store.max_sessions}

    @app.post("/v1/inspect/sessions")
    async def create(request: Request):
        srv.auth(request)
        body: CreateBody = await parse_body(request, CreateBody)
        params = make_params(dict(body.params))
        text, ids, mode = await prompt_of(body)
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        s = InspectSession(store.new_id(), ids, text, mode, params, eos, forward, body.top_n)
        await s.start()
        store.add(s)
        return view(s)

    @app.get("/v1/inspect/sessions/{sid}")
    async def get(sid: str, request: Request):
        return view(session(request, sid))

    @app.delete("/v1/inspect/sessions/{sid}")
    async def delete(sid: str, request: Request):
        session(request, sid)
        store.remove(sid)
        return {"id": sid, "deleted": True}

    @app.post("/v1/inspect/sessions/{sid}/step")
    async def step(sid: str, request: Request):
        s = session(request, sid)
        body: StepBody = await parse_body(request, StepBody)
        await s.step(body.count, body.force, body.at)
        return view(s)

    @app.post("/v1/inspect/sessions/{sid}/filter")
    async def refilter(sid: str, request: Request):
        s = session(request, sid)
        body = await parse_body(request, _Controls)
        await s.refilter(body.model_dump(exclude_unset=True))
        last = s.steps[-1]
        return {"id": s.id, "params": view(s)["params"], "step": step_json(last, tv)}

    @app.get("/v1/inspect/sessions/{sid}/logits")
    async def logits(sid: str, request: Request, step: int = -1):
        s = session(request, sid)
        if not -len(s.steps) <= step < len(s.steps):
            raise APIError(400, f"step must be in [0, {len(s.steps)}), got {step}", param="step")
        row = s.steps[step].fwd.logits.to("cpu", copy=True).contiguous()
        return {"step": s.steps[step].index, "dtype": "float32", "shape": list(row.shape),
                "data_base64": base64.b64encode(row.numpy().tobytes()).decode("ascii")}

    @app.post("/v1/inspect/sessions/{sid}/beams")
    async def beams(sid: str, request: Request):
        s = session(request, sid)
        body: BeamBody = await parse_body(request, BeamBody)

        async def forward_many(seqs: list[list[int]]):
            return [r.logits for r in await asyncio.gather(*(forward(ids) for ids in seqs))]

        tree = await beam_tree(s.prompt_ids, forward_many, beam_width=body.beam_width, max_tokens=body.max_tokens,
                               eos_token_ids=eos, length_penalty=body.length_penalty,
                               early_stopping=body.early_stopping, context_length=srv.context_length)
        for node in tree["nodes"]:
            node["text"] = None if node["token"] is None else tv.text(node["token"])
        for r in tree["results"]:
            r["text"] = srv.tok.decode(r["token_ids"], skip_special_tokens=False)
        return tree

    @app.post("/v1/inspect/sessions/{sid}/attention")
    async def attention(sid: str, request: Request):
        s = session(request, sid)
        body: AttentionBody = await parse_body(request, AttentionBody)
        index = len(s.steps) - 1 if body.step is None else body.step
        if not 0 <= index < len(s.steps):
            raise InvalidRequestError(f"step must be in [0, {len(s.steps)}), got {index}", param="step", value=index)
        fwd = s.steps[index].fwd
        ids = (s.prompt_ids + s.output_ids)[:fwd.context_tokens]
        weights, logits = await engine.call(lambda: attention_weights(llm.model, ids, body.layer, body.head))
        # the recompute must give the engine's next-token distribution (packed weights: the engine rounds activations
        # to 8-bit blocks, the recompute does not, so they differ by ~1e-2); far off means blocks shaped otherwise
        diff = float((torch.softmax(logits.float(), -1) - torch.softmax(fwd.logits.float(), -1)).abs().max())
        if diff > ATTENTION_CHECK:
            raise APIError(501, f"the attention view cannot recompute this model faithfully (its next-token "
                                f"probabilities differ from the engine's by {diff:.3f})", type="not_implemented")
        return {"step": index, "layer": body.layer, "head": body.head, "tokens": [tv.token(t) for t in ids],
                "weights": weights, "check": {"max_abs_prob_diff": diff}}
