"""A chat history that fits the model's context window.

A model has no memory between calls: every chat turn re-feeds the whole
history, rendered by the chat template, as the prompt.  So the history has to
fit the context window together with the tokens the reply may use.
:meth:`Conversation.fit` makes it fit by forgetting the oldest turns, whole,
never the system prompt and never the message being answered.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lmgen.errors import ContextOverflowError

__all__ = ["Conversation"]

_TURN_ROLES = ("user", "assistant")


@dataclass
class Conversation:
    """A system prompt plus user/assistant messages, oldest first.

    ``messages`` holds only the turns (dicts with ``role`` and ``content``);
    the system prompt lives in ``system`` and :meth:`to_messages` puts it first.
    """

    system: str | None = None
    messages: list[dict] = field(default_factory=list)

    def add_user(self, text: str) -> None:
        self._add("user", text)

    def add_assistant(self, text: str) -> None:
        self._add("assistant", text)

    def _add(self, role: str, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"{role} message must be a string, got {type(text).__name__}")
        self.messages.append({"role": role, "content": text})

    def to_messages(self) -> list[dict]:
        """The messages to render: the system prompt first (if set), then the turns. Fresh copies."""
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        out.extend(dict(m) for m in self.messages)
        return out

    def reset(self) -> None:
        """Forget the turns; the system prompt stays."""
        self.messages.clear()

    # ------------------------------------------------------------------------------ fitting

    def _turn_starts(self) -> list[int]:
        """Indices where a droppable chunk starts: each user message begins a turn.

        Messages before the first user message (a stray leading assistant
        message, say) form a chunk of their own, dropped first.
        """
        starts = [i for i, m in enumerate(self.messages) if m.get("role") == "user"]
        if self.messages and (not starts or starts[0] != 0):
            starts.insert(0, 0)
        return starts

    def fit(self, count_tokens: Callable[[list[dict]], int], context_length: int, max_tokens: int) -> int:
        """Drop the oldest whole turns until the prompt plus ``max_tokens`` fits ``context_length``.

        ``count_tokens(messages)`` must return the prompt's length in tokens,
        as rendered for generation (chat template with the generation prompt).
        A turn is a user message with the assistant messages that follow it;
        the system prompt and the last turn (the last user message and what
        follows it) are never dropped, and no message is ever cut.  Returns the
        number of messages dropped.  If even the system prompt plus the last
        turn leave no room for ``max_tokens``, raises
        :class:`ContextOverflowError` and changes nothing.
        """
        if not isinstance(context_length, int) or context_length <= 0:
            raise ValueError(f"context_length must be a positive integer, got {context_length!r}")
        if not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")

        starts = self._turn_starts()
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        counts: dict[int, int] = {}

        def prompt_tokens(k: int) -> int:
            """Prompt length when the first k chunks are dropped."""
            if k not in counts:
                first = starts[k] if k < len(starts) else len(self.messages)
                counts[k] = int(count_tokens(system + [dict(m) for m in self.messages[first:]]))
            return counts[k]

        def fits(k: int) -> bool:
            return prompt_tokens(k) + max_tokens <= context_length

        if fits(0):
            return 0
        k_max = max(len(starts) - 1, 0)  # the last chunk (the last turn) always stays
        if k_max == 0 or not fits(k_max):
            p = prompt_tokens(k_max)
            kept = len(self.messages) - (starts[k_max] if starts else 0)
            parts = (["the system prompt"] if self.system is not None else []) + (
                [f"the last {'message' if kept == 1 else f'{kept} messages (the last turn)'}"] if kept else [])
            raise ContextOverflowError(
                f"the conversation does not fit the context window even after dropping every earlier turn: "
                f"{' and '.join(parts) or 'the empty prompt'} take {p} tokens, plus max_tokens={max_tokens} "
                f"needs {p + max_tokens} tokens, but the context window is {context_length} tokens",
                needed=p + max_tokens, context_length=context_length, prompt_tokens=p, max_tokens=max_tokens,
            )
        # Dropping more turns only shortens the prompt, so binary-search the fewest drops that fit:
        # O(log turns) renders instead of one per turn on long histories.
        lo, hi = 1, k_max  # fits(hi) holds; fits(lo - 1) does not
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(mid):
                hi = mid
            else:
                lo = mid + 1
        dropped = starts[hi]
        del self.messages[:dropped]
        return dropped

    # ------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> None:
        """Write ``{"system": ..., "messages": [...]}`` as UTF-8 JSON (atomically: a crash leaves the old file)."""
        path = Path(path)
        data = {"system": self.system, "messages": [dict(m) for m in self.messages]}
        text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Conversation:
        """Read a file written by :meth:`save`, or a plain JSON list of ``{role, content}`` messages.

        A system message at the start of the list becomes ``system``.  Any
        problem (unreadable file, bad JSON, wrong shape) raises ``ValueError``
        naming the file and what is wrong.
        """
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: cannot read conversation file: {e}") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None

        if isinstance(data, list):
            system, messages = None, data
            origin = "the list"
        elif isinstance(data, Mapping):
            if "messages" not in data:
                raise ValueError(f"{where}: expected an object with a 'messages' list, or a list of messages")
            system, messages = data.get("system"), data["messages"]
            origin = "'messages'"
            if system is not None and not isinstance(system, str):
                raise ValueError(f"{where}: 'system' must be a string or null, got {type(system).__name__}")
            if not isinstance(messages, list):
                raise ValueError(f"{where}: 'messages' must be a list, got {type(messages).__name__}")
        else:
            raise ValueError(f"{where}: expected a JSON object or list, got {type(data).__name__}")

        turns: list[dict] = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise ValueError(f"{where}: message {i} in {origin} must be an object, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if not isinstance(content, str):
                raise ValueError(f"{where}: message {i} in {origin} needs a string 'content'")
            if role == "system":
                if i != 0 or system is not None:
                    raise ValueError(f"{where}: message {i} in {origin} is a system message; "
                                     f"only one, first, is allowed")
                system = content
                continue
            if role not in _TURN_ROLES:
                raise ValueError(f"{where}: message {i} in {origin} has role {role!r}; "
                                 f"expected 'user' or 'assistant'")
            turns.append(dict(m))
        return cls(system=system, messages=turns)

    def copy(self) -> Conversation:
        return Conversation(system=self.system, messages=[dict(m) for m in self.messages])
