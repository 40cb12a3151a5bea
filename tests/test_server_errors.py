"""Server error handling: every bad request gets OpenAI's error shape with the right status, and the
server keeps serving afterwards. One `lmgen serve` subprocess (max 1 running sequence, queue of 1, API
key) for the HTTP cases; AsyncEngine's own failure paths are tested on a fake engine (no model).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import deque
from types import SimpleNamespace

import httpx
import pytest

from lmgen.engine.stats import EngineSnapshot, EngineStats
from lmgen.engine.outputs import EngineCoreOutput
from lmgen.sampling.params import SamplingParams
from lmgen.errors import EngineClosedError, QueueFullError
from lmgen.server.async_engine import AsyncEngine
from lmgen.server.metrics import parse_metrics

from server_process import MODEL, ServerProcess  # noqa: E402

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """`lmgen serve` with --max-num-seqs 1 --max-queue 1 on a free loopback port (bounded startup wait)."""
    srv = ServerProcess(tmp_path_factory.mktemp("server"), "--max-num-seqs", "1", "--max-queue", "1", api_key=KEY)
    yield srv.base
    srv.stop()


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as h:
        yield h


def assert_still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    assert r.status_code == 200, r.text


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: tuple[str, ...] = ()) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for fragment in contains:
        assert fragment in err["message"], err
    return err


# ---- 400: the body -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", ['{"model": "smol", "prompt": ', "not json at all", "", "[1, 2, 3]", '"just a string"'])
def test_malformed_json(http, raw):
    r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_still_serving(http)


COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "10"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": 1.5}, "n"),
    ("/v1/completions", {**COMPLETION, "stream": "yes"}, "stream"),
    ("/v1/completions", {**COMPLETION, "prompt": 12}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "Hi"}, "model"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"15": "big"}}, "logit_bias"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "no role"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}, "logprobs"),
])
def test_wrong_types(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)
    assert_still_serving(http)


@pytest.mark.parametrize("path, body, param, fragment", [
    ("/v1/completions", {**COMPLETION, "temperature": -0.5}, "temperature", "temperature must be non-negative"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature", "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n", "n must be at least 1"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs", "logprobs"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens", "max_tokens"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"99999999": 1}}, "logit_bias", "logit_bias"),
    ("/v1/completions", {**COMPLETION, "stop_token_ids": [10**9]}, "stop_token_ids", "vocabulary"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, 2, 10**9]}, "prompt", "vocabulary"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", "empty"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "empty"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages", "text"),
])
def test_invalid_sampling_values(http, path, body, param, fragment):
    assert_error(http.post(path, json=body), 400, param, (fragment,))
    assert_still_serving(http)


def test_over_long_prompt_names_both_numbers(http):
    prompt = "hello " * 9000
    n_prompt = http.post("/tokenize", json={"prompt": prompt}).json()["count"]
    assert n_prompt > 8192
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}), 400, "prompt",
                       (str(n_prompt), "8192"))
    assert err["code"] == "context_length_exceeded"
    # the prompt fits but prompt + max_tokens does not
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "max_tokens": 8192}), 400, "prompt", ("8192",))
    n = http.post("/tokenize", json={"prompt": "Hi"}).json()["count"]
    assert f"{n + 8192} tokens" in err["message"] and f"{n} in the prompt" in err["message"]
    err = assert_error(http.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 9000}), 400, "messages",
                       ("8192", "9000 in the completion"))
    assert_still_serving(http)


def test_request_chat_template_needs_the_opt_in(base, http):
    """Without --trust-request-chat-template a request's chat_template is refused, path or text alike."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    for template in ("/etc/passwd", "{{ messages[0].content }}", "chatml"):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                           extra_body={"chat_template": template})
        assert exc.value.body["param"] == "chat_template"
        assert "--trust-request-chat-template" in exc.value.body["message"]
    assert_still_serving(http)


