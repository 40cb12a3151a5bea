"""lmgen.openmp_wait: after `import lmgen`, torch loads with OpenMP's passive wait policy (whoever imports it),
unless torch was loaded first or the user chose a policy, and the environment is left as it was found; `import
lmgen` and `lmgen --help` / `--version` do not load torch at all.

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
    ("from lmgen import LLM", {}, "0", "PASSIVE"),                 # lmgen first: passive
    ("import lmgen, numpy, torch", {}, "0", "PASSIVE"),            # torch imported by someone else later: passive too
    ("import lmgen, importlib.util; importlib.util.find_spec('torch'); import torch", {}, "0", "PASSIVE"),  # a lookup first
    ("import torch, lmgen", {}, "300000", None),                   # torch first: too late, libgomp's default stays
    ("from lmgen import LLM", {"OMP_WAIT_POLICY": "ACTIVE"}, None, "ACTIVE"),  # the user's choice is kept
], ids=["lmgen-first", "torch-later", "lookup-first", "torch-first", "user-policy"])
def test_torch_loads_with_the_passive_wait_policy(code, env, spincount, policy):
    settings, out = first_libgomp_settings(code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))", **env)
    assert "GOMP_SPINCOUNT" in settings, settings  # the display is there: the check below could fail
    if spincount is not None:
        assert settings["GOMP_SPINCOUNT"] == spincount
    if policy is not None:
        assert settings["OMP_WAIT_POLICY"] == policy
    # the variable is gone again afterwards (a child process starts with the environment the user had)
    assert out.strip() == env.get("OMP_WAIT_POLICY", "None")


def test_import_lmgen_and_the_cli_help_do_not_load_torch():
    code = ("import sys, lmgen, lmgen.cli\n"
            "for argv in (['--version'], ['--help'], ['serve', '--help']):\n"
            "    try:\n"
            "        lmgen.cli.main(argv)\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, (argv, e.code)\n"
            "print('torch' in sys.modules)\n"
            "from lmgen import SamplingParams, LLM\n"  # the public names still resolve, loading torch on the way
            "print('torch' in sys.modules, LLM.__module__, SamplingParams.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["False", "True lmgen.llm lmgen.sampling.params"], proc.stdout[-500:]
