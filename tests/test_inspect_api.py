"""The inspector's JSON API against real oracles: the server's own /v1/completions logprobs, lmgen's Sampler on the
same logits (kept sets and draws), LLM.generate with the same seed, the engine's beam search, and transformers'
output_attentions for the attention weights."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from lmgen.inspect.filters import filter_step, step_generator
from lmgen.sampling.metadata import SamplingMetadata
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.sampler import Sampler
from tests.server_process import KEY, MODEL, ServerProcess

PROMPT = "The capital of France is"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # the float32 cache of the smol_llm fixture, so the engine's numbers are the in-process LLM's and the recompute's
    srv = ServerProcess(tmp_path_factory.mktemp("inspect-api"), "--kv-cache-dtype", "float32", api_key=None)
    yield srv
    srv.stop()


def post(server, path, body, status=200):
    r = httpx.post(server.base + path, json=body, headers=HEADERS, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def logits_of(server, sid, step=-1) -> torch.Tensor:
    r = httpx.get(f"{server.base}/v1/inspect/sessions/{sid}/logits", params={"step": step}, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return torch.from_numpy(np.frombuffer(base64.b64decode(r.json()["data_base64"]), dtype=np.float32).copy())


def sampler_kept(logits: torch.Tensor, params: SamplingParams, prompt, outputs) -> set[int]:
    """The token ids lmgen's Sampler may draw from these logits with these params."""
    x = logits.reshape(1, -1)
    meta = SamplingMetadata.build([params], [prompt], [outputs], [None], [set()], x.shape[-1], x.device)
    y = Sampler.apply_penalties_bias_min_tokens(x, meta)
    if params.greedy:
        return {int(torch.argmax(y))}
    return set(torch.isfinite(Sampler.apply_warpers(y, meta))[0].nonzero()[:, 0].tolist())


def test_probabilities_equal_the_servers_logprobs(server):
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT, "params": {"temperature": 0}})
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"count": 4})
    assert len(s["steps"]) == 5 and s["prompt_token_count"] == len(s["prompt_tokens"]) == 5
    c = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                          "logprobs": 20})
    lp = c["choices"][0]["logprobs"]
    assert [st["chosen"]["text"] for st in s["steps"]] == lp["tokens"]
    for st, top in zip(s["steps"], lp["top_logprobs"]):
        by_text = {cand["text"]: cand for cand in st["candidates"]}
        assert len(st["candidates"]) >= 20
        for text, logprob in top.items():
            assert by_text[text]["raw_prob"] == pytest.approx(np.exp(logprob), abs=1e-4)
            assert by_text[text]["raw_logprob"] == pytest.approx(logprob, abs=1e-4)


@pytest.mark.parametrize("controls", [{"temperature": 0.7, "top_p": 0.8}, {"temperature": 1.6, "top_k": 12},
                                      {"temperature": 1.0, "min_p": 0.05, "repetition_penalty": 1.3},
                                      {"temperature": 2.0, "top_p": 0.95, "top_k": 30, "min_p": 0.01}])
def test_refilter_keeps_exactly_the_samplers_set(server, controls):
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT, "params": {"temperature": 1.0, "seed": 5}})
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"count": 2})
    before = s["steps"][-1]
    r = post(server, f"/v1/inspect/sessions/{s['id']}/filter", controls)
    step = r["step"]
    logits = logits_of(server, s["id"])
    prompt = [t["id"] for t in s["prompt_tokens"]]
    outputs = [t["id"] for t in s["output_tokens"]]
    params = SamplingParams(max_tokens=None, **{**r["params"]})
    kept = sampler_kept(logits, params, prompt, outputs)
    assert step["kept_count"] == len(kept)
    for cand in step["candidates"]:
        assert cand["kept"] == (cand["id"] in kept), cand
    assert step["sampler_token"]["id"] in kept
    assert [c["raw_prob"] for c in before["candidates"][:5]] == \
        [c["raw_prob"] for c in sorted(step["candidates"], key=lambda c: -c["raw_prob"])[:5]]  # same logits, no forward