# ---- 401 / 404 ---------------------------------------------------------------------------------------
def test_api_key(base, http):
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert exc.value.status_code == 401
    assert_error(httpx.post(base + "/v1/completions", json=COMPLETION), 401)  # no key at all
    assert_error(httpx.post(base + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Basic " + KEY}), 401)
    assert_error(httpx.get(base + "/v1/models"), 401)
    assert httpx.get(base + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(base + "/metrics").status_code == 200
    good = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
    assert_still_serving(http)


def test_unknown_model_and_route(base, http):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert exc.value.status_code == 404
    err = assert_error(http.post("/v1/completions", json={**COMPLETION, "model": "nope"}), 404, "model", ("nope",))
    assert err["code"] == "model_not_found"
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_still_serving(http)


# ---- 503: queue full ---------------------------------------------------------------------------------
def test_queue_full_is_503_then_recovers(base, http):
    long = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as a, httpx.Client(base_url=base, headers=AUTH, timeout=120) as b:
        with a.stream("POST", "/v1/completions", json=long) as ra:  # runs (the single running seat)
            assert ra.status_code == 200
            with b.stream("POST", "/v1/completions", json=long) as rb:  # waits (the single queue place)
                assert rb.status_code == 200
                r = http.post("/v1/completions", json={**COMPLETION, "max_tokens": 1})
                err = assert_error(r, 503)
                assert err["code"] == "queue_full" and r.headers.get("retry-after") == "1"
                waiting = parse_metrics(http.get("/metrics").text)
                assert waiting["lmgen_requests_running"] == 1 and waiting["lmgen_requests_waiting"] >= 1
    deadline = time.monotonic() + 60  # both streams were closed: their requests get aborted
    while time.monotonic() < deadline:
        m = parse_metrics(http.get("/metrics").text)
        if m["lmgen_requests_running"] == 0 and m["lmgen_requests_waiting"] == 0 and m["lmgen_kv_cache_blocks_used"] == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"aborted requests still hold the engine: {m}")
    assert m['lmgen_requests_rejected_total{reason="queue_full"}'] >= 1
    assert_still_serving(http)


# ---- AsyncEngine on a fake engine: its failure paths, without a model ------------------------------------
class FakeEngine:
    """The narrow engine API AsyncEngine uses (add_request / abort / step / stop_sequences / snapshot and the queue
    counters), without a model: one token (7) per running request per step; a prompt starting with POISON makes
    the step raise; a prompt [BAD] is refused at admission."""

    POISON, BAD = 13, 666

    def __init__(self, max_num_seqs: int = 4, step_seconds: float = 0.005):
        self.max_num_seqs, self.step_seconds = max_num_seqs, step_seconds
        self.waiting: deque[tuple[str, list[int], SamplingParams]] = deque()
        self.running: dict[str, tuple[list[int], SamplingParams, int]] = {}  # id -> (prompt, params, tokens so far)
        self.stats = EngineStats()
        self.aborted: list[str] = []
        self.steps = 0

    def add_request(self, ids, params, request_id):
        if ids == [self.BAD]:
            raise ValueError("prompt token id 666 is cursed")
        self.waiting.append((request_id, ids, params))
        return request_id

    def has_unfinished(self):
        return bool(self.running or self.waiting)

    num_running = property(lambda self: len(self.running))
    num_waiting = property(lambda self: len(self.waiting))

    def set_max_num_seqs(self, n):
        self.max_num_seqs = n

    def request_ids(self):
        return list(self.running) + [rid for rid, _, _ in self.waiting]

    def unschedulable_request(self):
        return None

    def abort(self, rid):
        self.aborted.append(rid)
        self.running.pop(rid, None)
        self.waiting = deque(w for w in self.waiting if w[0] != rid)

    def stop_sequences(self, seqs):
        for rid, _ in seqs:
            self.running.pop(rid, None)

    def snapshot(self, drain_latencies=False):
        st = self.stats
        return EngineSnapshot(len(self.running), len(self.waiting), 0, 1, 0, 0, st.prompt_tokens, st.prefill_tokens,
                              st.generation_tokens, self.steps, (), ())

    def step(self):
        self.steps += 1
        time.sleep(self.step_seconds)
        while self.waiting and len(self.running) < self.max_num_seqs:
            rid, ids, params = self.waiting.popleft()
            self.running[rid] = (ids, params, 0)
        if any(ids[0] == self.POISON for ids, _, _ in self.running.values()):
            raise RuntimeError("poisoned batch")
        outs = []
        for rid, (ids, params, count) in list(self.running.items()):
            count += 1
            self.stats.generation_tokens += 1
            done = count >= params.max_tokens
            self.running[rid] = (ids, params, count)
            if done:
                del self.running[rid]
            outs.append(EngineCoreOutput(rid, 0, (7,), None, 0.0, "length" if done else None, None, len(ids), 0, count))
        return outs


class XTokenizer:
    """Every token reads 'x'."""

    def decode(self, ids, skip_special_tokens=True):
        return "x" * len(ids)


def _async_engine(**kw) -> tuple[AsyncEngine, FakeEngine]:
    fake = FakeEngine(**{k: kw.pop(k) for k in ("max_num_seqs", "step_seconds") if k in kw})
    return AsyncEngine(SimpleNamespace(engine=fake, tokenizer=XTokenizer()), **kw), fake


async def _text(engine: AsyncEngine, ids, max_tokens: int, rid: str) -> str:
    return "".join([so.delta_text async for so in engine.generate(ids, SamplingParams(max_tokens=max_tokens), rid)])


def test_async_engine_step_error_fails_only_its_batch_and_loop_survives():
    async def main():
        engine, fake = _async_engine()
        with pytest.raises(RuntimeError, match="poisoned"):
            await _text(engine, [FakeEngine.POISON, 1], 5, "poison")
        with pytest.raises(ValueError, match="cursed"):  # refused at admission: only this request hears it
            await _text(engine, [FakeEngine.BAD], 5, "bad")
        assert await _text(engine, [1, 2], 3, "fine") == "xxx"  # the loop carries on
        assert engine.is_running and not fake.has_unfinished()
        assert engine.metrics.engine_errors == 1
        await engine.shutdown(timeout=5)
        assert not engine.is_running

    asyncio.run(main())


def test_async_engine_hands_each_step_to_the_event_loop_once():
    """Eight streams running together each get their whole text, and the engine thread wakes the event loop once
    per step for all of them (RequestStream.put_many), not once per stream and item."""
    async def main():
        engine, fake = _async_engine(max_num_seqs=8)
        loop = asyncio.get_running_loop()
        calls, original = [], loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            calls.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        texts = await asyncio.gather(*(_text(engine, [1], 3 + i, f"r{i}") for i in range(8)))
        assert texts == ["x" * (3 + i) for i in range(8)]
        # one call per request for its admission, at most one per step for every output (a stream's deltas, its
        # RequestOutput and its end); one call per stream and item made 76 calls over these 10 steps
        assert len(calls) <= 8 + fake.steps < 50, (len(calls), fake.steps)
        await engine.shutdown(timeout=5)

    asyncio.run(main())


def test_async_engine_queue_full_and_cancel_aborts():
    async def main():
        engine, fake = _async_engine(max_num_seqs=1, max_queue=1)
        a = await engine.add_request([1], SamplingParams(max_tokens=10_000), "a")
        b = await engine.add_request([1], SamplingParams(max_tokens=10_000), "b")
        with pytest.raises(QueueFullError):
            await engine.add_request([1], SamplingParams(max_tokens=1), "c")
        assert engine.metrics.rejected == {"queue_full": 1}

        async def consume(stream):
            async for _ in stream:
                pass

        task = asyncio.create_task(consume(a))
        await asyncio.sleep(0.05)
        task.cancel()  # a client going away: the request is aborted, its seat freed
        with pytest.raises(asyncio.CancelledError):
            await task
        b.abort()
        for _ in range(200):
            if not fake.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert sorted(fake.aborted) == ["a", "b"] and not fake.has_unfinished()
        assert await _text(engine, [1], 2, "d") == "xx"
        await engine.shutdown(timeout=5)

    asyncio.run(main())


def test_async_engine_shutdown_finishes_in_flight_then_refuses():
    async def main():
        engine, fake = _async_engine(step_seconds=0.01)
        pending = asyncio.create_task(_text(engine, [1], 20, "slow"))  # ~0.2 s of steps
        await asyncio.sleep(0.03)
        await engine.shutdown(timeout=10)
        assert await pending == "x" * 20  # finished, not cut off
        with pytest.raises(EngineClosedError):
            await engine.add_request([1], SamplingParams(max_tokens=1), "late")

        engine2, fake2 = _async_engine(step_seconds=0.01)
        endless = asyncio.create_task(_text(engine2, [1], 100_000, "endless"))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await engine2.shutdown(timeout=0.2)  # the bounded wait runs out: the request is aborted
        assert time.monotonic() - t0 < 5
        with pytest.raises(EngineClosedError):
            await endless
        assert fake2.aborted == ["endless"] and not engine2.is_running

    asyncio.run(main())
