"""Tool calling (OpenAI `tools` / `tool_choice`): validate the tool list, constrain the output to the call form
(`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, Hermes / Qwen style) with a grammar, and describe
the tools to a chat template that does not take `tools` itself.

tool_choice "none": no constraint (tools only described); "required": one or more calls (one with
parallel_tool_calls false), each valid against its tool's parameters; a named function: exactly one call of it;
"auto": either plain text (not starting with "<") or calls, the model's choice at its first token.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmgen.errors import InvalidRequestError
from lmgen.sampling.structured.spec import JSON_OPTIONS, StructuredOutput

__all__ = ["Tools", "CALL_OPEN", "CALL_CLOSE", "CALL_SEPARATOR", "template_takes_tools", "template_source"]

CALL_OPEN, CALL_CLOSE, CALL_SEPARATOR = "<tool_call>\n", "\n</tool_call>", "\n"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128

SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Here are the available tools: "
    "<tools>\n{tools}\n</tools>\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-dict>}}\n</tool_call>"
)


def template_takes_tools(source: str | None) -> bool:
    """Whether a chat template's source reads a `tools` variable (then it describes the tools itself)."""
    return bool(source) and re.search(r"\btools\b", source) is not None


def template_source(tokenizer: Any, name: str | None, allow_files: bool = True) -> str | None:
    """The Jinja source `name` (None: the tokenizer's default; one of its named templates, a built-in, a file when
    `allow_files`, or template text) renders with."""
    if name is None:
        return tokenizer.chat_template
    if name in tokenizer.chat_templates:
        return tokenizer.chat_templates[name]
    from lmgen.tokenizer.chat_template.template import ChatTemplate

    return ChatTemplate.resolve(name, tokenizer.bos_token, tokenizer.eos_token, allow_files=allow_files).source


class Tools:
    """A request's tools and tool_choice, validated; builds the constraint, the prompt messages and names calls."""

    def __init__(self, tools: list[dict] | None, tool_choice: str | dict | None = None,
                 parallel_tool_calls: bool | None = None):
        if tools is not None and not isinstance(tools, list):
            raise InvalidRequestError("tools must be a list of {type: function, function: {...}}", param="tools", value=tools)
        self.functions: dict[str, dict] = {}
        for i, tool in enumerate(tools or []):
            self._add(i, tool)
        if len(self.functions) > MAX_TOOLS:
            raise InvalidRequestError(f"at most {MAX_TOOLS} tools are accepted, got {len(self.functions)}",
                                      param="tools", value=len(self.functions))
        self.tools = list(tools or [])
        self.parallel = True if parallel_tool_calls is None else parallel_tool_calls
        if not isinstance(self.parallel, bool):
            raise InvalidRequestError("parallel_tool_calls must be a bool", param="parallel_tool_calls",
                                      value=parallel_tool_calls)
        self.choice, self.named = self._choice(tool_choice)

    def _add(self, i: int, tool: Any) -> None:
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise InvalidRequestError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=where,
                                      value=tool)
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                                      param=f"{where}.function.name", value=name)
        if name in self.functions:
            raise InvalidRequestError(f"{where}: the function name {name!r} is used twice", param=f"{where}.function.name",
                                      value=name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON Schema object",
                                      param=f"{where}.function.parameters", value=params)
        # each tool's schema alone, so that an unsupported feature names its tool
        StructuredOutput(json_schema=params, param=f"{where}.function.parameters")
        self.functions[name] = params

    def _choice(self, choice: Any) -> tuple[str, str | None]:
        if choice is None:
            return ("auto" if self.functions else "none"), None
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise InvalidRequestError(f"tool_choice must be none, auto, required or a named function, got {choice!r}",
                                          param="tool_choice", value=choice)
            if choice != "none" and not self.functions:
                raise InvalidRequestError(f"tool_choice {choice!r} needs tools", param="tool_choice", value=choice)
            return choice, None
        fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in self.functions:
            raise InvalidRequestError(f"tool_choice names no function of tools: {choice!r}", param="tool_choice",
                                      value=choice)
        return "named", name

    @property
    def active(self) -> bool:
        """Whether the output may hold tool calls (tool_choice other than none)."""
        return self.choice != "none"

    # ---- the constraint ---------------------------------------------------------------------------
    def call_schema(self) -> dict:
        """JSON Schema of one call: {"name": <one of the tools>, "arguments": <its parameters>}."""
        names = [self.named] if self.named else list(self.functions)
        calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": self.functions[n]},
                  "required": ["name", "arguments"], "additionalProperties": False} for n in names]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {**schema, "x-guidance": JSON_OPTIONS}

    def structured(self) -> StructuredOutput | None:
        """The grammar the output must follow (None for tool_choice none)."""
        if not self.active:
            return None
        call = f"{json.dumps(CALL_OPEN)} %json {json.dumps(self.call_schema())} {json.dumps(CALL_CLOSE)}"
        calls = "call" if (self.named or not self.parallel) else f"call ({json.dumps(CALL_SEPARATOR)} call)*"
        start = f"start: {calls}" if self.choice != "auto" else f"start: {calls} | TEXT\nTEXT: /[^<](.|\\n)*/"
        return StructuredOutput(grammar=f"{start}\ncall: {call}\n", param="tools")

    # ---- the prompt -------------------------------------------------------------------------------
    def messages_for(self, messages: list[dict], template_source: str | None) -> tuple[list[dict], dict]:
        """(messages, extra template variables) for a chat template: one that reads `tools` gets them (and tool-call
        arguments as objects); for another, the tools are described in the system message and earlier calls and
        tool results are written in the call form."""
        if not self.tools:
            return messages, {}
        if template_takes_tools(template_source):
            return [_arguments_as_objects(m) for m in messages], {"tools": self.tools}
        described = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in self.tools)
        system = SYSTEM_PROMPT.format(tools=described)
        out = [dict(m) for m in messages]
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{system}".strip()
        else:
            out.insert(0, {"role": "system", "content": system})
        for i, m in enumerate(out):
            if m.get("role") == "assistant" and m.get("tool_calls"):
                try:
                    calls = [CALL_OPEN + json.dumps({"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments"))},
                                                    ensure_ascii=False) + CALL_CLOSE for c in m.pop("tool_calls")]
                except (KeyError, TypeError, AttributeError):
                    raise InvalidRequestError(f"messages[{i}].tool_calls must be a list of {{id, type, function: {{name, "
                                              f"arguments}}}}", param="messages", value=None) from None
                m["content"] = ((m.get("content") or "") + CALL_SEPARATOR.join(calls)).strip()
            elif m.get("role") == "tool":
                m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
        return out, {}


def _loads(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _arguments_as_objects(message: dict) -> dict:
    if message.get("role") != "assistant" or not message.get("tool_calls"):
        return message
    calls = []
    for c in message["tool_calls"]:
        fn = dict(c.get("function") or {})
        fn["arguments"] = _loads(fn.get("arguments"))
        calls.append({**c, "function": fn})
    return {**message, "tool_calls": calls}
