"""Chat templates are untrusted code: every render ends within its time limit, with bounded output and
memory, whatever the template builds, with a ChatTemplateLimitError naming the limit; and a template that
came with a request (``allow_files=False``) never reaches the filesystem."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import pytest

from lmgen.errors import ChatTemplateLimitError
from lmgen.tokenizer.chat_template.template import ChatTemplate
from lmgen.errors import ChatTemplateError
from lmgen.tokenizer.chat_template.limits import RenderLimits

HI = [{"role": "user", "content": "Hi"}]
FAST = RenderLimits(time_s=0.5)

# (template, the limit it must hit)
HOSTILE = [
    ("{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}x", "time"),
    ("{% macro f(n) %}{% for i in range(100000) %}{% endfor %}{{ f(n) if n < 50 else '' }}{% endmacro %}{{ f(0) }}"
     "{{ f(0) }}{{ f(0) }}", "time"),
    ("{{ range(100000) | map('string') | map('center', 50) | join | length }}" * 200, "time"),
    ("{{ 'x'|center(100000000) }}", "size"),
    ("{{ 'x'.center(100000000) }}", "size"),
    ("{{ 'x'.ljust(100000000) }}", "size"),
    ("{{ 'x' * 100000000000 }}", "size"),
    ("{{ [1] * 100000000 }}", "size"),
    ("{{ 9 ** 100000000 }}", "size"),
    ("{{ (2 ** 10000) ** 10000 }}", "size"),
    ("{{ '%100000000s' % 'x' }}", "size"),
    ("{{ '%*s' % (100000000, 'x') }}", "size"),
    ("{{ '{:>100000000}'.format('x') }}", "size"),
    ("{{ '%100000000s'|format('x') }}", "size"),
    ("{% set s = 'x' * 5000000 %}{{ s|replace('x', 'yyyyy') }}", "size"),
    ("{% set s = 'x' * 5000000 %}{{ s.replace('x', 'yyyyy') }}", "size"),
    ("{% set s = '\t' * 1000000 %}{{ s.expandtabs(100) }}", "size"),
    ("{{ range(100000)|join('x' * 1000) }}", "size"),
    ("{% set s = 'a\n' * 1000000 %}{{ s|indent(100) }}", "size"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "size"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "output"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set b %}{{ ns.s }}{{ ns.s }}{% endset %}"
     "{% set ns.s = b %}{% endfor %}", "output"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "output"),
    ("{% set ns = namespace(l=[]) %}{% set big = 'x' * 9000000 %}{% for i in range(100000) %}"
     "{% set ns.l = ns.l + [big ~ i] %}{% endfor %}", "memory"),
]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("source, limit", HOSTILE)
def test_hostile_template_stops_at_its_limit(source, limit):
    limits = RenderLimits(time_s=60) if limit == "memory" else FAST
    t0, rss0 = time.monotonic(), _peak_rss()
    with pytest.raises(ChatTemplateLimitError) as e:
        ChatTemplate(source, limits=limits).render(HI)
    assert e.value.limit == limit, str(e.value)
    assert e.value.maximum is not None and "chat template stopped" in str(e.value)
    assert isinstance(e.value, ChatTemplateError) and isinstance(e.value, ValueError)
    assert time.monotonic() - t0 < 40  # a generous "it did not hang" bound
    assert _peak_rss() - rss0 < FAST.max_memory_bytes + (400 << 20)


def test_time_limit_is_per_render_and_configurable():
    loop = "{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match=r"longer than 0\.2 s") as e:
        ChatTemplate(loop, limits=RenderLimits(time_s=0.2)).render(HI)
    assert e.value.limit == "time" and e.value.maximum == 0.2
    assert time.monotonic() - t0 < 10
    # the same template object renders normal input afterwards; so does a small loop
    ok = ChatTemplate("{% for i in range(1000) %}{% endfor %}{{ messages[0].content }}", limits=FAST)
    assert ok.render(HI) == "Hi"


def test_limits_hold_in_a_worker_thread_and_leave_other_threads_alone():
    loop = "{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}"
    errors: list[BaseException] = []

    def run():
        try:  # a 4 s deadline: CI once saw this thread's 2 s deadline pass while the test's thread beat only twice
            ChatTemplate(loop, limits=RenderLimits(time_s=4.0)).render(HI)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    th = threading.Thread(target=run)
    t0 = time.monotonic()
    th.start()
    beats = 0
    while th.is_alive():  # this thread keeps running while the other one renders
        beats += 1
        time.sleep(0.01)
    took = time.monotonic() - t0
    assert len(errors) == 1 and isinstance(errors[0], ChatTemplateLimitError), errors
    assert errors[0].limit == "time", str(errors[0])
    assert beats > 5, f"{beats} beats of 10 ms in the {took:.2f} s the render ran"


def test_output_limit_is_configurable_and_exact():
    t = ChatTemplate("{{ 'x' * 1000 }}", limits=RenderLimits(max_chars=1000))
    assert t.render(HI) == "x" * 1000
    with pytest.raises(ChatTemplateLimitError) as e:
        ChatTemplate("{{ 'x' * 1000 }}y", limits=RenderLimits(max_chars=1000)).render(HI)
    assert e.value.limit == "output" and e.value.maximum == 1000


def test_real_templates_and_chinese_are_unaffected():
    msgs = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "请用中文介绍一下北京。" * 2000}]
    for name in ChatTemplate.BUILTINS:
        if name == "mistral":
            continue  # no system turn before the first user turn
        text = ChatTemplate.resolve(name).render(msgs)
        assert "请用中文介绍一下北京。" * 2000 in text


@pytest.mark.parametrize("bad", [0, -1, "5", None, True])
def test_render_limits_validated(bad):
    with pytest.raises(ValueError, match="time_s"):
        RenderLimits(time_s=bad)


def test_request_templates_never_touch_the_filesystem(tmp_path, monkeypatch):
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ 'SECRET' }}")
    assert ChatTemplate.resolve(str(secret)).render(HI) == "SECRET"  # the operator may name a file
    touched = []

    def spy(*a, **k):
        touched.append(a)
        raise AssertionError("filesystem touched")

    for name in ("is_file", "exists", "read_text", "open", "stat"):
        monkeypatch.setattr(Path, name, spy)
    for spec in (str(secret), "/etc/passwd", "~/.ssh/id_rsa", "../../etc/shadow", "secret.jinja"):
        with pytest.raises(ChatTemplateError, match="not accepted here"):
            ChatTemplate.resolve(spec, allow_files=False)
    assert touched == []
    assert ChatTemplate.resolve("chatml", allow_files=False).render(HI).startswith("<|im_start|>user")
    assert ChatTemplate.resolve("{{ messages[0].content }}!", allow_files=False).render(HI) == "Hi!"


@pytest.mark.parametrize("source", [
    "{% set big = 'x' * 9000000 %}{{ ([big] * 100)|map('string')|join }}",  # a generator joined
    "{% set big = 'x' * 9000000 %}{{ ''.join(([big] * 100)|map('string')) }}",
    "{% set big = 'x' * 5000000 %}{{ big|join('ab') }}",  # a string joined with a separator
    "{{ [1]|batch(1000000000, 0)|list }}",  # a count argument
    "{{ range(10000)|list|tojson(indent=5000) }}",
    "{{ 'ab'.expandtabs(100000000) }}",
])
def test_growing_calls_are_refused_before_they_run(source):
    rss0 = _peak_rss()
    with pytest.raises(ChatTemplateLimitError) as e:
        ChatTemplate(source, limits=FAST).render(HI)
    assert e.value.limit == "size", str(e.value)
    assert _peak_rss() - rss0 < 400 << 20


def test_ordinary_filters_and_methods_still_work():
    src = ("{{ messages|map(attribute='content')|join(', ') }}|{{ 'a,b'.split(',')|join('-') }}|{{ 3.14159|round(2) }}|"
           "{{ 'x'.center(5) }}|{{ messages|tojson(indent=2)|length > 10 }}|{{ [3, 1, 2]|sort|first }}|"
           "{{ 'Hi {}'.format('you') }}|{{ '%05d' % 42 }}|{{ range(3)|sum }}|{{ 'a\tb'.expandtabs(4) }}")
    out = ChatTemplate(src).render([{"role": "user", "content": "你好"}, {"role": "assistant", "content": "ok"}])
    assert out == "你好, ok|a-b|3.14|  x  |True|1|Hi you|00042|3|a   b"


@pytest.mark.parametrize("source", [
    "{% set big = 'x' * 9000000 %}{{ [big] * 1000 }}",  # printing a container prints every item
    "{% set big = 'x' * 9000000 %}{{ ([big] * 1000) ~ '' }}",
    "{% set big = 'x' * 9000000 %}{{ ([big] * 1000)|string|length }}",
    "{% set big = 'x' * 9000000 %}{{ ([big] * 1000)|tojson|length }}",
    "{% set big = 'x' * 9000000 %}{{ ([big] * 1000)|pprint|length }}",
    "{% set big = 'x' * 9000000 %}{{ [[big] * 1000]|join|length }}",
    "{% set big = 'x' * 9000000 %}{{ '%s' % ([big] * 1000,) }}",
])
def test_containers_turned_into_text_are_sized_first(source):
    rss0 = _peak_rss()
    with pytest.raises(ChatTemplateLimitError):
        ChatTemplate(source, limits=FAST).render(HI)
    assert _peak_rss() - rss0 < 400 << 20
