"""A hostile or careless client against a real `lmgen serve` (the embedded model, started with
--trust-request-chat-template and a 1 MB body limit): no file is read through a request, no template or
body freezes the server (/health answers within 1 s meanwhile), every limit answers its 4xx in OpenAI's
shape, and after each failing case the server still serves and holds no KV block.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from lmgen.server.metrics import parse_metrics  # noqa: E402
from server_process import MODEL, ServerProcess  # noqa: E402

MAX_BODY = 1_000_000
HI = [{"role": "user", "content": "Hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("server"), "--max-num-seqs", "4", "--trust-request-chat-template",
                        "--max-request-bytes", str(MAX_BODY), api_key=None)
    yield srv.base
    srv.stop()


@pytest.fixture(scope="module")
def http(base):
    with httpx.Client(base_url=base, timeout=120) as h:
        yield h


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120, max_retries=0)


def assert_error(r: httpx.Response, status: int, param: str | None = None, contains: tuple[str, ...] = ()) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["param"] == param, err
    for fragment in contains:
        assert fragment in err["message"], err
    return err


def assert_serving_and_idle(http: httpx.Client) -> None:
    """The server answers a completion and a chat, then returns to no running request and no KV block held."""
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 1})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        m = parse_metrics(http.get("/metrics").text)
        if m["lmgen_kv_cache_blocks_used"] == 0 and m["lmgen_requests_running"] == 0:
            return
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


class HealthProbe:
    """Polls /health in a thread while the block runs; records each answer's latency (s), or inf."""

    def __init__(self, base: str):
        self.base, self.latencies, self._stop = base, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as h:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = h.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.monotonic() - t0 if ok else float("inf"))
                time.sleep(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def assert_responsive(self) -> None:
        assert len(self.latencies) >= 3, self.latencies
        assert max(self.latencies) < 1.0, f"/health took {max(self.latencies):.2f}s: {self.latencies}"


# ---- 1. no file read through a request ---------------------------------------------------------------------
def test_template_paths_are_never_read(http, client, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    for path in ("/etc/passwd", str(secret), "~/.bashrc", "../../../../etc/hostname"):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, extra_body={"chat_template": path})
        assert e.value.status_code == 400 and e.value.body["param"] == "chat_template"
        assert "not accepted here" in e.value.body["message"]
        assert "root:" not in e.value.body["message"] and "TOP-SECRET" not in e.value.body["message"]
    assert_serving_and_idle(http)


def test_trusted_template_text_is_used(http, client):
    template = "{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:"
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "你好"}], max_tokens=1,
                                         extra_body={"chat_template": template})
    expected = http.post("/tokenize", json={"prompt": "Q: 你好\nA:", "add_special_tokens": False}).json()["count"]
    assert out.usage.prompt_tokens == expected


# ---- 2, 3. templates: time and size limits, the server keeps answering -----------------------------------------
@pytest.mark.parametrize("template, fragment", [
    (NESTED_LOOPS, "longer than"),
    ("{{ 'x'|center(100000000) }}", "center"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "concatenation"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "passed"),
    ("{{ 'x' * 100000000 }}", "repeated"),
])
def test_hostile_template_is_a_400_and_health_stays_up(base, http, template, fragment):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "chat_template": template}
    with HealthProbe(base) as probe:
        r = http.post("/v1/chat/completions", json=body)
        time.sleep(0.3)  # a few more probes after the answer
    err = assert_error(r, 400, "chat_template", (fragment,))
    assert err["code"] == "chat_template_limit"
    probe.assert_responsive()
    assert_serving_and_idle(http)


def test_concurrent_hostile_templates_do_not_stop_normal_requests(base, http):
    body = {"model": MODEL, "messages": HI, "max_tokens": 2, "chat_template": NESTED_LOOPS}
    answers: list[httpx.Response] = []

    def hostile():
        with httpx.Client(base_url=base, timeout=120) as h:
            answers.append(h.post("/v1/chat/completions", json=body))

    threads = [threading.Thread(target=hostile) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200 and time.monotonic() - t0 < 4.0  # not queued behind the 5 s renders
    for t in threads:
        t.join(timeout=60)
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert_serving_and_idle(http)


# ---- 4. fan-out --------------------------------------------------------------------------------------------
def test_huge_n_is_a_400_and_an_unrelated_stream_finishes(base, http):
    """n = 1,000,000 is refused at admission (400 naming n, --max-n 128 by default) while another request streams;
    that stream ends normally and no KV block is left held."""
    streamed: list[str] = []

    def stream():
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "stream": True}
        with httpx.Client(base_url=base, timeout=120) as h, h.stream("POST", "/v1/completions", json=body) as r:
            streamed.extend(line for line in r.iter_lines() if line.startswith("data: "))

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.2)
    for n in (1_000_000, 129):
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": n})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    t.join(timeout=120)
    assert streamed[-1] == "data: [DONE]" and '"finish_reason":"length"' in streamed[-2], streamed[-3:]
    assert_serving_and_idle(http)


# ---- 5. body size and prompt length -----------------------------------------------------------------------
def test_huge_body_is_413_before_parsing(base, http):
    big = {"model": MODEL, "prompt": "x" * (20 << 20), "max_tokens": 1}
    with HealthProbe(base) as probe:
        t0 = time.monotonic()
        r = http.post("/v1/completions", json=big)
        took = time.monotonic() - t0
        time.sleep(0.3)
    err = assert_error(r, 413, None, (str(MAX_BODY),))
    assert err["code"] == "request_too_large" and took < 10
    probe.assert_responsive()
    assert_serving_and_idle(http)


def test_streamed_body_without_length_is_capped(http):
    def chunks():
        yield b'{"model": "smol", "prompt": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, None, ("while being read",))
    assert_serving_and_idle(http)


def test_body_limit_through_the_openai_client(client, http):
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="z" * (2 * MAX_BODY), max_tokens=1)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    assert_serving_and_idle(http)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 180_000, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "词" * 300_000}]}, "messages"),
])
def test_prompt_far_past_the_context_is_a_quick_400(base, http, path, body, param):
    with HealthProbe(base) as probe:
        t0 = time.monotonic()
        r = http.post(path, json=body)
        took = time.monotonic() - t0
        time.sleep(0.3)
    err = assert_error(r, 400, param, ("8192",))
    assert err["code"] == "context_length_exceeded" and took < 10
    probe.assert_responsive()
    assert_serving_and_idle(http)


# ---- roles and stop strings: refused, as OpenAI does ----------------------------------------------------------
def test_unknown_role_is_a_400(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "Hi"}], max_tokens=2)
    assert e.value.body["param"] == "messages" and "wizard" in e.value.body["message"]
    ok = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert_serving_and_idle(http)


def test_too_many_or_too_long_stop_strings_are_a_400(client, http):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stop=[f"s{i}" for i in range(100)])
    assert e.value.body["param"] == "stop" and "at most 16 stop strings" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, stop="q" * 5000)
    assert e.value.body["param"] == "stop" and "1000 characters" in e.value.body["message"]
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stop=[f"s{i}" for i in range(16)])
    assert ok.choices[0].text is not None
    assert_serving_and_idle(http)
