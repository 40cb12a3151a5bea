"""enable_thinking (Qwen3-style templates): a chat template kwarg reachable from LLM.chat, LLM(chat_template_kwargs=),
the CLI's --no-thinking and a server request's chat_template_kwargs; refused where the template has no such switch.
The template is Qwen3's switch on the embedded model's ChatML, rendered by transformers too as the oracle."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lmgen import LLM

# ChatML + Qwen3's generation-prompt switch (Qwen/Qwen3-0.6B tokenizer_config.json's last lines)
THINKING_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
MESSAGES = [{"role": "user", "content": "Say hi. 你好"}]


@pytest.fixture(scope="module")
def thinking_llm():
    return LLM(chat_template=THINKING_TEMPLATE, kv_cache_tokens=2048)


def test_enable_thinking_per_call_and_as_default(thinking_llm, hf_smol_tokenizer):
    for value in (True, False):
        expected = hf_smol_tokenizer.apply_chat_template(MESSAGES, chat_template=THINKING_TEMPLATE, tokenize=False,
                                                         add_generation_prompt=True, enable_thinking=value)
        ids = thinking_llm.render_chat(MESSAGES, enable_thinking=value)
        assert thinking_llm.tokenizer.decode(ids, skip_special_tokens=False) == expected
    off = thinking_llm.render_chat(MESSAGES, enable_thinking=False)
    assert "<think>\n\n</think>" in thinking_llm.tokenizer.decode(off, skip_special_tokens=False)
    assert off != thinking_llm.render_chat(MESSAGES)
    # LLM.chat takes it per call: the prompt it ran is the thinking-off one
    from lmgen import SamplingParams

    out = thinking_llm.chat(MESSAGES, SamplingParams(max_tokens=1, temperature=0), enable_thinking=False)[0]
    assert list(out.prompt_token_ids) == off


def test_default_kwargs_and_refusal():
    llm = LLM(chat_template=THINKING_TEMPLATE, chat_template_kwargs={"enable_thinking": False}, kv_cache_tokens=2048)
    assert llm.render_chat(MESSAGES) == llm.render_chat(MESSAGES, enable_thinking=False)
    assert llm.render_chat(MESSAGES, enable_thinking=True) != llm.render_chat(MESSAGES)  # a call overrides it
    with pytest.raises(ValueError, match="enable_thinking: this model's chat template has no thinking switch"):
        LLM(chat_template_kwargs={"enable_thinking": False}, kv_cache_tokens=2048)  # SmolLM2's template has none


def test_cli_no_thinking(tmp_path, hf_smol_tokenizer):
    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    base = [sys.executable, "-m", "lmgen.cli", "generate", "--chat", "hi", "--max-tokens", "1", "--temperature", "0",
            "--echo"]
    ok = subprocess.run(base + ["--chat-template", str(template), "--no-thinking"], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    prompt_ids = json.loads(re.match(r"\[[\d, ]+\]", ok.stdout).group(0))  # --echo prints the rendered prompt's ids
    assert "<think>\n\n</think>" in hf_smol_tokenizer.decode(prompt_ids)
    bad = subprocess.run(base + ["--no-thinking"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("lmgen: error:")
    assert "no thinking switch" in bad.stderr
