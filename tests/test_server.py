"""The OpenAI-compatible server, end to end: `lmgen serve` in a subprocess on 127.0.0.1 with the embedded
model, driven by the official `openai` client (and raw httpx where the client hides what is tested).

Runs in file order: the last test sends SIGTERM to the server and checks the graceful shutdown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import httpx
import pytest

openai = pytest.importorskip("openai")

from lmgen.server.metrics import parse_metrics  # noqa: E402
from server_process import KEY, MODEL, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("server"), "--max-num-seqs", "16", "--max-n", "40",
                        "--allowed-origins", "http://app.example,http://localhost:5173", "--access-log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=120, max_retries=0)


def _wait_idle(server: ServerProcess, timeout: float = 60.0) -> dict[str, float]:
    """Polls /metrics until no sequence runs or waits and no KV block is held (bounded)."""
    deadline = time.monotonic() + timeout
    m = server.metrics()
    while time.monotonic() < deadline:
        if m["lmgen_kv_cache_blocks_used"] == 0 and m["lmgen_requests_running"] == 0 and m["lmgen_requests_waiting"] == 0:
            return m
        time.sleep(0.2)
        m = server.metrics()
    raise AssertionError(f"server not idle after {timeout}s: {m}")


# ---- basics ------------------------------------------------------------------------------------------
def test_server_citizenship_models_cors_fingerprint_access_log(server, client):
    """GET /v1/models/{id} (404 in OpenAI's shape for another id), CORS for --allowed-origins only, the same
    system_fingerprint on every response, and --access-log lines."""
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    ok = httpx.options(server.base + "/v1/chat/completions", headers=pre)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
    other = httpx.options(server.base + "/v1/chat/completions", headers={**pre, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    a = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    b = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                                 stream=True))
    assert a.system_fingerprint.startswith("fp_") and {b.system_fingerprint, *(c.system_fingerprint for c in chunks)} == {a.system_fingerprint}
    deadline = time.monotonic() + 10
    while '"GET /v1/models/smol HTTP/1.1" 200' not in server.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert '"GET /v1/models/smol HTTP/1.1" 200' in server.log_text()



def test_beam_search_through_the_server_equals_transformers(client, hf_smol_model, hf_smol_tokenizer):
    """beam_width / length_penalty as extra fields (vLLM-style): the server's beams are transformers' beams."""
    import torch
    from transformers import GenerationConfig

    prompt = "The three primary colours are"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, n=3,
                                  extra_body={"beam_width": 3, "length_penalty": 1.0})
    ids = hf_smol_tokenizer(prompt, return_tensors="pt").input_ids
    hf_smol_model.generation_config = GenerationConfig(eos_token_id=hf_smol_tokenizer.eos_token_id, pad_token_id=1,
                                                       do_sample=False)
    with torch.no_grad():
        out = hf_smol_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=3, num_return_sequences=3,
                                     max_new_tokens=8, length_penalty=1.0, early_stopping=False, do_sample=False,
                                     return_dict_in_generate=True, output_scores=True)
    n = ids.shape[1]
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    expected = [hf_smol_tokenizer.decode(out.sequences[i, n:n + lengths[i]], skip_special_tokens=True) for i in range(3)]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected



def test_n_up_to_the_server_limit_then_400(server, client):
    """n > 1 fans out at admission: 40 choices (more than --max-num-seqs 16, so siblings queue) and a 400 naming
    `n` above --max-n, with every KV block back afterwards."""
    r = client.completions.create(model=MODEL, prompt="Name a colour:", max_tokens=2, temperature=1.0, n=40, seed=3)
    assert sorted(c.index for c in r.choices) == list(range(40))
    assert 40 <= r.usage.completion_tokens <= 80
    assert len({c.text for c in r.choices}) > 1
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Name a colour:", max_tokens=2, n=41)
    assert e.value.body["param"] == "n" and "at most 40" in e.value.body["message"]
    _wait_idle(server)



def test_models_health_tokenize(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    h = {"Authorization": f"Bearer {KEY}"}
    tok = httpx.post(server.base + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}, headers=h).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 8192
    back = httpx.post(server.base + "/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, headers=h).json()
    assert back["prompt"].endswith("Hello world")
    chat_tok = httpx.post(server.base + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=h).json()
    assert chat_tok["count"] > 3


def test_completion_and_chat(client):
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    assert "Paris" in c.choices[0].text
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens > 0 and c.usage.completion_tokens <= 6
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.completion_tokens <= 6


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    msgs = [{"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_n_stop_and_seed(client):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=8, temperature=1.0, n=3)
    a = client.completions.create(**kw, seed=1234)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    b = client.completions.create(**kw, seed=1234)
    texts_a = [ch.text for ch in sorted(a.choices, key=lambda c: c.index)]
    assert texts_a == [ch.text for ch in sorted(b.choices, key=lambda c: c.index)]  # same seed, same text
    c = client.completions.create(**kw, seed=98765)
    assert texts_a != [ch.text for ch in sorted(c.choices, key=lambda c: c.index)]  # another seed, other text
    assert len(set(texts_a)) > 1  # the n samples of one request differ from each other

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                          n=3, max_tokens=5, temperature=1.0, seed=7)
    assert sorted(ch.index for ch in chat.choices) == [0, 1, 2]
    assert chat.usage.completion_tokens <= 15 and len({ch.message.content for ch in chat.choices}) > 1

    # stop: greedy "The capital of France is" -> " Paris.\n\n..." ; stopping at "." cuts before it
    s = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."])
    assert s.choices[0].text == " Paris" and s.choices[0].finish_reason == "stop"


def test_logprobs(client):
    c = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == c.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tlp <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(tlp)  # greedy: the best one

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes).decode("utf-8") == t.token
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [t for ch in stream if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_chinese_prompt_streams(client):
    # Most CJK characters are 2-3 byte-level tokens here: a delta must never carry half of one. (Only a
    # completion cut by max_tokens inside a character may end in U+FFFD, exactly as decode() of its ids.)
    kw = dict(model=MODEL, prompt="中国的首都是北京。日本的首都是", max_tokens=16, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    deltas = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas[:-1]) and len(deltas) > 3
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in full) >= 3

    msgs = [{"role": "user", "content": "你好！请用中文介绍一下你自己。"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, stream=True) if c.choices]
    assert "".join(deltas) == full
    assert all("\ufffd" not in d for d in deltas[:-1])


# ---- many users at once ------------------------------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colours are", "Water boils at"]


def test_16_concurrent_streams_match_sequential(server, client):
    kw = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    alone = {p: client.completions.create(prompt=p, **kw).choices[0].text for p in PROMPTS}
    before = server.metrics()

    async def run() -> tuple[list[tuple[str, str]], float]:
        aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=300, max_retries=0)
        peak = 0.0
        done = asyncio.Event()

        async def one(prompt: str) -> tuple[str, str]:
            stream = await aclient.completions.create(prompt=prompt, stream=True, **kw)
            return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

        async def watch() -> None:
            nonlocal peak
            async with httpx.AsyncClient() as h:
                while not done.is_set():
                    text = (await h.get(server.base + "/metrics")).text
                    peak = max(peak, parse_metrics(text)["lmgen_requests_running"])
                    await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(16)))
        finally:
            done.set()
            await watcher
            await aclient.close()
        return results, peak

    results, peak = asyncio.run(run())
    assert len(results) == 16
    for prompt, text in results:
        assert text == alone[prompt], prompt
    assert peak > 1  # they really were batched together
    after = _wait_idle(server)
    assert after["lmgen_kv_cache_blocks_used"] == 0
    assert after["lmgen_generation_tokens_total"] - before["lmgen_generation_tokens_total"] == 16 * 8
    assert after["lmgen_time_to_first_token_seconds_count"] >= before["lmgen_time_to_first_token_seconds_count"] + 16


def test_shared_system_prompt_hits_prefix_cache(server, client):
    tag = uuid.uuid4().hex  # a system prompt no earlier test has cached
    system = f"[{tag}] You are a meticulous assistant. " + " ".join(
        f"Rule {i}: answer briefly, politely and precisely, and never invent facts." for i in range(12))
    ask = lambda q: client.chat.completions.create(  # noqa: E731
        model=MODEL, messages=[{"role": "system", "content": system}, {"role": "user", "content": q}], max_tokens=2, temperature=0)
    m0 = server.metrics()
    first = ask("What is 2+2?")
    m1 = server.metrics()
    second = ask("Name a fruit.")
    m2 = server.metrics()
    assert first.usage.prompt_tokens > 150
    hits = m2["lmgen_prefix_cache_hits_total"] - m1["lmgen_prefix_cache_hits_total"]
    prefilled_first = m1["lmgen_prefill_tokens_total"] - m0["lmgen_prefill_tokens_total"]
    prefilled_second = m2["lmgen_prefill_tokens_total"] - m1["lmgen_prefill_tokens_total"]
    assert hits * 16 >= 128  # at least 8 blocks of the system prompt came from the cache
    assert prefilled_second <= second.usage.prompt_tokens - 128
    assert prefilled_second < prefilled_first
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - prefilled_second


def test_client_disconnect_mid_stream_frees_blocks(server):
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Count to one thousand: 1, 2, 3,", "max_tokens": 2000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    got = 0
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep a reference: a dropped httpx line iterator closes the connection
            for line in lines:
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break
            mid = server.metrics()
            assert mid["lmgen_kv_cache_blocks_used"] > 0  # still generating while we are connected
    after = _wait_idle(server, timeout=60)  # the server noticed the closed connection and aborted
    assert after["lmgen_kv_cache_blocks_used"] == 0
    key = 'lmgen_requests_finished_total{finish_reason="abort"}'
    assert after.get(key, 0) >= before.get(key, 0) + 1
    assert after["lmgen_generation_tokens_total"] - before["lmgen_generation_tokens_total"] < 500


def test_client_timeout_on_non_streaming_request_aborts_it(server):
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Count to one thousand: 1, 2, 3,", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=1.5)
    after = _wait_idle(server, timeout=60)
    assert after["lmgen_generation_tokens_total"] - before["lmgen_generation_tokens_total"] < 500
    key = 'lmgen_requests_finished_total{finish_reason="abort"}'
    assert after.get(key, 0) >= before.get(key, 0) + 1


def test_sampling_extras_and_logit_bias(server, client):
    greedy = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert greedy.choices[0].text.startswith(" Paris")
    # top_k=1 at temperature 1 is greedy; the vLLM extras are accepted
    top1 = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=1.0,
                                     extra_body={"top_k": 1, "min_p": 0.05, "repetition_penalty": 1.0, "min_tokens": 3})
    assert top1.choices[0].text == greedy.choices[0].text and top1.usage.completion_tokens == 3
    paris = httpx.post(server.base + "/tokenize", json={"prompt": " Paris", "add_special_tokens": False},
                       headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"]
    assert len(paris) == 1
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                       logit_bias={str(paris[0]): -100})
    assert not banned.choices[0].text.startswith(" Paris")
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
                                        extra_body={"stop_token_ids": paris})
    assert stopped.choices[0].text == "" and stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].model_extra.get("stop_reason") == paris[0]


# ---- shutdown: keep this test last -------------------------------------------------------------------
def test_sigterm_finishes_in_flight_request_then_exits(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    lines = []
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", server.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 1:
                    os.kill(server.proc.pid, signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"  # the request in flight was finished, not cut off
    chunks = [line for line in lines if line.startswith("data: {")]
    assert '"finish_reason":"length"' in chunks[-1]
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown: the conventional exit status
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    log = server.log_text()
    assert "engine stopped" in log and "Finished server process" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base + "/health", timeout=5)
