"""The limits a chat template renders under (time, output size, size of any one value, memory) and the
watch that enforces them while it runs.

A template is untrusted code: Jinja compiles it to Python, and the sandbox stops it from reaching
Python internals but not from looping for hours (``range(100000)`` inside ``range(2000)``) or from
building huge strings (``'x'|center(10**8)``, doubling a string in a namespace). The defence has
two layers:

* Every step of the render runs under a per-thread ``sys.settrace`` hook (:class:`RenderWatch`): each
  Python call made while rendering and each line of the compiled template (so each loop iteration)
  checks the wall clock against the deadline, and every few milliseconds the process's anonymous
  resident memory against the budget, and raises :class:`ChatTemplateLimitError` inside the render.
  A trace hook interrupts any Python-level loop wherever it is (template code, Jinja's filters,
  macros, recursion) and runs in the rendering thread only, so the server's other threads are not
  slowed; it costs a few times the (sub-millisecond) render time of a real template.
* What a trace hook cannot interrupt is one C-level operation, so every operation that can make a
  value much larger than its inputs is checked *before* it runs (``*``, ``**``, ``+``, ``%``, ``~``,
  the filters and the string methods that pad, repeat, replace, join, indent or format) by
  :func:`check_call`, :func:`check_binop` and :func:`checked_join`: none may build a value over
  ``max_chars`` characters (or items), and the rendered text itself is counted as it is produced.
  One such operation is then bounded (tens of MB at the default), and the memory check bounds how
  many of them a render can keep alive.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from typing import Any

from lmgen.errors import ChatTemplateLimitError

__all__ = ["RenderLimits", "RenderWatch", "check_binop", "check_call", "check_printable", "check_result", "checked_join"]

_TEMPLATE_FILE = "<template>"  # the filename Jinja compiles templates under
_MEMORY_CHECK_EVERY_S = 0.002  # creating a max_chars string takes longer than this
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class RenderLimits:
    """What one render may use: ``time_s`` seconds of wall clock, ``max_chars`` characters of output (also
    the most characters or items any single value it builds may have), and ``max_memory_bytes`` of
    growth of the process's anonymous resident memory (checked on Linux)."""

    time_s: float = 5.0
    max_chars: int = 10_000_000
    max_memory_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        for name in ("time_s", "max_chars", "max_memory_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


def _too_big(what: str, size: int, limit: int, unit: str = "characters or items") -> ChatTemplateLimitError:
    return ChatTemplateLimitError(
        f"the chat template would build {what} of {size} {unit} (limit {limit})",
        limit="size", value=size, maximum=limit)


def _anon_resident_bytes() -> int | None:
    """Anonymous resident memory of this process (resident minus file-backed pages), or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        import resource

        return (int(fields[1]) - int(fields[2])) * resource.getpagesize()
    except (OSError, ValueError, IndexError, ImportError):
        return None


class RenderWatch:
    """``with RenderWatch(limits): template.render(...)``: raises ChatTemplateLimitError inside the render
    (in this thread) once it runs past ``limits.time_s`` or grows memory by more than
    ``limits.max_memory_bytes``. Any trace function already installed is restored afterwards."""

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        self._deadline = 0.0
        self._next_memory_check = 0.0
        self._memory_base: int | None = None
        self._tripped: ChatTemplateLimitError | None = None
        self._previous: Any = None

    def __enter__(self) -> RenderWatch:
        self._deadline = time.monotonic() + self.limits.time_s
        self._memory_base = _anon_resident_bytes()
        self._next_memory_check = time.monotonic() + _MEMORY_CHECK_EVERY_S
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._previous)

    def _on_call(self, frame: Any, event: str, arg: Any) -> Any:
        in_template = frame.f_code.co_filename == _TEMPLATE_FILE
        self._check(in_template)
        return self._on_line if in_template else None

    def _on_line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self._check(True)
        return self._on_line

    def _check(self, in_template: bool) -> None:
        if self._tripped is not None:
            # Raise again only in template code: Jinja's own error handling must be able to run.
            if in_template:
                raise self._copy(self._tripped)
            return
        now = time.monotonic()
        if now > self._deadline:
            self._trip(ChatTemplateLimitError(
                f"the chat template ran longer than {self.limits.time_s:g} s", limit="time",
                value=round(now - self._deadline + self.limits.time_s, 3), maximum=self.limits.time_s))
        if now >= self._next_memory_check and self._memory_base is not None:
            self._next_memory_check = now + _MEMORY_CHECK_EVERY_S
            used = (_anon_resident_bytes() or 0) - self._memory_base
            if used > self.limits.max_memory_bytes:
                self._trip(ChatTemplateLimitError(
                    f"the chat template grew memory by {used >> 20} MiB (limit "
                    f"{self.limits.max_memory_bytes >> 20} MiB)", limit="memory", value=used,
                    maximum=self.limits.max_memory_bytes))

    def _trip(self, error: ChatTemplateLimitError) -> None:
        self._tripped = error
        raise self._copy(error)

    @staticmethod
    def _copy(e: ChatTemplateLimitError) -> ChatTemplateLimitError:
        return ChatTemplateLimitError(str(e), limit=e.limit, value=e.value, maximum=e.maximum)


# ---- size checks before one operation runs --------------------------------------------------------------
def _size(x: Any) -> int:
    return len(x) if isinstance(x, Sized) else 0


def _text_size(x: Any, limit: int) -> int:
    """Roughly ``len(str(x))`` for the strings, numbers and containers a template handles (a container's
    text holds all its items' texts), counted without building it; stops counting once past ``limit``."""
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 24
    return total


# Filters that turn their whole value into text (a container: all of its items).
_TEXT_FILTERS = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "pprint",
                           "replace", "safe", "string", "striptags", "title", "trim", "truncate", "upper", "urlencode",
                           "urlize", "wordcount", "wordwrap", "xmlattr"})


