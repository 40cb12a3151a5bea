"""Chat templates: render a conversation into the prompt text a chat model expects.

Every chat model is trained on one particular way of laying a conversation out
as text (special tokens between turns, where the system prompt goes, what
starts the assistant's reply).  Hugging Face models ship that layout as a
Jinja template (``tokenizer_config.json`` ``chat_template``; GGUF files carry
the same text as ``tokenizer.chat_template``).  :class:`ChatTemplate` renders
such a template exactly as ``transformers``'
``tokenizer.apply_chat_template(messages, tokenize=False)`` does, using the
same Jinja environment settings, filters and globals, so the prompt matches
the one the model was trained on byte for byte.

Templates are untrusted code (they come with downloaded model files), so they
run in Jinja's immutable sandbox, as in ``transformers``; on top of that any
attempt to reach Python internals (``__class__``, ``__globals__``, ...) fails
loudly with :class:`ChatTemplateError` instead of rendering an empty string,
and the data a template sees is rebuilt from plain JSON types first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import traceback
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered, or its input was malformed."""


# --------------------------------------------------------------------------------------
# Built-in templates: verbatim copies of the official templates of these model families
# (the ``chat_template`` string of each model's tokenizer_config.json).
# --------------------------------------------------------------------------------------

# meta-llama/Meta-Llama-3-8B-Instruct
_LLAMA3 = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"  # noqa: E501

