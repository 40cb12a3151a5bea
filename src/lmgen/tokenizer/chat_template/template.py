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
and the data a template sees is rebuilt from plain JSON types first. Every
render runs under :class:`RenderLimits` (time, output size, memory; see
chat_template_limits) and goes over one with :class:`ChatTemplateLimitError`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2.exceptions

from lmgen.errors import ChatTemplateLimitError
from lmgen.tokenizer.chat_template.builtins import BUILTIN_SPECIAL_TOKENS, BUILTIN_TEMPLATES
from lmgen.errors import ChatTemplateError
from lmgen.tokenizer.chat_template.inputs import prepare_messages, to_plain, validate_messages
from lmgen.tokenizer.chat_template.limits import RenderLimits, RenderWatch
from lmgen.tokenizer.chat_template.sandbox import TemplateRaised, compile_template

__all__ = ["ChatTemplate"]


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
    ``limits`` bound every render (default :class:`RenderLimits`()).
    """

    BUILTINS: dict[str, str] = BUILTIN_TEMPLATES

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None,
                 *, name: str | None = None, limits: RenderLimits | None = None):
        if not isinstance(source, str):
            raise ChatTemplateError(f"chat template source must be a string, got {type(source).__name__}")
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name or "chat template"
        self.limits = limits or RenderLimits()
        try:
            self._template = compile_template(source, self.limits.max_chars)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{self.name}: syntax error at line {e.lineno}: {e.message}"
            ) from None
        except jinja2.exceptions.TemplateError as e:  # e.g. an unknown extension tag
            raise ChatTemplateError(f"{self.name}: cannot compile: {e}") from None

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"

    @classmethod
    def resolve(cls, spec: str, bos_token: str | None = None, eos_token: str | None = None, *,
                allow_files: bool = True, limits: RenderLimits | None = None) -> ChatTemplate:
        """A template from a built-in name, a path to a template file, or the template source itself.

        For a built-in, a bos/eos token not given is filled in with the one its
        model family uses. With ``allow_files=False`` (a template that came with a
        request) ``spec`` is never looked up on the filesystem: anything that is
        not a built-in name must be Jinja text.
        """
        if not isinstance(spec, str) or not spec:
            raise ChatTemplateError("chat template spec must be a non-empty string")
        key = spec.strip().lower()
        if key in cls.BUILTINS:
            default_bos, default_eos = BUILTIN_SPECIAL_TOKENS.get(key, (None, None))
            return cls(cls.BUILTINS[key],
                       bos_token if bos_token is not None else default_bos,
                       eos_token if eos_token is not None else default_eos,
                       name=f"built-in chat template {key!r}", limits=limits)
        if "{{" in spec or "{%" in spec or "{#" in spec:
            return cls(spec, bos_token, eos_token, limits=limits)
        builtins = ", ".join(cls.BUILTINS)
        if not allow_files:
            raise ChatTemplateError(
                f"chat template {spec[:80]!r} is neither a built-in name ({builtins}) nor Jinja template "
                f"text; a file path is not accepted here"
            )
        path = Path(os.path.expanduser(spec))
        if path.is_file():
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"cannot read chat template file {str(path)!r}: {e}") from None
            return cls(source, bos_token, eos_token, name=f"chat template {str(path)!r}", limits=limits)
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
        validate_messages(messages)
        chat = prepare_messages(messages)

        tools = template_kwargs.pop("tools", None)
        documents = template_kwargs.pop("documents", None)
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
                raise ChatTemplateError("tools must be a list of JSON-schema dicts")
            tools = to_plain(list(tools))
        if documents is not None:
            if not isinstance(documents, (list, tuple)) or not all(isinstance(d, Mapping) for d in documents):
                raise ChatTemplateError("documents must be a list of dicts")
            documents = to_plain(list(documents))

        variables: dict[str, Any] = {}
        if self.bos_token is not None:
            variables["bos_token"] = self.bos_token
        if self.eos_token is not None:
            variables["eos_token"] = self.eos_token
        variables.update(template_kwargs)  # caller's variables override the special tokens
        variables = to_plain(variables)

        final_text = None
        if continue_final_message:
            if add_generation_prompt:
                raise ChatTemplateError(
                    "continue_final_message and add_generation_prompt cannot both be set: "
                    "pass add_generation_prompt=False to continue the last message"
                )
            final_text = self._tag_final_message(chat)

        try:
            with RenderWatch(self.limits):
                rendered = self._template.render(
                    messages=chat,
                    tools=tools,
                    documents=documents,
                    add_generation_prompt=bool(add_generation_prompt),
                    **variables,
                )
        except ChatTemplateLimitError as e:
            raise ChatTemplateLimitError(f"{self.name} stopped{self._at(e)}: {e}", limit=e.limit, value=e.value,
                                         maximum=e.maximum) from None
        except TemplateRaised as e:
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
