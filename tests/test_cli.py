"""The real `lmgen` process on the embedded model: generate, tokenize, and a scripted chat session."""

from __future__ import annotations

import json
import re
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
    assert proc.stdout == "The capital of France is" + expected + "\n"
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


@pytest.mark.parametrize("flags", [["--beam-width", "2", "--n", "2"], ["--n", "2", "--seed", "3", "--logprobs", "2"]])
def test_generate_non_streaming_modes(flags):
    proc = lmgen("generate", "Hello", "--max-tokens", "4", *flags)
    assert proc.stdout.count("--- [") == 2
    if "--logprobs" in flags:
        assert "<-" in proc.stdout  # per-token candidates with probabilities


def test_generate_from_a_hugging_face_folder(tiny_model_dirs):
    from lmgen import LLM

    folder = str(tiny_model_dirs["qwen2"])
    proc = lmgen("generate", "--model", folder, "Once upon a time", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--stats", "--threads", "1")
    expected = LLM(folder).generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert proc.stdout == "Once upon a time" + expected.outputs[0].text + "\n"
    assert "(6 tokens)" in proc.stderr and "threads 1" in proc.stderr


def test_compile_flag_generates_what_eager_does(tiny_model_dirs):
    from lmgen import LLM

    folder = str(tiny_model_dirs["mistral"])
    proc = lmgen("generate", "--model", folder, "Once upon a time", "--max-tokens", "6", "--temperature", "0",
                 "--ignore-eos", "--compile")
    expected = LLM(folder).generate("Once upon a time", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Once upon a time" + expected.outputs[0].text + "\n"