# meta-llama/Llama-3.1-8B-Instruct (also what Llama 3.1 GGUF files embed)
_LLAMA31 = '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0][\'role\'] == \'system\' %}\n    {%- set system_message = messages[0][\'content\']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n{%- endif %}\n{{- "Cutting Knowledge Date: December 2023\\n" }}\n{{- "Today Date: " + date_string + "\\n\\n" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- "<|eot_id|>" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0][\'content\']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n{%- endif %}\n    {{- \'<|start_header_id|>user<|end_header_id|>\\n\\n\' -}}\n    {{- "Given the following functions, please respond with a JSON for a function call " }}\n    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n    {{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == \'ipython\' or message.role == \'tool\' or \'tool_calls\' in message) %}\n        {{- \'<|start_header_id|>\' + message[\'role\'] + \'<|end_header_id|>\\n\\n\'+ message[\'content\'] | trim + \'<|eot_id|>\' }}\n    {%- elif \'tool_calls\' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception("This model only supports single tool-calls at once!") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' -}}\n            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + \'="\' + arg_val + \'"\' }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n                {%- endif %}\n                {%- endfor %}\n            {{- ")" }}\n        {%- else  %}\n            {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' -}}\n            {{- \'{"name": "\' + tool_call.name + \'", \' }}\n            {{- \'"parameters": \' }}\n            {{- tool_call.arguments | tojson }}\n            {{- "}" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we\'re in ipython mode #}\n            {{- "<|eom_id|>" }}\n        {%- else %}\n            {{- "<|eot_id|>" }}\n        {%- endif %}\n    {%- elif message.role == "tool" or message.role == "ipython" %}\n        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- \'<|start_header_id|>assistant<|end_header_id|>\\n\\n\' }}\n{%- endif %}\n'  # noqa: E501

# meta-llama/Llama-2-7b-chat-hf ("[INST] <<SYS>>" format; ignores add_generation_prompt)
_LLAMA2 = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"  # noqa: E501

# Plain ChatML, as used by many fine-tunes (e.g. Felladrin/Llama-68M-Chat-v1)
_CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"  # noqa: E501

# mistralai/Mistral-7B-Instruct-v0.3 (v3 tokenizer; the system prompt goes into the last user turn)
_MISTRAL = '{%- if messages[0]["role"] == "system" %}\n    {%- set system_message = messages[0]["content"] %}\n    {%- set loop_messages = messages[1:] %}\n{%- else %}\n    {%- set loop_messages = messages %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n\n{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n{%- set ns = namespace() %}\n{%- set ns.index = 0 %}\n{%- for message in loop_messages %}\n    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n        {%- endif %}\n        {%- set ns.index = ns.index + 1 %}\n    {%- endif %}\n{%- endfor %}\n\n{{- bos_token }}\n{%- for message in loop_messages %}\n    {%- if message["role"] == "user" %}\n        {%- if tools is not none and (message == user_messages[-1]) %}\n            {{- "[AVAILABLE_TOOLS] [" }}\n            {%- for tool in tools %}\n                {%- set tool = tool.function %}\n                {{- \'{"type": "function", "function": {\' }}\n                {%- for key, val in tool.items() if key != "return" %}\n                    {%- if val is string %}\n                        {{- \'"\' + key + \'": "\' + val + \'"\' }}\n                    {%- else %}\n                        {{- \'"\' + key + \'": \' + val|tojson }}\n                    {%- endif %}\n                    {%- if not loop.last %}\n                        {{- ", " }}\n                    {%- endif %}\n                {%- endfor %}\n                {{- "}}" }}\n                {%- if not loop.last %}\n                    {{- ", " }}\n                {%- else %}\n                    {{- "]" }}\n                {%- endif %}\n            {%- endfor %}\n            {{- "[/AVAILABLE_TOOLS]" }}\n            {%- endif %}\n        {%- if loop.last and system_message is defined %}\n            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n        {%- else %}\n            {{- "[INST] " + message["content"] + "[/INST]" }}\n        {%- endif %}\n    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}\n            {%- set out = tool_call.function|tojson %}\n            {{- out[:-1] }}\n            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n            {%- endif %}\n            {{- \', "id": "\' + tool_call.id + \'"}\' }}\n            {%- if not loop.last %}\n                {{- ", " }}\n            {%- else %}\n                {{- "]" + eos_token }}\n            {%- endif %}\n        {%- endfor %}\n    {%- elif message["role"] == "assistant" %}\n        {{- " " + message["content"]|trim + eos_token}}\n    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n        {%- if message.content is defined and message.content.content is defined %}\n            {%- set content = message.content.content %}\n        {%- else %}\n            {%- set content = message.content %}\n        {%- endif %}\n        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n        {%- endif %}\n        {{- \'"call_id": "\' + message.tool_call_id + \'"}[/TOOL_RESULTS]\' }}\n    {%- else %}\n        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n    {%- endif %}\n{%- endfor %}\n'  # noqa: E501

# bos/eos the built-ins' models use; ``resolve`` fills them in when the caller gives none.
_BUILTIN_SPECIAL_TOKENS: dict[str, tuple[str | None, str | None]] = {
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama2": ("<s>", "</s>"),
    "chatml": (None, "<|im_end|>"),
    "mistral": ("<s>", "</s>"),
}

# Guards against templates that try to exhaust memory ("x" * 10**12, 9 ** 10**9).
_MAX_REPEAT_LEN = 10_000_000
_MAX_POW_EXPONENT = 10_000


# --------------------------------------------------------------------------------------
# The Jinja environment, built as transformers' ``_compile_jinja_template`` builds it.
# --------------------------------------------------------------------------------------


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """Raised by the template's own ``raise_exception(message)`` call."""


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(message)


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
def _compile(source: str) -> jinja2.Template:
    # Compiling a large template takes milliseconds; callers often build a ChatTemplate per request.
    return _environment().from_string(source)


# --------------------------------------------------------------------------------------
# Input preparation, mirroring transformers' apply_chat_template / render_jinja_template.
# --------------------------------------------------------------------------------------

# Names a message's reasoning is passed under; templates read the first (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value: Any) -> Any:
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
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _validate_messages(messages: Any) -> None:
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


def _prepare_messages(messages: Any) -> list[dict]:
    chat = []
    for msg in messages:
        # transformers drops None-valued keys: templates handle a missing key better than None.
        msg = _plain({k: v for k, v in msg.items() if v is not None})
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        chat.append(msg)
    return chat


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at (Jinja rewrites tracebacks to point there)."""
    line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == "<template>":
            line = lineno
    return line


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplate:
    """A compiled chat template.

    >>> t = ChatTemplate.resolve("chatml")
    >>> t.render([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'

    ``bos_token`` / ``eos_token`` are passed to the template as variables of
    those names, as transformers passes the tokenizer's special tokens (a
    token given as ``None`` is left undefined, as transformers leaves it).
    """

    BUILTINS: dict[str, str] = {
        "llama3": _LLAMA3,
        "llama3.1": _LLAMA31,
        "llama2": _LLAMA2,
        "chatml": _CHATML,
        "mistral": _MISTRAL,
    }

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 *, name: str | None = None):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template source must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name or "chat template"
        try:
            self._template = _compile(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{self.name}: syntax error at line {e.lineno}: {e.message}"
            ) from None
        except jinja2.exceptions.TemplateError as e:  # e.g. an unknown extension tag
            raise ChatTemplateError(f"{self.name}: cannot compile: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    @classmethod
    def resolve(cls, spec: str, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        """A template from a built-in name, a path to a template file, or the template source itself.

        For a built-in, a bos/eos token not given is filled in with the one its
        model family uses.
        """
        if not isinstance(spec, str) or not spec:
            raise ChatTemplateError("chat template spec must be a non-empty string")
        key = spec.strip().lower()
        if key in cls.BUILTINS:
            default_bos, default_eos = _BUILTIN_SPECIAL_TOKENS.get(key, (None, None))
            return cls(cls.BUILTINS[key],
                       bos_token if bos_token is not None else default_bos,
                       eos_token if eos_token is not None else default_eos,
                       name=f"built-in chat template {key!r}")
        if "{{" in spec or "{%" in spec or "{#" in spec:
            return cls(spec, bos_token, eos_token)
        path = Path(os.path.expanduser(spec))
        if path.is_file():
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"cannot read chat template file {str(path)!r}: {e}") from None
            return cls(source, bos_token, eos_token, name=f"chat template {str(path)!r}")
        builtins = ", ".join(cls.BUILTINS)
        if path.suffix.lower() in (".jinja", ".jinja2", ".j2", ".txt") or os.sep in spec:
            raise ChatTemplateError(
                f"chat template file {spec!r} not found (built-in templates: {builtins})"
            )
        raise ChatTemplateError(
            f"unknown chat template {spec!r}: not a built-in ({builtins}), "
            f"an existing template file, or template source"
        )

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *,
               continue_final_message: bool = False, **template_kwargs: Any) -> str:
        """Render ``messages`` into a prompt string.

        ``add_generation_prompt`` appends the header that starts the assistant's
        reply.  ``continue_final_message`` instead leaves the last message open,
        so the model continues it (it needs ``add_generation_prompt=False``).
        Every other keyword (``tools=``, ``documents=``, ``enable_thinking=``,
        ``date_string=``, ...) reaches the template as a variable of that name,
        as in transformers; ``tools`` and ``documents`` default to ``None``.
        """
        _validate_messages(messages)
        chat = _prepare_messages(messages)

        tools = template_kwargs.pop("tools", None)
        documents = template_kwargs.pop("documents", None)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise ChatTemplateError("tools must be a list of JSON-schema dicts")
            tools = _plain(list(tools))
        if documents is not None:
            if not isinstance(documents, (list, tuple)) or not all(isinstance(d, Mapping) for d in documents):
                raise ChatTemplateError("documents must be a list of dicts")
            documents = _plain(list(documents))

        variables: dict[str, Any] = {}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(template_kwargs)  # caller's variables override the special tokens
        variables = _plain(variables)

        final_text = None
        if continue_final_message:
            if add_generation_prompt:
                raise ChatTemplateError(
                    "continue_final_message and add_generation_prompt cannot both be set: "
                    "pass add_generation_prompt=False to continue the last message"
                )
            final_text = self._tag_final_message(chat)

        try:
            rendered = self._template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
        except _TemplateRaised as e:
            raise ChatTemplateError(str(e)) from None
        except jinja2.exceptions.SecurityError as e:
            raise ChatTemplateError(
                f"{self.name} was blocked by the sandbox{self._at(e)}: {e}"
            ) from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{self.name} failed{self._at(e)}: {e}") from None
        except (RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"{self.name} exhausted resources{self._at(e)}: {type(e).__name__}") from None
        except Exception as e:  # TypeError from "a" + 1, OverflowError from range(), ...
            raise ChatTemplateError(f"{self.name} failed{self._at(e)}: {type(e).__name__}: {e}") from None

        if final_text is not None:
            rendered = self._cut_at_tag(rendered, final_text)
        return rendered

    @staticmethod
    def _at(exc: BaseException) -> str:
        line = _template_line(exc)
        return f" at line {line}" if line is not None else ""

    def _tag_final_message(self, chat: list[dict]) -> str:
        # As transformers: append a marker to the last message's text, render, cut at the marker.
        last = chat[-1]
        content = last.get("content")
        if isinstance(content, str):
            last["content"] = content + _CONTINUE_TAG
            return content
        if isinstance(content, list):
            for part in reversed(content):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    text = part["text"]
                    part["text"] = text + _CONTINUE_TAG
                    return text
        raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")

    def _cut_at_tag(self, rendered: str, final_text: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_text.strip() not in rendered or tag not in rendered:
            raise ChatTemplateError(
                f"continue_final_message is set but {self.name} does not reproduce the final message "
                f"verbatim, so it cannot be continued"
            )
        loc = rendered.rindex(tag)
        if rendered[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return rendered[:loc]
        return rendered[:loc].rstrip()  # the template trimmed the trailing space
