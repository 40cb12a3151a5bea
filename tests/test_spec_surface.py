"""Speculative decoding through every surface: the CLI's --speculative flags (and their one-line errors), and the
server (`lmgen serve --speculative self`): greedy answers equal the plain model's, usage carries
spec_acceptance_rate (streamed too), /metrics counts proposed and accepted tokens, and no KV block stays held."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest

from lmgen import LLM, SamplingParams

from server_process import KEY, ServerProcess


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen.cli", *args], capture_output=True, text=True, timeout=600,
                          encoding="utf-8")


def test_cli_generate_with_ngram_equals_plain(tiny_model_dirs):
    folder = str(tiny_model_dirs["qwen2"])
    prompt = "the cat sat on the mat and the cat sat on the mat and the"
    proc = run("generate", "--model", folder, prompt, "--max-tokens", "16", "--temperature", "0", "--ignore-eos",
               "--speculative", "ngram", "--num-speculative-tokens", "3", "--threads", "1", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert "speculative ngram:" in proc.stderr and "proposed tokens accepted" in proc.stderr
    want = LLM(folder).generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    assert proc.stdout == want.outputs[0].text


@pytest.mark.parametrize("argv, needle", [
    (["--speculative", "medusa"], "'medusa'"),
    (["--num-speculative-tokens", "3"], "--num-speculative-tokens"),
    (["--speculative", "ngram", "--num-speculative-tokens", "99"], "99"),
    (["--speculative", "ngram", "--draft-model", "x"], "'x'"),
    (["--speculative", "self"], "quantization"),  # self-draft needs a float target
])
def test_cli_speculative_errors_are_one_line(tiny_model_dirs, argv, needle):
    proc = run("generate", "--model", str(tiny_model_dirs["llama"]), "hi", *argv)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgen: error: ") and needle in lines[0], proc.stderr


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("spec_server"), "--speculative", "self", "--num-speculative-tokens", "4")
    yield srv
    srv.stop()


def test_server_self_draft_usage_and_metrics(server, smol_llm):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=300, max_retries=0)
    messages = [{"role": "user", "content": "List three colours of the rainbow."}]
    want = smol_llm.chat(messages, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    r = client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want
    rate = r.usage.model_extra["spec_acceptance_rate"]
    assert 0.0 < rate <= 1.0
    chunks = list(client.chat.completions.create(model="smol", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.model_extra["spec_acceptance_rate"] == rate
    deadline = time.monotonic() + 60
    m = server.metrics()
    while m["lmgen_kv_cache_blocks_used"] != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        m = server.metrics()
    assert m["lmgen_kv_cache_blocks_used"] == 0
    assert m["lmgen_spec_draft_tokens_total"] >= m["lmgen_spec_accepted_tokens_total"] > 0
