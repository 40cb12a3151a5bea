"""Reading tool calls out of a (grammar-constrained) output: whole (`parse_tool_calls`) or as it streams
(`ToolCallStream`, OpenAI's `delta.tool_calls` shape: index, id, type and function.name first, then argument
fragments). Both cut a call's `arguments` the same way, so the streamed fragments joined equal the whole result."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lmgen.chat.tools import CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR

__all__ = ["ToolCall", "parse_tool_calls", "ToolCallStream"]

# the grammar writes a call's keys in schema order, compact: {"name": "f", "arguments": {...}}
_HEAD = re.compile(r'\{"name": "([A-Za-z0-9_-]{1,64})", "arguments": ')
_HOLD = len("}" + CALL_CLOSE)  # a streamed argument fragment never includes what may be the call's end


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as generated

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _split_call(body: str) -> tuple[str, str] | None:
    """(name, arguments text) of one call's JSON body, or None if it is not a call object."""
    head = _HEAD.match(body)
    if head and body.endswith("}"):
        return head.group(1), body[head.end():-1]
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or "arguments" not in obj:
        return None
    return obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls): an output that begins with a call holds calls (and, if cut short, the unfinished rest as
    content); any other output is content."""
    if not text.startswith(CALL_OPEN):
        return text, []
    calls, pos = [], 0
    while text.startswith(CALL_OPEN, pos):
        end = text.find(CALL_CLOSE, pos + len(CALL_OPEN))
        split = _split_call(text[pos + len(CALL_OPEN):end]) if end >= 0 else None
        if split is None:
            break
        calls.append(ToolCall(new_call_id(), *split))
        pos = end + len(CALL_CLOSE)
        if text.startswith(CALL_SEPARATOR + CALL_OPEN, pos):
            pos += len(CALL_SEPARATOR)
    rest = text[pos:].strip()
    return (rest or None), calls


class ToolCallStream:
    """Feeds an output's text deltas; returns (content delta, tool-call deltas) per feed."""

    def __init__(self) -> None:
        self.text = ""
        self.mode: str | None = None  # "content" or "calls", decided by the first character
        self.pos = 0  # where the next call starts (calls mode)
        self.index = -1  # the open call's index
        self.args_start: int | None = None  # the open call's arguments start in `text`, once its name was sent
        self.args_sent = 0
        self.call_id = ""
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        self.text += delta
        if self.mode is None and self.text:
            self.mode = "calls" if self.text.startswith("<") else "content"
        if self.mode == "content":
            return delta, []
        out: list[dict] = []
        while self._step(out):
            pass
        return "", out

    def _step(self, out: list[dict]) -> bool:
        """Advances over the open call; True when a call was closed (another may follow)."""
        text = self.text
        if self.args_start is None and self.index < len(self.calls):  # no open call: look for the next one
            if self.calls and text.startswith(CALL_SEPARATOR + CALL_OPEN, self.pos):
                self.pos += len(CALL_SEPARATOR)
            if not text.startswith(CALL_OPEN, self.pos):
                return False
            self.index, self.call_id = len(self.calls), new_call_id()
        body_start = self.pos + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        if self.args_start is None:
            head = _HEAD.match(text, body_start)
            if head:
                self.args_start = head.end()
                out.append({"index": self.index, "id": self.call_id, "type": "function",
                            "function": {"name": head.group(1), "arguments": ""}})
            elif end < 0:
                return False
        if end < 0:  # still open: send the arguments written so far, holding back what may be the call's end
            safe = len(text) - _HOLD
            if self.args_start is not None and safe > self.args_start + self.args_sent:
                out.append({"index": self.index, "function": {"arguments": text[self.args_start + self.args_sent:safe]}})
                self.args_sent = safe - self.args_start
            return False
        split = _split_call(text[body_start:end])
        if split is None:
            return False
        name, arguments = split
        if self.args_start is None:  # keys in another order: the whole call at once
            out.append({"index": self.index, "id": self.call_id, "type": "function",
                        "function": {"name": name, "arguments": arguments}})
        elif len(arguments) > self.args_sent:
            out.append({"index": self.index, "function": {"arguments": arguments[self.args_sent:]}})
        self.calls.append(ToolCall(self.call_id, name, arguments))
        self.pos = end + len(CALL_CLOSE)
        self.args_start, self.args_sent = None, 0
        return True
