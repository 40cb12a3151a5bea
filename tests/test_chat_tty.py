"""`lmgen chat` in a real terminal (pexpect pty): streaming, Ctrl-C stops an answer but not the REPL, readline
editing and history, and the REPL's error lines."""

from __future__ import annotations

import os
import sys

import pexpect


def test_ctrl_c_stops_the_answer_and_the_repl_goes_on():
    child = pexpect.spawn(sys.executable, ["-m", "lmgen.cli", "chat", "--max-tokens", "400", "--temperature", "1.0",
                                           "--seed", "1", "--ignore-eos"], encoding="utf-8", timeout=240,
                          env={**os.environ, "LMGEN_HISTORY_FILE": ""})  # keep no history in the real home
    try:
        child.expect_exact(">>> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect_exact("dragon.\r\n")  # the terminal's echo of the line
        child.expect(r"\w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()  # Ctrl-C
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline("/tokens")
        child.expect(r"\[context: \d+ / 8192 tokens used, 2 messages\]")  # the partial answer was kept
        child.expect_exact(">>> ")
        child.sendintr()  # Ctrl-C at the prompt: just a new prompt
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_line_editing_history_set_and_save_errors(tmp_path):
    """readline at the prompt (Ctrl-A, the up arrow, a history file kept for the next session); `/set` with an
    unknown name lists the valid ones; a failed `/save` names the user's path, not the temporary file."""
    from dataclasses import fields

    from lmgen import SamplingParams

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("LMGEN_HISTORY_FILE", None)
    child = pexpect.spawn(sys.executable, ["-m", "lmgen.cli", "chat", "--max-tokens", "8"], env=env, encoding="utf-8",
                          timeout=240)
    try:
        child.expect_exact(">>> ")
        child.send("okens" + "\x01" + "/t" + "\r")  # Ctrl-A: to the start of the line, then insert "/t"
        child.expect_exact("[context: 0 / 8192 tokens used, 0 messages]")
        child.expect_exact(">>> ")
        child.send("\x1b[A" + "\r")  # up arrow: the previous line again
        child.expect_exact("[context: 0 / 8192 tokens used, 0 messages]")
        child.expect_exact(">>> ")
        child.sendline("/set temprature 0.5")
        child.expect(r"unknown parameter 'temprature'; /set takes one of: ([^\]]+)\]")
        assert child.match.group(1).split(", ") == sorted(f.name for f in fields(SamplingParams))
        child.expect_exact(">>> ")
        missing = tmp_path / "no-such-dir" / "chat.json"
        child.sendline(f"/save {missing}")
        child.expect(r"\[error: cannot save to (.+?): No such file or directory\]")
        assert child.match.group(1) == str(missing)
        child.expect_exact(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    history = (tmp_path / "state" / "lmgen" / "chat_history").read_text(encoding="utf-8").splitlines()
    assert "/tokens" in history and "/set temprature 0.5" in history