def test_a_seeded_sampled_session_is_llm_generate(server):
    """The tokens the inspector takes are the engine's own draws: the same seed and controls give LLM.generate's."""
    controls = {"temperature": 1.3, "top_k": 40, "top_p": 0.95, "seed": 11}
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT, "params": controls})
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"count": 5})
    c = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, **controls,
                                          "logprobs": 0})
    assert "".join(t["text"] for t in s["output_tokens"]) == c["choices"][0]["text"]


def test_forcing_a_candidate_continues_from_it(server):
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT, "params": {"temperature": 0}})
    cands = s["steps"][0]["candidates"]
    forced = cands[3]["id"]  # not the top one
    assert forced != s["steps"][0]["chosen"]["id"]
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"force": forced})
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"count": 3})
    assert s["output_tokens"][0]["id"] == forced and s["steps"][0]["chosen"]["forced"]
    prompt = [t["id"] for t in s["prompt_tokens"]]
    c = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt + [forced], "max_tokens": 3,
                                          "temperature": 0, "logprobs": 1})
    assert "".join(t["text"] for t in s["output_tokens"][1:]) == c["choices"][0]["text"]
    # branch again at step 0 with another candidate: the later steps are replaced
    other = cands[5]["id"]
    s = post(server, f"/v1/inspect/sessions/{s['id']}/step", {"at": 0, "force": other})
    assert [t["id"] for t in s["output_tokens"]] == [other] and len(s["steps"]) == 2


def test_beam_tree_best_equals_the_engines_beam_search(server, smol_llm):
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT})
    for width in (2, 4):
        tree = post(server, f"/v1/inspect/sessions/{s['id']}/beams", {"beam_width": width, "max_tokens": 6})
        (local,) = smol_llm.generate(PROMPT, SamplingParams(beam_width=width, n=width, max_tokens=6))
        assert [r["token_ids"] for r in tree["results"]] == [o.token_ids for o in local.outputs]
        assert [r["score"] for r in tree["results"]] == pytest.approx([o.score for o in local.outputs], abs=1e-5)
        c = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6, "beam_width": width,
                                              "n": width, "temperature": 0})
        assert len(tree["results"]) == width
        assert tree["results"][0]["text"] == c["choices"][0]["text"]
        assert [r["text"] for r in tree["results"]] == [ch["text"] for ch in c["choices"]]
        statuses = {n["status"] for n in tree["nodes"]}
        assert "pruned" in statuses and "finished" in statuses
        assert all(len(st["live"]) == width for st in tree["steps"][:-1])


def test_chat_prompt_shows_the_template_with_special_tokens(server):
    s = post(server, "/v1/inspect/sessions", {"messages": [{"role": "user", "content": "你好，世界"}]})
    assert "<|im_start|>" in s["prompt_text"] and "你好，世界" in s["prompt_text"]
    assert any(t["special"] and t["text"] == "<|im_start|>" for t in s["prompt_tokens"])
    assert any(t["text"].startswith("<0x") for t in s["prompt_tokens"])  # byte pieces of a split character, readable