def _widths(fmt: str, args: Iterable[Any]) -> int:
    """The largest number written in a format string or passed as an int argument (a width or precision)."""
    largest = max((int(n) for n in _NUMBER.findall(fmt) if len(n) < 30), default=0)
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            largest = max(largest, abs(a))
    return largest


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    out: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (tuple, list)):
            out.extend(a)
        elif isinstance(a, dict):
            out.extend(a.values())
        else:
            out.append(a)
    return out


def _estimate(name: str, recv: Any, args: tuple, kwargs: dict, is_filter: bool, limit: int) -> int:
    """An upper bound on the size of ``recv.name(*args)`` (or filter ``name(recv, *args)``) for the
    operations that can grow a value; 0 for the rest (their result is checked after the call)."""
    flat = _flat(args, kwargs)
    if is_filter and name in _TEXT_FILTERS and not isinstance(recv, str):
        return _text_size(recv, limit)  # what it grows the text by is checked after
    if name in ("center", "ljust", "rjust", "zfill", "truncate"):
        return max([_size(recv)] + [a for a in flat if isinstance(a, int) and not isinstance(a, bool)])
    if name in ("format", "format_map") and isinstance(recv, str):
        return len(recv) + _widths(recv, flat) + sum(_text_size(a, limit) for a in flat)
    if name == "expandtabs" and isinstance(recv, str):
        tab = next((a for a in flat if isinstance(a, int)), 8)
        return len(recv) + recv.count("\t") * max(tab, 0)
    if name == "replace" and isinstance(recv, str) and len(args) >= 2 and isinstance(args[0], str) \
            and isinstance(args[1], str):
        hits = recv.count(args[0]) if args[0] else len(recv) + 1
        return len(recv) + hits * max(len(args[1]) - len(args[0]), 0)
    if name == "join":
        seq, sep = (recv, args[0] if args else "") if is_filter else (args[0] if args else [], recv)
        n = len(seq) if isinstance(seq, Sized) else 0
        if isinstance(seq, str):
            return len(seq) * (1 + _size(sep))
        return _text_size(seq, limit) + n * _size(sep) if isinstance(seq, (list, tuple)) else n * _size(sep)
    if name == "translate" and isinstance(recv, str) and args and isinstance(args[0], dict):
        grow = max([_size(v) for v in args[0].values()] + [1])
        return len(recv) * grow
    if name in ("indent", "wordwrap") and isinstance(recv, str):
        pad = max([a if isinstance(a, int) and not isinstance(a, bool) else _size(a) for a in flat] + [0])
        return len(recv) + (recv.count("\n") + 1) * pad
    if name == "tojson":
        indent = kwargs.get("indent", args[1] if len(args) > 1 else None)
        pad = indent if isinstance(indent, int) and not isinstance(indent, bool) else _size(indent)
        return _text_size(recv, limit) * (1 + (pad or 0))
    return 0


