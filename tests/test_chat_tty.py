"""`lmgen chat` in a real terminal (pexpect pty): streaming, Ctrl-C stops an answer but not the REPL."""

from __future__ import annotations

import sys

import pexpect


def test_ctrl_c_stops_the_answer_and_the_repl_goes_on():
    child = pexpect.spawn(sys.executable, ["-m", "lmgen.cli", "chat", "--max-tokens", "400", "--temperature", "1.0",
                                           "--seed", "1", "--ignore-eos"], encoding="utf-8", timeout=240)
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
