"""Structured output on the embedded SmolLM2 (default path): JSON Schema, JSON object, regex, choice and grammars are
enforced token by token; the oracles are `jsonschema`, `json` and Python's `re`. Also: the reported logprobs stay the
raw model's, a constrained request gives the same tokens and logprobs alone and in a batch, and a bad constraint is
an InvalidRequestError naming the field.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import jsonschema
import pytest

from lmgen import LLM, SamplingParams
from lmgen.cli import build_parser
from lmgen.cli_args import sampling_params_from_args
from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import StructuredOutput

WORDS = ["name", "city", "color", "size", "kind", "tag", "id", "count", "score", "level", "名字"]
PATTERNS = ["^[a-z]{2,5}$", "^[0-9]{3}-[0-9]{2}$", "^(ab|cd){1,3}$", "^[A-Z][a-z]{1,6}$"]


def random_schemas(count: int, seed: int = 0) -> list[dict]:
    """`count` object schemas of varied shape: nesting, arrays with min/max items, enums, patterns, bounded
    integers and numbers, optional fields; every string and array is bounded so that a 135M model finishes."""
    rnd = random.Random(seed)

    def leaf(depth: int) -> dict:
        kind = rnd.randrange(8 if depth < 2 else 6)
        if kind == 0:
            return {"type": "string", "maxLength": rnd.randint(3, 12)}
        if kind == 1:
            return {"type": "integer", "minimum": rnd.randint(-50, 0), "maximum": rnd.randint(1, 500)}
        if kind == 2:
            return {"enum": rnd.sample(["red", "green", "blue", "红色", 1, 2, None, True], 3)}
        if kind == 3:
            return {"type": "string", "pattern": rnd.choice(PATTERNS)}
        if kind == 4:
            return {"type": "boolean"}
        if kind == 5:
            return {"type": "number", "minimum": -1, "maximum": rnd.choice([1, 10, 100]), "multipleOf": 0.25}
        if kind == 6:
            return {"type": "array", "items": leaf(depth + 1), "minItems": rnd.randint(1, 2), "maxItems": 3}
        return obj(depth + 1)

    def obj(depth: int) -> dict:
        keys = rnd.sample(WORDS, rnd.randint(1, 3))
        return {"type": "object", "properties": {k: leaf(depth) for k in keys},
                "required": [k for k in keys if rnd.random() < 0.7], "additionalProperties": False}

    return [obj(0) for _ in range(count)]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM()


def constrained(max_tokens: int = 100, temperature: float = 0.7, seed: int = 0, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, structured=StructuredOutput(**kind))


def test_100_json_schemas_all_parse_and_validate(llm):
    schemas = random_schemas(100)
    prompt = llm.render_chat([{"role": "user", "content": "Reply with a short JSON object."}])
    outs = llm.generate([prompt] * len(schemas), [constrained(seed=i, json_schema=s) for i, s in enumerate(schemas)])
    for schema, out in zip(schemas, outs):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (c.text, schema)
        jsonschema.validate(json.loads(c.text), schema)


def test_json_schema_given_as_text_and_json_object(llm):
    schema = {"type": "object", "properties": {"城市": {"type": "string", "maxLength": 8}}, "required": ["城市"]}
    prompt = llm.render_chat([{"role": "user", "content": "中国的首都是哪个城市？用 JSON 回答。"}])
    out = llm.generate(prompt, constrained(json_schema=json.dumps(schema, ensure_ascii=False), temperature=0))[0].outputs[0]
    jsonschema.validate(json.loads(out.text), schema)
    outs = llm.generate([prompt] * 4, [constrained(json_object=True, seed=i, max_tokens=60) for i in range(4)])
    for o in outs:  # any JSON object; the model may not close it within max_tokens, but what it wrote is a prefix
        c = o.outputs[0]
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)


def assert_samples_match(llm, prompt: str, n: int, pattern: str, **constraint):
    """n sampled completions (temperature 1, seeds 0..n-1) under `constraint` all stop and fully match `pattern`."""
    outs = llm.generate([prompt] * n, [constrained(temperature=1.0, seed=i, **constraint) for i in range(n)])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text


@pytest.mark.parametrize("regex", [r"\d{3}-\d{4}", r"(yes|no)!", r"[A-Z][a-z]{2,8} [0-9]{1,2}", r"[甲乙丙]{2}"])
def test_regex_outputs_always_match(llm, regex):
    assert_samples_match(llm, "My answer:", 6, regex, regex=regex, max_tokens=30)


def test_choice_outputs_always_match(llm):
    choices = ["positive", "negative", "neutral", "不知道"]
    outs = llm.generate(["Sentiment of 'I love it':"] * 8,
                        [constrained(choice=choices, temperature=1.5, seed=i) for i in range(8)])
    assert all(o.outputs[0].text in choices and o.outputs[0].finish_reason == "stop" for o in outs)
    greedy = llm.generate("Is the sky blue? Answer:", constrained(choice=["yes", "no"], temperature=0))[0].outputs[0]
    assert greedy.text in ("yes", "no")


@pytest.mark.parametrize("grammar,pattern", [
    ('start: "(" NUM ("+" NUM)? ("+" NUM)? ")"\nNUM: /[0-9]{1,3}/', r"\(\d{1,3}(\+\d{1,3}){0,2}\)"),
    ('root ::= "color=" ("red" | "green" | "blue") ";"', r"color=(red|green|blue);"),
])
def test_lark_and_gbnf_grammars(llm, grammar, pattern):
    assert_samples_match(llm, "Output:", 4, pattern, grammar=grammar, max_tokens=40)


def test_n_siblings_each_follow_the_grammar(llm):
    out = llm.generate("Pick:", SamplingParams(n=4, max_tokens=10, temperature=1.0, seed=3,
                                               structured=StructuredOutput(regex=r"[0-9]{2}")))[0]
    assert len(out.outputs) == 4 and all(re.fullmatch(r"[0-9]{2}", c.text) for c in out.outputs)


def test_logprobs_are_the_raw_models(llm):
    """The mask changes which token is drawn, not the reported distribution: each chosen token's logprob equals the
    logprob the unconstrained model gives it (a prompt_logprobs pass over prompt + output as the oracle)."""
    prompt = llm.tokenizer.encode("The capital of France is", add_special_tokens=True)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, structured=StructuredOutput(regex=r"[0-9]{4}"))
    c = llm.generate([prompt], params)[0].outputs[0]
    check = llm.generate([prompt + list(c.token_ids)], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    raw = check.prompt_logprobs[len(prompt):]
    for token, entry, oracle in zip(c.token_ids, c.logprobs, raw):
        assert entry[token] == pytest.approx(oracle[token], abs=1e-4)
    # unconstrained, greedy would not write digits here: the top raw candidate of the first step is not the digit
    assert max(c.logprobs[0], key=c.logprobs[0].get) != c.token_ids[0]


def test_constrained_request_is_batch_invariant(llm):
    schema = random_schemas(1, seed=7)[0]
    prompt = llm.render_chat([{"role": "user", "content": "JSON please."}])
    target = [SamplingParams(max_tokens=60, temperature=0.8, seed=11, logprobs=2, structured=StructuredOutput(json_schema=schema)),
              SamplingParams(max_tokens=12, temperature=0, logprobs=1, structured=StructuredOutput(regex=r"[a-z ]{5,30}"))]
    alone = [llm.generate([prompt], p)[0].outputs[0] for p in target]
    fill = [llm.tokenizer.encode(t, add_special_tokens=False) for t in ("Once upon a time", "大语言模型", "x " * 40)]
    params = [SamplingParams(max_tokens=9, temperature=1.0, seed=i) for i in range(3)]
    outs = llm.generate([fill[0], prompt, fill[1], prompt, fill[2]], [params[0], target[0], params[1], target[1], params[2]])
    for a, b in zip(alone, (outs[1].outputs[0], outs[3].outputs[0])):
        assert (a.token_ids, a.logprobs) == (b.token_ids, b.logprobs)


@pytest.mark.parametrize("kind,value", [
    ("json_schema", "{not json"),
    ("json_schema", {"type": "object", "not": {"type": "integer"}}),
    ("json_schema", {"type": "string", "format": "uri-reference"}),
    ("json_schema", [1, 2]),
    ("regex", "[a-"),
    ("regex", ""),
    ("choice", []),
    ("choice", ["a", 3]),
    ("grammar", "start: undefined_rule"),
    ("grammar", "root ::= ("),
])
def test_bad_constraints_are_refused_naming_the_field(kind, value):
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutput(**{kind: value})
    assert e.value.param == kind and kind in str(e.value)
    if isinstance(value, dict):  # an unsupported feature is named
        feature = "not" if "not" in value else value.get("format")
        assert feature in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutput(**{kind: value, "param": "response_format.json_schema"})
    assert e.value.param == "response_format.json_schema"


def test_structured_options_that_cannot_be_honoured_are_refused():
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutput(regex="a", choice=["a"])
    with pytest.raises(InvalidRequestError, match="beam search"):
        SamplingParams(beam_width=2, temperature=0, structured=StructuredOutput(regex="a"))
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured={"regex": "a"})
    assert e.value.param == "structured"


TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Time in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}]


def test_llm_chat_with_tools_returns_parsed_calls(llm):
    ask = [{"role": "user", "content": "What time is it in Tokyo?"}]
    out = llm.chat(ask, SamplingParams(max_tokens=60, temperature=0), tools=TOOLS, tool_choice="required",
                   parallel_tool_calls=False)[0].outputs[0]
    assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1
    for call in out.tool_calls:
        assert call.name == "get_time"
        jsonschema.validate(json.loads(call.arguments), TOOLS[0]["function"]["parameters"])
    plain = llm.chat(ask, SamplingParams(max_tokens=5, temperature=0), tools=TOOLS, tool_choice="none")[0].outputs[0]
    assert plain.tool_calls is None and plain.finish_reason in ("stop", "length")
    with pytest.raises(InvalidRequestError) as e:
        llm.chat(ask, SamplingParams(max_tokens=5), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
    assert e.value.param == "tool_choice"


def lmgen_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_structured_flags(tmp_path, llm):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["n"],
              "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "x=" /[0-9]{2}/')
    run = lmgen_cli("generate", "Answer:", "--json-schema", str(tmp_path / "s.json"), "-t", "1", "--seed", "4",
                    "--max-tokens", "20")
    assert run.returncode == 0, run.stderr[-300:]
    jsonschema.validate(json.loads(run.stdout), schema)
    # the other flags, parsed by the CLI's own parser and run here on the loaded model
    flags = {"--regex": ("[a-c]{3}", r"[a-c]{3}"), "--choice": ("红,green", "红|green"),
             "--grammar": (str(tmp_path / "g.lark"), r"x=[0-9]{2}"), "--json": (None, None)}
    for flag, (value, pattern) in flags.items():
        args = build_parser().parse_args(["generate", "Answer:", flag] + ([value] if value else []) + ["-t", "1"])
        params = sampling_params_from_args(args).replace(max_tokens=30, seed=1)
        text = llm.generate("Answer:", params)[0].outputs[0].text
        assert re.fullmatch(pattern, text) if pattern else text.startswith("{"), (flag, text)
    bad = lmgen_cli("generate", "x", "--regex", "(")
    assert bad.returncode == 1 and bad.stderr.count("lmgen: error:") == 1 and "--regex" in bad.stderr


def test_constrained_requests_arriving_mid_batch_with_chunked_prefill(llm):
    """As tests/test_batch_invariance.py's mixed case: constrained requests arriving while others decode, prompts
    prefilled in 16-token chunks, give the tokens and logprobs they give alone."""
    from lmgen.engine.engine import Engine
    from test_batch_invariance import drive

    def engine(budget: int) -> Engine:
        return Engine(llm.model, eos_token_ids=llm.eos_token_ids, context_length=llm.context_length, num_blocks=256,
                      block_size=16, max_num_seqs=16, max_num_batched_tokens=budget, enable_prefix_caching=False,
                      grammar_backend=llm.engine.grammar_backend)

    prompt = llm.render_chat([{"role": "user", "content": "Give a color and a number as JSON."}])
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "blue"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 99}}, "required": ["color", "n"], "additionalProperties": False}
    reqs = {"json": (prompt, SamplingParams(max_tokens=30, temperature=0.9, seed=5, logprobs=1,
                                            structured=StructuredOutput(json_schema=schema))),
            "re": (prompt[:20], SamplingParams(max_tokens=12, temperature=0, logprobs=1,
                                               structured=StructuredOutput(regex=r"[0-9a-f]{8}"))),
            "free": (prompt[5:40], SamplingParams(max_tokens=10, temperature=1.0, seed=2, logprobs=1))}
    alone = {}
    for name, (p, sp) in reqs.items():
        alone.update(drive(engine(2048), {0: [(name, p, sp)]}))
    mixed = drive(engine(16), {0: [("free", *reqs["free"])], 2: [("json", *reqs["json"])], 4: [("re", *reqs["re"])]})
    assert mixed == alone
    jsonschema.validate(json.loads(llm.tokenizer.decode(alone["json"][0], skip_special_tokens=True)), schema)


def test_unpacked_mask_equals_llguidance_byte_mask(llm):
    """The engine's (vocab,) bool mask (packed bitmask, unpacked byte-wise) equals llguidance's own one-byte-per-token
    mask, at the start and after each accepted token."""
    import torch

    backend = llm.engine.grammar_backend
    m = backend.matcher(StructuredOutput(json_schema={"type": "object", "properties": {"名": {"enum": ["x", "yz"]}}}))
    for token in llm.tokenizer.encode('{"名": "yz"}', add_special_tokens=False) + [None]:
        mine = backend.masks([m])[0]
        ref = torch.frombuffer(bytearray(m.matcher.compute_logit_bias()), dtype=torch.uint8)[: mine.shape[0]] == 200
        assert mine.any() and torch.equal(mine, ref)
        if token is not None:
            assert m.advance(token) in (None, "end")
