"""A hostile chat template, inside a GGUF file (written with gguf's own gguf-new-metadata tool) or given by
the operator with --chat-template, ends `lmgen generate --chat` with exactly one `lmgen: error:` line and
exit 1, within its time limit, instead of hanging or eating memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

HOSTILE = {
    "time": "{% for i in range(100000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}{{ messages[0].content }}",
    "size": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
}
EXPECTED = {"time": "longer than 5 s", "size": "passed 10000000 characters"}


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lmgen.cli", *args], capture_output=True, text=True, timeout=300,
                          encoding="utf-8")
    return proc, time.monotonic() - t0


def _assert_one_error_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lmgen: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-2000:]


@pytest.fixture(scope="module")
def hostile_ggufs(gguf_path, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    out = {}
    for kind, template in HOSTILE.items():
        (folder / f"{kind}.jinja").write_text(template)
        out[kind] = folder / f"{kind}.gguf"
        subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf_path), str(out[kind]),
                        "--chat-template-file", str(folder / f"{kind}.jinja"), "--force"],
                       check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_template_inside_a_gguf(hostile_ggufs, kind):
    proc, took = _run("generate", "--chat", "Hi", "--model", str(hostile_ggufs[kind]), "--max-tokens", "2")
    _assert_one_error_line(proc, EXPECTED[kind])
    assert took < 240  # the render stops at its 5 s limit; the rest is loading the model


def test_hostile_template_file_from_the_operator(tmp_path):
    template = tmp_path / "loops.jinja"
    template.write_text(HOSTILE["time"])
    proc, _ = _run("generate", "--chat", "Hi", "--chat-template", str(template), "--max-tokens", "2")
    _assert_one_error_line(proc, EXPECTED["time"])