def test_bad_input_is_a_400_naming_the_value(server):
    s = post(server, "/v1/inspect/sessions", {"prompt": PROMPT})
    sid = s["id"]
    att = post(server, f"/v1/inspect/sessions/{sid}/attention", {"layer": 2, "head": 3})
    assert att["check"]["max_abs_prob_diff"] < 1e-4 and len(att["weights"]) == 5  # float weights: the engine's numbers
    assert post(server, f"/v1/inspect/sessions/{sid}/filter", {"top_p": 1.5}, 400)["error"]["param"] == "top_p"
    assert post(server, f"/v1/inspect/sessions/{sid}/step", {"force": 10**9}, 400)["error"]["param"] == "force"
    assert post(server, f"/v1/inspect/sessions/{sid}/step", {"count": 10**6}, 400)["error"]["param"] == "count"
    assert post(server, f"/v1/inspect/sessions/{sid}/beams", {"beam_width": 9}, 400)["error"]["param"] == "beam_width"
    assert post(server, f"/v1/inspect/sessions/{sid}/attention", {"layer": 99, "head": 0}, 400)["error"]["param"] == "layer"
    assert post(server, "/v1/inspect/sessions", {"prompt": PROMPT, "params": {"top_q": 1}}, 400)["error"]["param"] == "top_q"
    assert post(server, "/v1/inspect/sessions/insp-nope/step", {}, 404)["error"]["code"] == "session_not_found"
    assert httpx.get(server.base + "/inspect/static/..%2Fapi.py", timeout=30).status_code == 404
    assert httpx.get(server.base + "/health", timeout=30).status_code == 200


def test_a_server_with_an_api_key_guards_the_inspector_api(tmp_path):
    srv = ServerProcess(tmp_path)  # --api-key KEY
    try:
        assert httpx.post(srv.base + "/v1/inspect/sessions", json={"prompt": PROMPT}, timeout=30).status_code == 401
        assert httpx.get(srv.base + "/v1/inspect/info", timeout=30).status_code == 401
        assert post(srv, "/v1/inspect/sessions", {"prompt": PROMPT})["prompt_token_count"] == 5  # with the key
        assert httpx.get(srv.base + "/inspect", timeout=30).status_code == 200  # the page itself is public
    finally:
        srv.stop()


def test_filter_step_draws_what_the_sampler_draws():
    """On random logits: the verdicts, kept set and drawn token of filter_step are the Sampler's, draw by draw."""
    torch.manual_seed(0)
    logits = torch.randn(200) * 3
    for temperature, top_k, top_p, min_p in [(0.5, 0, 0.9, 0.0), (1.5, 20, 1.0, 0.02), (1.0, 5, 0.5, 0.1)]:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=3)
        for draw in range(3):
            view = filter_step(logits, params, [1, 2], [], set(), draw, top_n=200)
            kept = sampler_kept(logits, params, [1, 2], [])
            assert {c["id"] for c in view.candidates if c["kept"]} == kept and view.kept_count == len(kept)
            meta = SamplingMetadata.build([params], [[1, 2]], [[]], [step_generator(3, draw, "cpu")], [set()], 200, "cpu")
            assert view.sampler_token == int(Sampler()(logits.reshape(1, -1), meta).token_ids[0])
            for c in view.candidates:  # each verdict is that filter's own decision, in the sampler's order
                if top_k == 0:
                    assert c["top_k"] == "off"
                if c["kept"]:
                    assert all(c[f] in ("kept", "off") for f in ("top_k", "top_p", "min_p"))
                else:
                    assert "cut" in (c["top_k"], c["top_p"], c["min_p"])