# Filters whose int arguments are values, not counts or widths.
_NUMERIC_FILTERS = frozenset({"abs", "d", "default", "filesizeformat", "float", "int", "max", "min", "round", "string",
                              "sum", "tojson"})


def check_call(name: str, recv: Any, args: tuple, kwargs: dict, limit: int, *, is_filter: bool) -> tuple[Any, tuple]:
    """Refuses a filter or method call whose result could be over ``limit`` characters or items: a count or
    width argument over ``limit`` (any int argument of a string / list / dict method or of a non-numeric
    filter), or a known growing operation whose result would be. Returns ``(recv, args)``, with the
    sequence a ``join`` joins made a list first, so that its size can be checked."""
    if name == "join":
        if not is_filter and isinstance(recv, str) and args and not isinstance(args[0], Sized):
            args = (list(args[0]), *args[1:])  # sep.join(iterable)
        elif is_filter and not isinstance(recv, Sized) and isinstance(recv, Iterable):
            recv = list(recv)  # iterable|join(sep)
    if (name not in _NUMERIC_FILTERS) if is_filter else isinstance(recv, (str, bytes, list, tuple, dict)):
        counts = [a for a in _flat(args, kwargs) if isinstance(a, int) and not isinstance(a, bool)]
        if counts and max(abs(a) for a in counts) > limit:
            raise _too_big(f"a value (with {name!r} and {max(abs(a) for a in counts)})", max(abs(a) for a in counts),
                           limit)
    bound = _estimate(name, recv, args, kwargs, is_filter, limit)
    if bound > limit:
        raise _too_big(f"a value (with {name!r})", bound, limit)
    return recv, args


def check_result(value: Any, limit: int) -> Any:
    if isinstance(value, (str, list, tuple, dict, bytes)) and len(value) > limit:
        raise _too_big("a value", len(value), limit)
    return value


def check_binop(operator: str, left: Any, right: Any, limit: int) -> None:
    """Refuses ``left <operator> right`` when the result could be over ``limit`` characters, items or bits."""
    ints = (int,)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, ints) and len(seq) * n > limit:
                raise _too_big("a repeated sequence", len(seq) * n, limit)
        if isinstance(left, ints) and isinstance(right, ints) and left.bit_length() + right.bit_length() > limit:
            raise _too_big("a number", left.bit_length() + right.bit_length(), limit, "bits")
    elif operator == "**":
        if isinstance(left, ints) and isinstance(right, ints) and abs(left) > 1 \
                and left.bit_length() * abs(right) > limit:
            raise _too_big("a number", left.bit_length() * abs(right), limit, "bits")
    elif operator == "+":
        if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)) \
                and len(left) + len(right) > limit:
            raise _too_big("a concatenation", len(left) + len(right), limit)
    elif operator == "%" and isinstance(left, str):
        flat = list(right.values()) if isinstance(right, dict) else list(right) if isinstance(right, tuple) \
            else [right]
        bound = len(left) + _widths(left, flat) + sum(_text_size(a, limit) for a in flat)
        if bound > limit:
            raise _too_big("a formatted string", bound, limit)


def check_printable(value: Any, limit: int) -> Any:
    """``value`` unchanged, unless its text (``{{ value }}`` prints ``str(value)``) would pass ``limit``."""
    if not isinstance(value, str) and _text_size(value, limit) > limit:
        raise _passed(_text_size(value, limit), limit)
    return value


def _passed(total: int, limit: int) -> ChatTemplateLimitError:
    return ChatTemplateLimitError(f"the chat template's output (or a string it joins) passed {limit} characters",
                                  limit="output", value=total, maximum=limit)


def checked_join(parts: Iterable[Any], limit: int) -> str:
    """``"".join(map(str, parts))`` that stops as soon as the text would pass ``limit`` characters."""
    out: list[str] = []
    total = 0
    for p in parts:
        if not isinstance(p, str):
            if total + _text_size(p, limit) > limit:  # a container's text can be far larger than the container
                raise _passed(total + _text_size(p, limit), limit)
            p = str(p)
        total += len(p)
        if total > limit:
            raise _passed(total, limit)
        out.append(p)
    return "".join(out)
