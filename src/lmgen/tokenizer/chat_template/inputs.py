"""Validates and prepares the conversation a chat template is rendered with, mirroring transformers'
apply_chat_template / render_jinja_template; all data is rebuilt from plain JSON types first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lmgen.errors import ChatTemplateError

__all__ = ["to_plain", "validate_messages", "prepare_messages"]

# Names a message's reasoning is passed under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def to_plain(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, so the template never sees a rich object.

    Objects with methods the sandbox does not know are dangerous are replaced
    by an inert ``"<TypeName>"`` placeholder (as transformers does).
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return to_plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return to_plain(value.model_dump())
    return f"<{type(value).__name__}>"


def validate_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise ChatTemplateError("cannot render an empty conversation: give at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ChatTemplateError(
                f"message at index {i} must be a dict with 'role' and 'content', "
                f"got {type(msg).__name__}"
            )
        role = msg.get("role")
        if not isinstance(role, str):
            what = "is missing 'role'" if "role" not in msg else \
                f"has a non-string 'role' ({type(role).__name__})"
            raise ChatTemplateError(f"message at index {i} {what}")
        content = msg.get("content")
        if content is None:
            # An assistant turn that only calls tools may carry no content (or content=None).
            if msg.get("tool_calls") is None:
                raise ChatTemplateError(f"message at index {i} (role {role!r}) has no 'content'")
        elif isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ChatTemplateError(
                        f"message at index {i}: content part {j} must be a dict "
                        f"(e.g. {{'type': 'text', 'text': ...}}), got {type(part).__name__}"
                    )
        elif not isinstance(content, str):
            raise ChatTemplateError(
                f"message at index {i} (role {role!r}): 'content' must be a string or a list of "
                f"parts, got {type(content).__name__}"
            )


def prepare_messages(messages: Any) -> list[dict]:
    chat = []
    for msg in messages:
        # transformers drops None-valued keys: templates handle a missing key better than None.
        msg = to_plain({k: v for k, v in msg.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        chat.append(msg)
    return chat
