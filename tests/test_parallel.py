"""Tensor and pipeline parallelism on torch.distributed (gloo, one thread per rank): the split model gives one
process's tokens and logprobs (bit for bit in the default, exact layout; within 1e-4 in Megatron's all-reduce
layout) on the random-initialised test models and the embedded model, float and packed, offline and through the
server; a size the model cannot be split by is refused; a killed worker fails the streamed request and stops the
server."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import openai
import pytest

from lmgen import LLM, SamplingParams
from lmgen.errors import ParallelConfigError
from server_process import MODEL, ServerProcess
from test_errors import run_cli

PROMPTS = ["Hello, my name is", "The capital of France is a city that", "1 2 3 4 5", "def add(a, b):\n    return",
           "今天天气很好，我们去"]
GREEDY = SamplingParams(max_tokens=10, temperature=0, logprobs=3)


def results(llm: LLM, params: SamplingParams = GREEDY) -> list[tuple[list[int], list[dict]]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(PROMPTS, params)]


def assert_close(got, want, tol: float) -> None:
    for (ids, lps), (ref_ids, ref_lps) in zip(got, want):
        assert ids == ref_ids
        for lp, ref in zip(lps, ref_lps):
            assert lp.keys() == ref.keys() and all(abs(lp[t] - ref[t]) <= tol for t in ref)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama_bias"])
def test_two_ranks_give_one_process_bit_for_bit(kind, tiny_model_dirs, one_thread):
    """GQA, a single KV head replicated on both ranks (mistral), q/k/v biases (qwen2), biases everywhere."""
    folder = str(tiny_model_dirs[kind])
    one = LLM(folder, quantization="none")
    want = results(one)
    with LLM(folder, quantization="none", tensor_parallel_size=2) as split:
        assert results(split) == want  # the exact layout: same tokens, same logprob floats
        # each rank holds about half of the weights (the norms are replicated)
        assert split.model.weight_bytes() < 0.55 * one.model.weight_bytes()


def test_megatron_layout_is_within_1e4(tiny_model_dirs, one_thread):
    """--no-batch-invariant: row-parallel output and down projections whose partial sums are all-reduced."""
    folder = str(tiny_model_dirs["qwen2"])
    want = results(LLM(folder, quantization="none", batch_invariant=False))
    with LLM(folder, quantization="none", batch_invariant=False, tensor_parallel_size=2) as split:
        assert type(split.model.local.layers[0].mlp.down_proj).__name__ == "RowParallel"
        assert_close(results(split), want, 1e-4)


@pytest.mark.parametrize("quantization", ["none", "auto"])
def test_embedded_model_over_three_ranks(quantization, smol_llm):
    """SmolLM2-135M has 9 heads over 3 KV heads: 3 ranks of 3 heads and one KV head each; packed Q4_1 / Q8_0
    blocks are cut per rank at load."""
    one = smol_llm if quantization == "none" else LLM(quantization="auto", threads=1)
    want = results(one)
    with LLM(quantization=quantization, tensor_parallel_size=3, kv_cache_dtype=one.kv_cache_dtype) as split:
        assert results(split) == want


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_two_pipeline_stages_give_one_process_bit_for_bit(kind, tiny_model_dirs, one_thread):
    folder = str(tiny_model_dirs[kind])
    want = results(LLM(folder, quantization="none"))
    with LLM(folder, quantization="none", pipeline_parallel_size=2) as staged:
        assert staged.model.config.num_layers == 1  # this rank's stage of the 2 layers (and its KV cache)
        assert staged.model.micro_batches == 2  # a step of several sequences goes through in 2 overlapped parts
        assert results(staged) == want


def test_two_stages_of_two_ranks_give_one_process_bit_for_bit(tiny_model_dirs, one_thread):
    """TP=2 x PP=2: four processes; each stage's two ranks form their own tensor-parallel group."""
    folder = str(tiny_model_dirs["llama"])
    want = results(LLM(folder, quantization="none"))
    with LLM(folder, quantization="none", tensor_parallel_size=2, pipeline_parallel_size=2) as split:
        assert (split.model.config.num_layers, split.model.config.num_heads) == (1, 2)
        assert results(split) == want


def test_embedded_model_in_two_pipeline_stages():
    want = results(LLM(quantization="auto", threads=1))
    with LLM(quantization="auto", pipeline_parallel_size=2) as staged:
        assert staged.model.config.num_layers == 15
        assert results(staged) == want


def test_a_size_that_does_not_split_the_model_is_refused(gguf_path):
    with pytest.raises(ParallelConfigError, match="9 attention heads.*sizes that split this model evenly: 1, 3") as e:
        LLM(tensor_parallel_size=2)
    assert e.value.param == "tensor_parallel_size" and e.value.value == 2
    with pytest.raises(ParallelConfigError, match="integer in"):
        LLM(tensor_parallel_size=0)
    with pytest.raises(ParallelConfigError, match="30 layers") as e:
        LLM(pipeline_parallel_size=31)
    assert e.value.param == "pipeline_parallel_size"
    r = run_cli("generate", "hi", "--tensor-parallel-size", "2", "--max-tokens", "2")
    assert r.returncode == 1 and r.stderr.count("lmgen: error:") == 1 and "9 attention heads" in r.stderr


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the spawned workers and multiprocessing's resource tracker)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"spawn_main" in cmd


def test_server_with_two_pipeline_stages(tmp_path, tiny_model_dirs, one_thread):
    folder = str(tiny_model_dirs["qwen2"])
    want = LLM(folder, quantization="none").generate(PROMPTS, GREEDY)
    server = ServerProcess(tmp_path, "--model", folder, "--pipeline-parallel-size", "2", api_key=None)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=10, temperature=0)  # one batch
        assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [w.outputs[0].text for w in want]
    finally:
        server.stop()


def test_server_with_two_ranks_then_a_killed_worker(tmp_path, tiny_model_dirs, one_thread):
    folder = str(tiny_model_dirs["llama"])
    want = LLM(folder, quantization="none").generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, logprobs=2))
    server = ServerProcess(tmp_path, "--model", folder, "--tensor-parallel-size", "2", api_key=None)
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
        assert r.choices[0].text == want[0].outputs[0].text
        ref = want[0].outputs[0]
        got = r.choices[0].logprobs.token_logprobs
        assert all(abs(a - ref.logprobs[i][t]) <= 1e-5 for i, (a, t) in enumerate(zip(got, ref.token_ids)))

        workers = [p for p in _children(server.proc.pid) if _is_worker(p)]
        assert len(workers) == 1
        stream = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=240, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        first = next(iter(stream))
        assert first.choices[0].text is not None
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError, match="worker"):
            for _ in stream:
                pass
        assert time.monotonic() - killed < 10
        assert server.proc.wait(timeout=60) != 0
        log = server.log_text()
        assert log.count("lmgen: error:") == 1 and "worker" in log.split("lmgen: error:")[1].splitlines()[0]
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}").exists() for p in workers)
    finally:
        server.stop()
