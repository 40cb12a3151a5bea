"""The real `lmgen` process on the embedded model: generate, tokenize, a scripted chat session, and the command
line's habits (--version, bare help, one-line usage errors, text-only stdout, serve's port check)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import subprocess
import sys

import pytest

from lmgen import SamplingParams


def lmgen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lmgen.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=600, encoding="utf-8")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def test_generate_streams_greedy_text_with_stats(smol_llm):
    proc = lmgen("generate", "The capital of France is", "--max-tokens", "12", "--temperature", "0", "--stats",
                 "--quantization", "none")
    expected = smol_llm.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0].outputs[0].text
    assert proc.stdout == expected  # only the generated text: no prompt echo, no trailer (not a terminal: no newline)
    assert "Paris" in expected
    assert "[stats] prompt tokens: 5" in proc.stderr
    for field in ("prefill:", "decode:", "tok/s", "RSS", "peak"):
        assert field in proc.stderr
    weights = int(re.search(r"weights (\d+) MiB", proc.stderr).group(1))
    assert weights == round(smol_llm.model.weight_bytes() / 2**20) and weights > 500  # float32: 4 bytes a parameter


def test_tokenize_prints_ids_and_pieces(smol_llm):
    text = "大语言模型 generates tokens"
    proc = lmgen("tokenize", text)
    ids = smol_llm.tokenizer.encode(text)
    assert f"{len(ids)} tokens" in proc.stdout
    assert f"ids: {ids}" in proc.stdout
    assert "Ġgenerates" in proc.stdout  # the raw byte-level piece


def test_help_lists_presets_and_sampling_flags():
    proc = lmgen("generate", "--help")
    for flag in ("--temperature", "--top-k", "--top-p", "--min-p", "--beam-width", "--logprobs", "--seed", "--n",
                 "--repetition-penalty", "--presence-penalty", "--frequency-penalty", "--stop", "precise", "creative"):
        assert flag in proc.stdout


def test_chat_session_drops_old_turns_keeps_system_and_saves(tmp_path):
    saved = tmp_path / "chat.json"
    turns = [f"Tell me one word about the number {i}." for i in range(12)]
    script = "\n".join(turns + ["/history", f"/save {saved}"]) + "\n"
    proc = lmgen("chat", "--system", "You answer in five words.", "--context-length", "200", "--max-tokens", "12",
                 "--temperature", "0", stdin=script)
    assert "dropped" in proc.stdout  # the user is told, never a silent cut
    history = proc.stdout.split("system: You answer in five words.", 1)
    assert len(history) == 2  # /history shows the system prompt survived the drops
    assert "number 0." not in history[1]  # the oldest turns are gone
    assert "number 11." in history[1]
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == "You answer in five words."
    assert data["messages"][-1]["role"] == "assistant"
    assert data["messages"][-2]["content"] == turns[-1]

    proc2 = lmgen("chat", "--max-tokens", "4", stdin=f"/load {saved}\n/history\n")
    assert f"[loaded {len(data['messages'])} messages" in proc2.stdout
    for m in data["messages"]:
        assert f"{m['role']}: {m['content']}" in proc2.stdout


def test_chinese_chat_streams_whole_characters(smol_llm):
    proc = lmgen("chat", "--temperature", "0", "--max-tokens", "48", "--quantization", "none", stdin="请用中文介绍一下北京。\n")
    assert "\ufffd" not in proc.stdout
    deltas = list(smol_llm.stream_chat([{"role": "user", "content": "请用中文介绍一下北京。"}],
                                       SamplingParams(temperature=0, max_tokens=48)))
    assert all("\ufffd" not in d for d in deltas)
    assert any(ord(c) > 0x4E00 for c in "".join(deltas))  # it did answer with CJK characters
    assert proc.stdout.strip() == "".join(deltas).strip()  # the REPL printed exactly the streamed answer


def test_generate_echo_puts_the_prompt_before_the_text():
    proc = lmgen("generate", "The capital of France is", "--max-tokens", "6", "--temperature", "0", "--echo")
    assert proc.stdout.startswith("The capital of France is") and len(proc.stdout) > len("The capital of France is")
    assert proc.stderr == ""


def test_generate_non_streaming_modes():
    """Headers on stderr; stdout the texts; cumulative_logprob printed only where computed, and then right."""
    from lmgen import LLM

    llm = LLM()  # the CLI's default: the embedded GGUF, packed
    prompt = "Hello"
    beams = lmgen("generate", prompt, "--max-tokens", "4", "--beam-width", "2", "--n", "2")
    expected = llm.generate(prompt, SamplingParams(max_tokens=4, beam_width=2, n=2))[0].outputs
    headers = [line for line in beams.stderr.splitlines() if line.startswith("--- [")]
    assert [h.split(" cumulative_logprob=")[0] for h in headers] == [f"--- [{c.index}] finish={c.finish_reason}" for c in expected]
    assert [float(re.search(r"cumulative_logprob=(\S+)", h).group(1)) for h in headers] == \
        pytest.approx([c.cumulative_logprob for c in expected], abs=1.5e-3)
    assert beams.stdout == "".join(c.text + "\n" for c in expected)

    plain = lmgen("generate", prompt, "--max-tokens", "4", "--n", "2", "--seed", "3")
    assert plain.stderr.count("--- [") == 2 and "--- [" not in plain.stdout
    assert "cumulative_logprob" not in plain.stderr  # not requested, so not computed: never a made-up 0.000

    with_lp = lmgen("generate", prompt, "--max-tokens", "4", "--n", "2", "--seed", "3", "--logprobs", "2")
    expected = llm.generate(prompt, SamplingParams(max_tokens=4, n=2, seed=3, logprobs=2))[0].outputs
    assert with_lp.stdout == "".join(c.text + "\n" for c in expected)
    sums = [float(x) for x in re.findall(r"cumulative_logprob=(\S+)", with_lp.stderr)]
    assert sums == pytest.approx([sum(step[t] for step, t in zip(c.logprobs, c.token_ids)) for c in expected], abs=1.5e-3)
    assert "<-" in with_lp.stderr  # per-token candidates with probabilities


def test_generate_from_a_hugging_face_folder(tiny_model_dirs):
    from lmgen import LLM

    folder = str(tiny_model_dirs["qwen2"])
    proc = lmgen("generate", "--model", folder, "Once upon a time", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--stats", "--threads", "1")
    expected = LLM(folder).generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert proc.stdout == expected.outputs[0].text
    assert "(6 tokens)" in proc.stderr and "threads 1" in proc.stderr


def test_compile_flag_generates_what_eager_does(tiny_model_dirs):
    from lmgen import LLM

    folder = str(tiny_model_dirs["mistral"])
    proc = lmgen("generate", "--model", folder, "Once upon a time", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--compile")
    expected = LLM(folder).generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.outputs[0].text


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen.cli", *args], capture_output=True, text=True, timeout=300,
                          encoding="utf-8")


def test_version_and_bare_help():
    proc = lmgen("--version")
    assert proc.stdout == f"lmgen {importlib.metadata.version('lmgen')}\n"
    bare = lmgen()
    assert bare.stdout.startswith("usage: lmgen")
    for command in ("generate", "chat", "tokenize", "serve", "doctor"):
        assert command in bare.stdout


@pytest.mark.parametrize("argv, needles", [
    (["generate", "hi", "--stop-token-ids", "a,b"], ["--stop-token-ids", "'a,b'"]),
    (["generate", "hi", "--max-tokens", "many"], ["--max-tokens", "'many'"]),
    (["generate", "hi", "--logit-bias", "5"], ["--logit-bias", "'5'"]),
    (["generate"], ["prompt"]),
    (["generate", "hi", "--no-such-flag"], ["--no-such-flag"]),
    (["frobnicate"], ["'frobnicate'"]),
    (["chat", "--preset", "wild"], ["--preset", "'wild'"]),
])
def test_usage_errors_are_one_line_and_exit_1(argv, needles):
    proc = run(*argv)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmgen: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_serve_refuses_a_busy_port_before_loading_the_model(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # a model that does not exist: the port error coming first shows the port was checked before loading
        proc = run("serve", "--port", str(port), "--model", str(tmp_path / "absent.gguf"))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmgen: error: cannot listen on 127.0.0.1:{port}: "), proc.stderr
    assert "absent.gguf" not in proc.stderr
