"""SamplingParams validation, normalisation, presets."""

from __future__ import annotations

import re

import pytest

from lmgen.sampling.params import MAX_LOGPROBS, PRESETS, SamplingParams

# field -> invalid values (each must raise ValueError naming field and value)
INVALID = {
    "n": [0, -3, 1.0, "2", None, True],
    "max_tokens": [0, -1, 2.5, "16", True],
    "temperature": [-0.1, -5, float("nan"), float("inf"), "hot", None, True, [1.0]],
    "top_k": [-2, -100, 3.0, "5", None, False],
    "top_p": [0.0, -0.5, 1.5, 1.0000001, float("nan"), "0.9", None],
    "min_p": [-0.01, 1.01, 7, float("nan"), "0.1", None],
    "repetition_penalty": [0.0, -1.0, float("inf"), "1.2", None],
    "presence_penalty": [-2.01, 2.5, 100, float("nan"), "0.5", None],
    "frequency_penalty": [-3, 2.0001, float("-inf"), "x", None],
    "logit_bias": [[1, 2], "1:5", {-1: 1.0}, {"a": 1.0}, {1.5: 1.0}, {3: "big"}, {3: 101.0}, {3: -100.5}, {3: float("nan")}],
    "min_tokens": [-1, 1.5, "2", None, 17],  # 17 > max_tokens (16)
    "seed": [1.5, "42", True, 2**64, -(2**63) - 1],
    "logprobs": [-1, MAX_LOGPROBS + 1, 2.0, "5", True],
    "prompt_logprobs": [-1, MAX_LOGPROBS + 1, 0.5, "1"],
    "stop": [5, [""], ["ok", 3], {"a": 1}, ""],
    "stop_token_ids": [5, "2", [1, -2], [1, 2.0], [None]],
    "ignore_eos": [1, "yes", None],
    "skip_special_tokens": [0, "true", None],
    "include_stop_str_in_output": [1, None],
    "beam_width": [0, -1, 2.0, "4", None],
    "length_penalty": [float("nan"), float("inf"), "1", None],
    "early_stopping": ["always", 1, None, "Never"],
    "structured": ["json", {"regex": "a"}, 3],
}


def test_every_field_has_invalid_cases():
    import dataclasses

    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    assert fields == set(INVALID)


@pytest.mark.parametrize(
    "field,value", [(f, v) for f, values in INVALID.items() for v in values], ids=lambda x: repr(x)[:20]
)
def test_invalid_value_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert msg.startswith(field + " "), msg
    # the bad value (or, for a bad entry of a container, the entry) is shown
    shown = [repr(value)]
    if isinstance(value, dict):
        shown += [repr(k) for k in value] + [repr(v) for v in value.values()]
    if isinstance(value, list):
        shown += [repr(v) for v in value]
    assert any(s in msg for s in shown), msg


def test_message_example():
    with pytest.raises(ValueError, match=re.escape("top_p must be in (0, 1], got 1.5")):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match=re.escape("temperature must be a number, got 'hot'")):
        SamplingParams(temperature="hot")


def test_n_must_not_exceed_beam_width():
    with pytest.raises(ValueError, match=r"^n .*beam_width \(2\).*got 3"):
        SamplingParams(n=3, beam_width=2)
    assert SamplingParams(n=2, beam_width=2).n == 2
    assert SamplingParams(n=5, beam_width=1).n == 5  # sampling: n independent samples


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(n=4, max_tokens=None, temperature=0, top_k=-1, top_p=1, min_p=1),
        dict(top_k=0, top_p=1e-6, min_p=0.0, temperature=2),
        dict(repetition_penalty=0.01, presence_penalty=-2, frequency_penalty=2),
        dict(logit_bias={0: -100, 5: 100.0}, min_tokens=16, seed=0),
        dict(seed=-(2**63), logprobs=0, prompt_logprobs=MAX_LOGPROBS),
        dict(seed=2**64 - 1, logprobs=MAX_LOGPROBS, stop="###", stop_token_ids=[0, 7]),
        dict(beam_width=4, n=4, length_penalty=-0.5, early_stopping="never"),
        dict(beam_width=2, early_stopping=True, ignore_eos=True, skip_special_tokens=False),
        dict(max_tokens=None, min_tokens=1000),
    ],
)
def test_valid_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(stop="END", temperature=1, top_p=1, logit_bias={"42": 3, 7: -1.5})
    assert p.stop == ["END"]
    assert p.stop_token_ids == []
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.logit_bias == {42: 3.0, 7: -1.5}
    assert SamplingParams().stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams().logit_bias is None


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (1, 16, 1.0, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (0, None, None, None)
    assert (p.ignore_eos, p.skip_special_tokens, p.include_stop_str_in_output) == (False, True, False)
    assert (p.beam_width, p.length_penalty, p.early_stopping) == (1, 1.0, False)


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert not SamplingParams().greedy
    assert SamplingParams(beam_width=3).greedy


@pytest.mark.parametrize("option", [dict(temperature=0.8), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.1),
                                    dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(logit_bias={5: 1.0}),
                                    dict(min_tokens=2), dict(logprobs=2)])
def test_beam_search_refuses_options_it_would_ignore(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=rf"^{name} must be left at its default with beam search"):
        SamplingParams(beam_width=3, **option)
    assert SamplingParams(beam_width=3, temperature=0).beam_width == 3  # greedy's 0 and the default 1 are fine


def test_replace_validates_and_copies():
    p = SamplingParams(stop=["x"], temperature=0.5)
    q = p.replace(temperature=0.9)
    assert q.temperature == 0.9 and p.temperature == 0.5 and q.stop == ["x"]
    q.stop.append("y")
    assert p.stop == ["x"]
    with pytest.raises(ValueError, match="top_k"):
        p.replace(top_k=-7)


def test_presets():
    assert set(PRESETS) == {"precise", "balanced", "creative"}
    balanced = SamplingParams.from_preset("balanced")
    assert (balanced.temperature, balanced.top_p, balanced.top_k) == (0.7, 0.9, 40)
    creative = SamplingParams.from_preset("creative")
    assert (creative.temperature, creative.top_p, creative.min_p) == (1.0, 0.95, 0.05)
    precise = SamplingParams.from_preset("precise")
    assert precise.temperature == 0.2 and precise.top_p == 0.9
    # precise is the most conservative
    assert precise.temperature < balanced.temperature < creative.temperature
    for name, kw in PRESETS.items():
        p = SamplingParams.from_preset(name)
        for k, v in kw.items():
            assert getattr(p, k) == v
    # overrides
    assert SamplingParams.from_preset("balanced", max_tokens=99, top_k=5).top_k == 5
    # presets are not mutated by use
    SamplingParams.from_preset("creative").stop.append("z")
    assert "stop" not in PRESETS["creative"]


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError) as info:
        SamplingParams.from_preset("wild")
    msg = str(info.value)
    assert "'wild'" in msg
    for name in PRESETS:
        assert name in msg
