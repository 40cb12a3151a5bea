"""Every fenced Python block of README.md runs verbatim against the embedded model (the HTTP client block against a
real `lmgen serve`, its port being the one substitution)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)
SERVER_URL = "http://127.0.0.1:8000/v1"


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          encoding="utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 3
    assert sum(SERVER_URL in b for b in BLOCKS) == 1


@pytest.mark.parametrize("index", [i for i, b in enumerate(BLOCKS) if SERVER_URL not in b])
def test_python_block_runs(index, tmp_path):
    proc = run_block(BLOCKS[index], tmp_path)
    assert proc.returncode == 0, f"README python block {index}:\n{BLOCKS[index]}\n{proc.stderr}"
    assert proc.stdout.strip()  # every block shows something
    assert "Traceback" not in proc.stderr


def test_openai_client_block_runs_against_lmgen_serve(tmp_path):
    (code,) = [b for b in BLOCKS if SERVER_URL in b]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmgen.cli", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        proc = run_block(code.replace(SERVER_URL, f"http://127.0.0.1:{port}/v1"), tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip()
    finally:
        server.terminate()
        server.wait(timeout=60)
