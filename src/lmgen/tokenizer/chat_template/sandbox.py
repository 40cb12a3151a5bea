"""The Jinja sandbox chat templates compile and run in, built as transformers' ``_compile_jinja_template``
builds it (same settings, filters and globals), plus guards that make escape attempts and memory
bombs fail loudly instead of rendering (the size checks; the time and memory watch is RenderWatch).
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmgen.tokenizer.chat_template.limits import (
    RenderLimits,
    check_binop,
    check_call,
    check_printable,
    check_result,
    checked_join,
)

__all__ = ["TemplateRaised", "compile_template"]


class TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by the template's own ``raise_exception(message)`` call."""


def _raise_exception(message: Any) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes and always sorts keys.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` for templates, without the class itself (and its attributes) being reachable."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace "
                f"(got {name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: marks assistant text; renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _CheckedConcat(CodeGenerator):
    """Compiles ``a ~ b`` to the environment's size-checked join instead of Jinja's plain ``str_join``."""

    @optimizeconst
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _guard_filter(name: str, func: Callable[..., Any], limit: int) -> Callable[..., Any]:
    """``func`` (a Jinja filter) checked before it runs (could its result be too big?) and after."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context / eval_ctx / env first

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja passes the same arguments
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if len(args) > skip:
            value, rest = check_call(name, args[skip], args[skip + 1:], kwargs, limit, is_filter=True)
            args = (*args[:skip], value, *rest)
        return check_result(func(*args, **kwargs), limit)

    return guarded


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that unsafe access fails at once and nothing grows past ``max_chars``.

    Jinja's sandbox answers ``''.__class__`` with an Undefined that renders as
    an empty string and only fails when used further; here the access itself
    raises, so an escape attempt is always reported. Every operator, filter,
    method call, ``~`` join, block capture and the output itself are checked
    against ``max_chars`` (see chat_template_limits).
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _CheckedConcat

    def __init__(self, max_chars: int, **options: Any):
        # `{{ value }}` prints str(value) inline; finalize sees the value first (a container's text can be huge)
        super().__init__(finalize=functools.partial(check_printable, limit=max_chars), **options)
        self.max_chars = max_chars
        # Generated code joins every output buffer (blocks, macros, the whole template) with this.
        self.concat = functools.partial(checked_join, limit=max_chars)

    def unsafe_undefined(self, obj: Any, attribute: Any) -> Any:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_binop(operator, left, right, self.max_chars)
        return check_result(super().call_binop(context, operator, left, right), self.max_chars)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        _, args = check_call(getattr(target, "__name__", ""), getattr(target, "__self__", None), args, kwargs,
                             __self.max_chars, is_filter=False)
        return check_result(super().call(__context, __obj, *args, **kwargs), __self.max_chars)


@functools.lru_cache(maxsize=4)
def _environment(max_chars: int) -> _StrictSandbox:
    env = _StrictSandbox(
        max_chars,
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f, max_chars) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@functools.lru_cache(maxsize=64)
def compile_template(source: str, max_chars: int = RenderLimits.max_chars) -> jinja2.Template:
    """``source`` compiled in the sandbox whose values may not pass ``max_chars`` characters or items.
    Compiling a large template takes milliseconds; callers often build a ChatTemplate per request."""
    return _environment(max_chars).from_string(source)
