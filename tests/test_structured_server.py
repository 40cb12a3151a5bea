"""Structured output and tool calling through `lmgen serve` and the official openai client: response_format,
vLLM's guided_* / structured_outputs, tools with every tool_choice (streamed deltas joined equal the whole answer,
a round trip with a role "tool" message), and a 400 naming the field for every bad constraint.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from server_process import KEY, MODEL, ServerProcess

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("structured"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, **kw):
    kw.setdefault("max_tokens", 80)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=kw.pop("messages", ASK), **kw)


def test_response_format_json_schema_and_json_object(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    r = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = chat(client, response_format={"type": "json_object"}, max_tokens=40)
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason != "stop" or isinstance(json.loads(text), dict))


def test_vllm_guided_fields_on_both_endpoints(client):
    r = chat(client, extra_body={"guided_regex": r"[0-9]{2}\.[0-9]"}, temperature=1.0, seed=5)
    assert re.fullmatch(r"[0-9]{2}\.[0-9]", r.choices[0].message.content)
    r = chat(client, extra_body={"guided_choice": ["晴天", "rain"]})
    assert r.choices[0].message.content in ("晴天", "rain")
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=10, n=3, temperature=1.0, seed=2,
                                  extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
    assert all(c.text in ("alpha", "beta") for c in r.choices)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 3}
    r = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=30, temperature=0,
                                  extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = client.completions.create(model=MODEL, prompt="Numbers:", max_tokens=30, temperature=0, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "uri-reference"}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "grammar"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": "{oops"}, "guided_json"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " *", "guided_json": {}}, "guided_whitespace_pattern"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [WEATHER["function"]], "function_call": "auto"}, "functions"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert httpx.get(server.base + "/health", timeout=10).status_code == 200


def check_calls(calls, names=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert names is None or c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_tool_choice_always_give_valid_calls(client, choice):
    names = None if choice == "required" else ["add"]
    for seed in range(2):
        r = chat(client, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=120)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, names)
        if names:
            assert len(c.message.tool_calls) == 1


def test_streamed_tool_call_deltas_join_to_the_whole_answer(client):
    whole = chat(client, tools=TOOLS, tool_choice="required", max_tokens=120, seed=1).choices[0]
    joined: dict[int, dict] = {}
    finish = None
    stream = chat(client, tools=TOOLS, tool_choice="required", max_tokens=120, seed=1, stream=True)
    for chunk in stream:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or ():
                entry = joined.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                if d.id:
                    assert entry["id"] is None and d.type == "function" and d.function.name  # id + name first
                    entry["id"], entry["name"] = d.id, d.function.name
                entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    assert [(e["name"], e["arguments"]) for _, e in sorted(joined.items())] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


def test_tool_round_trip_and_auto_and_none(client):
    first = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=12).choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    for seed in range(2):
        auto = chat(client, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=seed, max_tokens=60).choices[0]
        if auto.message.tool_calls:
            assert auto.finish_reason == "tool_calls"
            check_calls(auto.message.tool_calls)
        else:
            assert auto.message.content and not auto.message.content.startswith("<")
