"""The real Gemma 3 270M GGUF (base model, Q4_K_M: F32, Q5_0, Q4_K, Q8_0, Q6_K tensors) against transformers
reading the same file (`gguf_file=`): tokenization, the built-in chat template it gets (the file has none)."""

from __future__ import annotations

import pytest

LINES = [
    "The capital of France is Paris, and it has 2,148,271 inhabitants.",
    "  Leading spaces,\ttabs and\n\nnewlines  ",
    "大语言模型是一种人工智能模型。你好，世界！",
    "def square(x: int) -> int:\n    return x ** 2  # 平方\n",
    "Emoji: 😀🎉👍🏽 ❤️ 🇫🇷 and ünïcödé café",
    "<start_of_turn>user\nspecial tokens in text<end_of_turn>\n",
]


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_gguf_path):
    from lmgen.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_gguf(str(gemma_gguf_path))


@pytest.fixture(scope="module")
def hf_gemma_tokenizer(gemma_gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_gguf_path.parent), gguf_file=gemma_gguf_path.name)


@pytest.mark.parametrize("line", LINES, ids=["english", "spaces", "chinese", "code", "emoji", "specials"])
def test_tokenization_matches_transformers(gemma_tokenizer, hf_gemma_tokenizer, line):
    ids = gemma_tokenizer.encode(line, add_special_tokens=True)
    assert ids == hf_gemma_tokenizer.encode(line)
    assert ids[0] == 2  # <bos>
    assert gemma_tokenizer.decode(ids, skip_special_tokens=True) == hf_gemma_tokenizer.decode(ids, skip_special_tokens=True)
    assert gemma_tokenizer.decode(ids, skip_special_tokens=False) == hf_gemma_tokenizer.decode(ids)


def test_builtin_gemma_chat_template(gemma_tokenizer, hf_gemma_tokenizer):
    """The file carries no chat template: lmgen uses its built-in Gemma one (Gemma 3's official template), renders
    it as transformers does, and <end_of_turn> ends generation."""
    from lmgen.tokenizer.chat_template.builtins import BUILTIN_TEMPLATES

    assert hf_gemma_tokenizer.chat_template is None
    assert gemma_tokenizer.chat_template == BUILTIN_TEMPLATES["gemma"]
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2? 用中文"},
                {"role": "assistant", "content": "四"}, {"role": "user", "content": "And 3+3?"}]
    text = gemma_tokenizer.apply_chat_template(messages)
    assert text == hf_gemma_tokenizer.apply_chat_template(messages, chat_template=BUILTIN_TEMPLATES["gemma"],
                                                          tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?")
    assert text.endswith("<start_of_turn>model\n")
    ids = gemma_tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids.count(2) == 1 and ids[0] == 2  # one <bos>: the template writes it, encode adds none
    assert gemma_tokenizer.token_to_id("<end_of_turn>") in gemma_tokenizer.eos_token_ids
