"""StructuredOutput: what a request's output must match (JSON, a JSON Schema, a regex, a choice, a grammar).

Validated when built: a malformed or unsupported constraint is an `InvalidRequestError` naming the field, never a
constraint silently dropped. `grammar()` gives the llguidance grammar (JSON text) the engine compiles per request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from lmgen.errors import InvalidRequestError

__all__ = ["StructuredOutput", "grammar_limits", "MAX_CONSTRAINT_CHARS", "JSON_OPTIONS"]

#: Longest constraint text (a schema as JSON, a regex, a grammar, all choices together) a request may give.
MAX_CONSTRAINT_CHARS = 200_000

#: Compact JSON (no free whitespace): a small model cannot wander off into endless newlines.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_limits() -> llguidance.LLParserLimits:
    """Bounds on compiling and on each mask step (llguidance's defaults: 1e6 lexer fuel, 5e5 grammar symbols, 250k
    lexer states): a hostile schema fails with an error instead of freezing the engine or filling memory."""
    return llguidance.LLParserLimits(initial_lexer_fuel=1_000_000, max_grammar_size=200_000, max_lexer_states=50_000,
                                     verbose_errors=False)

_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")


def _one_line(error: str, limit: int = 400) -> str:
    """llguidance's multi-line message on one line (the CLI prints one line), bounded."""
    text = " ".join(error.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class StructuredOutput:
    """Exactly one of: `json_object=True` (any JSON object), `json_schema` (a dict or its JSON text), `regex`,
    `choice` (a list of strings), `grammar` (Lark, or GBNF as llama.cpp writes it).

    `param` is the request field reported in errors (the server sets e.g. "response_format.json_schema")."""

    json_object: bool = False
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None
    param: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                f"a structured output takes exactly one of {', '.join(_KINDS)}; got {', '.join(given) or 'none'}",
                param=self.param or "structured", value=given)
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice) if isinstance(self.choice, (list, tuple)) else self.choice)
        object.__setattr__(self, "_grammar", self._build())

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def _field(self) -> str:
        return self.param or self.kind

    def _fail(self, why: str, value: Any) -> None:
        raise InvalidRequestError(f"{self._field()}: {why}", param=self._field(), value=value)

    def _build(self) -> str:
        """The llguidance grammar, checked by llguidance (syntax, unsupported schema keywords, size limits)."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json_object":
            if value is not True:
                self._fail("json_object must be True", value)
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        elif kind == "json_schema":
            grammar = self._schema_grammar(value)
        elif kind == "regex":
            if not isinstance(value, str) or not value:
                self._fail("must be a non-empty regular expression string", value)
            self._check_size(value)
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            if not isinstance(value, tuple) or not value or not all(isinstance(c, str) and c for c in value):
                self._fail("must be a non-empty list of non-empty strings", value)
            self._check_size("".join(value))
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value)
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        else:
            if not isinstance(value, str) or not value.strip():
                self._fail("must be a non-empty Lark or GBNF grammar", value)
            self._check_size(value)
            try:  # "grammar": Lark, or GBNF converted to Lark
                grammar = llguidance.grammar_from("grammar", value)
            except ValueError as e:
                self._fail(f"is not a valid Lark or GBNF grammar ({e})", value)
        error = llguidance.LLMatcher.validate_grammar(grammar, None, limits=grammar_limits())
        if error:
            self._fail(f"unsupported or malformed constraint: {_one_line(error)}", value)
        return grammar

    def _schema_grammar(self, schema: Any) -> str:
        if isinstance(schema, str):
            self._check_size(schema)
            try:
                schema = json.loads(schema)
            except ValueError as e:
                self._fail(f"is not valid JSON ({e})", schema)
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            self._fail("must be a JSON Schema object", schema)
        text = json.dumps(schema)
        self._check_size(text)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        except ValueError as e:
            self._fail(f"is not a valid JSON Schema ({e})", schema)

    def _check_size(self, text: str) -> None:
        if len(text) > MAX_CONSTRAINT_CHARS:
            self._fail(f"is {len(text)} characters; the limit is {MAX_CONSTRAINT_CHARS}", len(text))

    def compiled(self) -> str:
        """The llguidance grammar (JSON text) to compile against a vocabulary."""
        return self._grammar  # type: ignore[attr-defined]
