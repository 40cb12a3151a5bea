"""From a request's structured-output fields to one `StructuredOutput`: OpenAI's `response_format` (json_object,
json_schema) and vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` / `structured_outputs`.
A malformed, unsupported or conflicting constraint is an InvalidRequestError naming the field (a 400), never dropped.
Builds compile the grammar (llguidance, bounded), so callers run this off the event loop.
"""

from __future__ import annotations

from typing import Any

from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import StructuredOutput

__all__ = ["structured_output"]

_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                       "json_object": "json_object"}
_BACKENDS = (None, "auto", "llguidance", "guidance")  # vLLM's guided_decoding_backend values lmgen honours


def _from_response_format(rf: Any) -> list[StructuredOutput]:
    if rf is None or rf.type == "text":
        return []
    if rf.type == "json_object":
        return [StructuredOutput(json_object=True, param="response_format")]
    if rf.type != "json_schema":
        raise InvalidRequestError(f"response_format.type must be text, json_object or json_schema, got {rf.type!r}",
                                  param="response_format.type", value=rf.type)
    js = rf.json_schema
    if not isinstance(js, dict) or "schema" not in js:
        raise InvalidRequestError("response_format.json_schema must be an object with a 'schema' (and a 'name')",
                                  param="response_format.json_schema", value=js)
    return [StructuredOutput(json_schema=js["schema"], param="response_format.json_schema")]


def _from_structured_outputs(so: dict | None) -> list[StructuredOutput]:
    if so is None:
        return []
    out = []
    for key, value in so.items():
        if value is None or value is False:
            continue
        if key not in _STRUCTURED_OUTPUTS:
            raise InvalidRequestError(f"structured_outputs.{key} is not supported (supported: "
                                      f"{', '.join(_STRUCTURED_OUTPUTS)})", param=f"structured_outputs.{key}", value=value)
        out.append(StructuredOutput(**{_STRUCTURED_OUTPUTS[key]: value, "param": f"structured_outputs.{key}"}))
    return out


def structured_output(req: Any) -> StructuredOutput | None:
    """The request's one constraint, or None. `req` has the guided_* fields (both endpoints), and response_format
    on chat."""
    backend = getattr(req, "guided_decoding_backend", None)
    if backend not in _BACKENDS:
        raise InvalidRequestError(f"guided_decoding_backend {backend!r} is not available (lmgen uses llguidance)",
                                  param="guided_decoding_backend", value=backend)
    if getattr(req, "guided_whitespace_pattern", None) is not None:
        raise InvalidRequestError("guided_whitespace_pattern is not supported (JSON is written compactly)",
                                  param="guided_whitespace_pattern", value=req.guided_whitespace_pattern)
    found = _from_response_format(getattr(req, "response_format", None))
    for field, kind in _GUIDED.items():
        value = getattr(req, field, None)
        if value is not None:
            found.append(StructuredOutput(**{kind: value, "param": field}))
    found += _from_structured_outputs(getattr(req, "structured_outputs", None))
    if len(found) > 1:
        names = ", ".join(s.param for s in found)
        raise InvalidRequestError(f"give at most one output constraint; got {names}", param=found[1].param, value=names)
    return found[0] if found else None
