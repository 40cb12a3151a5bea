"""The Jinja sandbox chat templates compile and run in, built as transformers' ``_compile_jinja_template``
builds it (same settings, filters and globals), plus guards that make escape attempts and memory
bombs fail loudly instead of rendering.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["TemplateRaised", "compile_template"]

# Guards against templates that try to exhaust memory ("x" * 10**12, 9 ** 10**9).
_MAX_REPEAT_LEN = 10_000_000
_MAX_POW_EXPONENT = 10_000


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


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, except that unsafe access fails at once.

    Jinja's sandbox answers ``''.__class__`` with an Undefined that renders as
    an empty string and only fails when used further; here the access itself
    raises, so an escape attempt is always reported.
    """

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: Any) -> Any:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * n > _MAX_REPEAT_LEN:
                    raise jinja2.exceptions.SecurityError(
                        f"repetition would build a sequence of {len(seq) * n} items "
                        f"(limit {_MAX_REPEAT_LEN})"
                    )
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, int) \
                    and abs(right) > _MAX_POW_EXPONENT and abs(left) > 1:
                raise jinja2.exceptions.SecurityError(
                    f"exponent {right} is too large (limit {_MAX_POW_EXPONENT})"
                )
        return super().call_binop(context, operator, left, right)


_ENV: _StrictSandbox | None = None


def _environment() -> _StrictSandbox:
    global _ENV
    if _ENV is None:
        env = _StrictSandbox(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        env.globals["dict"] = _TemplateDict()
        env.globals["namespace"] = _TemplateNamespace
        _ENV = env
    return _ENV


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    # Compiling a large template takes milliseconds; callers often build a ChatTemplate per request.
    return _environment().from_string(source)
