"""lmgen.openmp_wait: `import lmgen` loads torch with OpenMP's passive wait policy, unless torch was loaded first
or the user chose a policy, and leaves the environment as it found it.

The oracle is libgomp itself: with OMP_DISPLAY_ENV=VERBOSE each libgomp prints the settings it initialized with
(GOMP_SPINCOUNT = '0' is the passive policy, '300000' the default spin).  torch's libgomp is the first to load, so
its block is the first printed (a tokenizer library may bundle a second libgomp later)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


def first_libgomp_settings(code: str, **env: str) -> tuple[dict[str, str], str]:
    """Runs `code` in a fresh interpreter -> (the first libgomp's settings, the process's stdout)."""
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    full.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr
    block = proc.stderr.split("OPENMP DISPLAY ENVIRONMENT END")[0]
    return dict(re.findall(r"^\s*(\w+) = '([^']*)'", block, re.M)), proc.stdout


@pytest.mark.parametrize("code, env, spincount, policy", [
    ("import lmgen", {}, "0", "PASSIVE"),                          # lmgen first: passive
    ("import torch, lmgen", {}, "300000", None),                   # torch first: too late, libgomp's default stays
    ("import lmgen", {"OMP_WAIT_POLICY": "ACTIVE"}, None, "ACTIVE"),  # the user's choice is kept
], ids=["lmgen-first", "torch-first", "user-policy"])
def test_torch_loads_with_the_passive_wait_policy(code, env, spincount, policy):
    settings, out = first_libgomp_settings(code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))", **env)
    assert "GOMP_SPINCOUNT" in settings, settings  # the display is there: the check below could fail
    if spincount is not None:
        assert settings["GOMP_SPINCOUNT"] == spincount
    if policy is not None:
        assert settings["OMP_WAIT_POLICY"] == policy
    # the variable is gone again afterwards (a child process starts with the environment the user had)
    assert out.strip() == env.get("OMP_WAIT_POLICY", "None")