@pytest.mark.parametrize("kind", ["llama", "mistral"])  # GQA with llama3 RoPE; a sliding window of 8 positions
def test_attention_weights_equal_transformers(kind, tiny_model_dirs, one_thread):
    from transformers import AutoModelForCausalLM

    from lmgen import LLM
    from lmgen.inspect.attention import attention_weights

    folder = tiny_model_dirs[kind]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    llm = LLM(model=str(folder), quantization="none", dtype="float32")
    ids = llm.tokenizer.encode("Attention is all you need, 注意力", add_special_tokens=False)
    with torch.no_grad():
        att = hf(torch.tensor([ids]), output_attentions=True).attentions  # per layer (1, heads, n, n)
    assert len(ids) > 8
    for layer in range(2):
        for head in range(4):
            weights, logits = attention_weights(llm.model, ids, layer, head)
            ours = torch.tensor(weights)
            if kind == "mistral":
                assert (ours[:-8] == 0).all() and (ours[-8:] > 0).all()
            torch.testing.assert_close(ours, att[layer][0, head, -1, :], atol=1e-5, rtol=1e-4)
            assert ours.sum().item() == pytest.approx(1.0, abs=1e-5)
        with torch.no_grad():  # and the recompute's next-token logits are transformers' too
            torch.testing.assert_close(logits, hf(torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_lmgen_inspect_serves_the_page_and_prints_its_url(tmp_path):
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "lmgen.cli", "inspect", "--port", "0", "--quantization", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("lmgen inspector: http://127.0.0.1:") and line.rstrip().endswith("/inspect"), line
        url = line.split(": ", 1)[1].strip()
        deadline = time.monotonic() + 120
        while True:
            try:
                page = httpx.get(url, timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.3)
        assert page.status_code == 200 and "<title>lmgen inspector</title>" in page.text
        base = url.rsplit("/inspect", 1)[0]
        assert "lmgenInspector" in httpx.get(base + "/inspect/static/inspector.js", timeout=10).text
        s = httpx.post(base + "/v1/inspect/sessions", json={"prompt": "你好"}, timeout=60).json()
        assert s["steps"][0]["pending"] and len(s["steps"][0]["candidates"]) >= 20
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_lmgen_inspect_bad_port_is_one_error_line():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lmgen.cli", "inspect", "--port", "70000"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("lmgen: error: ") and "70000" in r.stderr


def test_readme_notebook_snippet_runs_against_a_server(server, tmp_path):
    """The README's inspector snippet (a ```py block: it needs a server) runs verbatim but for the port."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (code,) = [b for b in re.findall(r"^```py\n(.*?)^```", readme, flags=re.S | re.M) if "/v1/inspect/" in b]
    code = code.replace("http://127.0.0.1:8000", server.base)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 6 and lines[0].startswith("' Paris'") and "kept" in lines[0]


def test_inspecting_beside_serving_changes_nothing_and_leaves_nothing(smol_llm):
    """In-process server: a completion streams while a session steps, beams and reads attention; the completion is
    the same as alone (the inspector's passes run on the engine thread, batched like any request), and afterwards
    the engine holds no observer, sequence or KV block of the inspector's."""
    import threading

    from fastapi.testclient import TestClient

    from lmgen.server.app import create_app

    body = {"model": "smol", "prompt": "Once upon a time, in a land far away,", "max_tokens": 48, "temperature": 0}
    with TestClient(create_app(smol_llm, "smol")) as c:
        alone = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        beside = {}
        worker = threading.Thread(target=lambda: beside.update(c.post("/v1/completions", json=body).json()))
        worker.start()
        s = c.post("/v1/inspect/sessions", json={"prompt": PROMPT, "params": {"temperature": 0}}).json()
        s = c.post(f"/v1/inspect/sessions/{s['id']}/step", json={"count": 4}).json()
        assert c.post(f"/v1/inspect/sessions/{s['id']}/beams", json={"beam_width": 2, "max_tokens": 3}).status_code == 200
        assert c.post(f"/v1/inspect/sessions/{s['id']}/attention", json={"layer": 0, "head": 0}).status_code == 200
        worker.join(timeout=300)
        assert beside["choices"][0]["text"] == alone
        solo = c.post("/v1/inspect/sessions", json={"prompt": PROMPT, "params": {"temperature": 0}}).json()
        solo = c.post(f"/v1/inspect/sessions/{solo['id']}/step", json={"count": 4}).json()
        assert solo["output_text"] == s["output_text"]
        for a, b in zip(s["steps"], solo["steps"]):  # batched beside a stream or alone: the same bits
            assert [x["raw_prob"] for x in a["candidates"]] == [x["raw_prob"] for x in b["candidates"]]
        engine = smol_llm.engine
        assert engine.observers == {} and not engine.sequences and engine.block_manager.num_used_blocks == 0
