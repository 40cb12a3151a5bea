"""`lmgen chat`: a streaming chat REPL over an LLM and a Conversation.

The model has no memory: each turn re-renders the whole (fitted) history through the chat template; the
engine's prefix cache finds the earlier turns' K/V, so only the new tokens are prefilled (see /tokens, --stats).
At a terminal the input line has readline editing (arrow keys, Ctrl-A/E, ...) and a history kept across sessions
in $XDG_STATE_HOME/lmgen/chat_history (~/.local/state/...; LMGEN_HISTORY_FILE names another file, "" none).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from typing import TextIO

from lmgen.chat.conversation import Conversation

from lmgen.errors import ContextOverflowError

HELP = """commands:
  /help               this help
  /system TEXT        set the system prompt (empty TEXT clears it)
  /reset              forget the conversation (keeps the system prompt)
  /set NAME VALUE     change a sampling parameter, e.g. /set temperature 0.2, /set stop ["\\n\\n"]
  /params             show the sampling parameters
  /history            print the conversation
  /save FILE          save the conversation as JSON
  /load FILE          load a conversation saved with /save (or a JSON list of {role, content})
  /tokens             how much of the context window the conversation uses
  /quit               leave (Ctrl-D too)
multi-line input: end a line with \\ to continue it on the next line, or wrap text in triple quotes \"\"\".
Ctrl-C stops the current answer and returns to the prompt.
with --docs, each question's best-matching passages join that turn's system prompt ([context: ...] on stderr)."""


class ChatREPL:
    def __init__(self, llm, params, system: str | None = None, stream: bool = True, stats: bool = False,
                 out: TextIO = sys.stdout, err: TextIO = sys.stderr, retriever=None, docs_k: int = 3):
        self.llm, self.params, self.stream, self.stats = llm, params, stream, stats
        self.out, self.err = out, err
        self.conv = Conversation(system=system)
        # retrieval-augmented turns (lmgen.chat.retrieval): the passages matching each question join that turn's
        # system prompt only; the history keeps the plain messages, so old context never piles up
        self.retriever, self.docs_k = retriever, docs_k

    # ---- input ----------------------------------------------------------------------------------
    def run(self, stdin: TextIO) -> int:
        interactive = stdin.isatty()
        history = None
        if interactive:
            history = enable_line_editing()
            print(f"lmgen chat with {self.llm.model_name} (context {self.llm.context_length} tokens). /help for commands.", file=self.err)
        try:
            return self._loop(stdin, interactive)
        finally:
            if history is not None:
                save_history(history)

    def _loop(self, stdin: TextIO, interactive: bool) -> int:
        while True:
            text = self._read(stdin, interactive)
            if text is None:
                return 0
            if not text.strip():
                continue
            if text.startswith("/"):
                if self.command(text.strip()) == "quit":
                    return 0
                continue
            try:
                self.answer(text)
            except KeyboardInterrupt:  # Ctrl-C before the answer began streaming: forget the question
                if self.conv.messages and self.conv.messages[-1]["role"] == "user":
                    self.conv.messages.pop()
                print(" [interrupted]", file=self.out, flush=True)

    def _read(self, stdin: TextIO, interactive: bool) -> str | None:
        lines: list[str] = []
        in_block = False
        while True:
            if interactive:
                try:
                    line = input(">>> " if not lines else "... ")
                except EOFError:
                    return None if not lines else "\n".join(lines)
                except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line being typed, as shells do
                    print(file=self.out)
                    lines, in_block = [], False
                    continue
            else:
                line = stdin.readline()
                if not line:
                    return None if not lines else "\n".join(lines)
                line = line.rstrip("\n")
            if line.strip() == '"""':
                if in_block:
                    return "\n".join(lines)
                in_block = True
                continue
            if in_block:
                lines.append(line)
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines)

    # ---- commands -------------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/quit", "/exit"):
                return "quit"
            if name == "/help":
                print(HELP, file=self.out)
            elif name == "/system":
                self.conv.system = arg or None
                print(f"[system prompt {'set' if arg else 'cleared'}]", file=self.out)
            elif name == "/reset":
                self.conv.reset()
                print("[conversation reset]", file=self.out)
            elif name == "/set":
                field, _, value = arg.partition(" ")
                names = sorted(f.name for f in dataclasses.fields(self.params))
                if field.replace("-", "_") not in names:
                    print(f"[error: unknown parameter {field!r}; /set takes one of: {', '.join(names)}]", file=self.out)
                    return None
                try:
                    parsed = json.loads(value)
                except json.JSONDecodeError:
                    parsed = value
                self.params = self.params.replace(**{field.replace("-", "_"): parsed})
                print(f"[{field} = {parsed!r}]", file=self.out)
            elif name == "/params":
                print(self.params, file=self.out)
            elif name == "/history":
                for m in self.conv.to_messages():
                    print(f"{m['role']}: {m['content']}", file=self.out)
            elif name == "/save":
                if not arg:
                    print("[error: /save needs a file name]", file=self.out)
                    return None
                try:
                    self.conv.save(arg)
                except OSError as e:  # the message would name the temporary file the save writes first
                    print(f"[error: cannot save to {arg}: {e.strerror or type(e).__name__}]", file=self.out)
                    return None
                print(f"[saved {len(self.conv.messages)} messages to {arg}]", file=self.out)
            elif name == "/load":
                self.conv = Conversation.load(arg)
                print(f"[loaded {len(self.conv.messages)} messages from {arg}]", file=self.out)
            elif name == "/tokens":
                used = self._count(self.conv.to_messages()) if self.conv.to_messages() else 0
                print(f"[context: {used} / {self.llm.context_length} tokens used, {len(self.conv.messages)} messages]", file=self.out)
            else:
                print(f"[unknown command {name}; /help lists them]", file=self.out)
        except (ValueError, TypeError, OSError) as e:
            print(f"[error: {e}]", file=self.out)
        return None

    def _count(self, messages: list[dict]) -> int:
        return len(self.llm.render_chat(self._augment(messages)[0]))

    def _augment(self, messages: list[dict]) -> tuple[list[dict], list]:
        """The messages as the model sees them this turn: with retrieved passages when documents were given
        (at most a quarter of the context window of them)."""
        if self.retriever is None or not messages:
            return messages, []
        count = lambda text: len(self.llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return self.retriever.augment(messages, self.docs_k, count, self.llm.context_length // 4)

    # ---- a turn ---------------------------------------------------------------------------------
    def answer(self, text: str) -> None:
        self.conv.add_user(text)
        budget = self.params.max_tokens or 1
        try:
            dropped = self.conv.fit(self._count, self.llm.context_length, budget)
        except ContextOverflowError as e:
            self.conv.messages.pop()
            print(f"[error: {e}]", file=self.out)
            return
        if dropped:
            print(f"[dropped the {dropped} oldest messages to fit the {self.llm.context_length}-token context window]", file=self.out)
        before, t0 = copy.copy(self.llm.engine.stats), time.perf_counter()
        messages, passages = self._augment(self.conv.to_messages())
        if self.retriever is not None:
            found = ", ".join(f"{p.label} ({p.score:.1f})" for p in passages) or "nothing matched"
            print(f"[context: {found}]", file=self.err, flush=True)
        prompt = self.llm.render_chat(messages)
        parts: list[str] = []
        try:
            for delta in self.llm.stream(prompt, self.params):
                parts.append(delta)
                if self.stream:
                    print(delta, end="", flush=True, file=self.out)
        except KeyboardInterrupt:
            parts.append(" [interrupted]")
            print(" [interrupted]", end="", file=self.out)
        except ValueError as e:  # e.g. a prompt over the window (ContextOverflowError)
            self.conv.messages.pop()
            print(f"[error: {e}]", file=self.out)
            return
        reply = "".join(parts)
        if not self.stream:
            print(reply, end="", file=self.out)
        print(file=self.out, flush=True)
        self.conv.add_assistant(reply)
        if self.stats:
            from lmgen.cli_report import print_stats

            print_stats(self.llm, len(prompt), before, time.perf_counter() - t0, file=self.err)


def history_file() -> str | None:
    """Where the chat history lives (None: keep none)."""
    path = os.environ.get("LMGEN_HISTORY_FILE")
    if path is not None:
        return path or None
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "lmgen", "chat_history")


def enable_line_editing() -> str | None:
    """Turns on readline for input() (where Python has it) and loads the history; returns the history file."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Python built without readline: plain input() still works
        return None
    path = history_file()
    readline.set_history_length(1000)
    if path is not None:
        try:
            readline.read_history_file(path)
        except OSError:  # first session, or unreadable: start empty
            pass
    return path


def save_history(path: str) -> None:
    """Writes the session's input lines (with the earlier ones, at most 1000) to the history file."""
    import readline

    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        readline.write_history_file(path)
    except OSError as e:
        print(f"[could not save the chat history to {path}: {e.strerror}]", file=sys.stderr)
