"""The C++ kernels are built at install time and only imported at run time: a start never compiles, never waits on a
lock, survives an earlier start killed mid-way, and a missing or stale build is said in one line (`lmgen doctor`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmgen
from lmgen.layers import kernels

COMPILERS = ("c++", "g++", "gcc", "cc", "clang", "clang++", "ninja", "x86_64-linux-gnu-g++", "x86_64-linux-gnu-gcc")
PACKAGE = Path(lmgen.__file__).parent


def fake_compilers(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of compiler/ninja stand-ins that record being run (and fail), and the record's path."""
    bindir, marker = tmp_path / "fakebin", tmp_path / "compiler-ran"
    bindir.mkdir()
    for name in COMPILERS:
        tool = bindir / name
        tool.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {marker}\nexit 1\n")
        tool.chmod(0o755)
    return bindir, marker


def env_with(**changes: str) -> dict:
    env = dict(os.environ)
    env.update(changes)
    return env


def test_a_start_killed_mid_way_then_a_start_that_compiles_nothing(tmp_path):
    bindir, marker = fake_compilers(tmp_path)
    ext_dir = tmp_path / "torch_extensions"
    ext_dir.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = env_with(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", CXX=str(bindir / "c++"), CC=str(bindir / "cc"),
                   TORCH_EXTENSIONS_DIR=str(ext_dir))
    argv = [sys.executable, "-m", "lmgen.cli", "generate", "The capital of France is", "--max-tokens", "4", "--temperature", "0"]

    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.0)  # in the middle of the start (imports, loading)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)

    # the interpreter run directly (.venv/bin/python) and as from an activated venv (its bin first on PATH)
    for run_env in (env, env_with(**{**env, "PATH": f"{bindir}{os.pathsep}{venv_bin}{os.pathsep}{os.environ['PATH']}",
                                     "VIRTUAL_ENV": str(Path(venv_bin).parent)})):
        proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=300)  # a hang fails here
        assert proc.returncode == 0, proc.stderr
        assert "Paris" in proc.stdout
        assert "unavailable" not in proc.stderr  # the packed kernels were used
    assert not marker.exists(), marker.read_text()  # no compiler or ninja ran
    assert list(ext_dir.iterdir()) == []  # and nothing was built or locked in torch's extension cache


def doctor(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmgen.cli", "doctor"], env=env, capture_output=True, text=True,
                          timeout=300)


def test_doctor_reports_kernels_cpu_threads_and_versions():
    proc = doctor(dict(os.environ))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import importlib.metadata

    import torch

    assert f"lmgen {importlib.metadata.version('lmgen')}" in proc.stdout
    assert f"torch {torch.__version__}" in proc.stdout
    module = kernels.load_extension()
    assert module is not None, kernels.extension_error()
    assert f"kernels: loaded from {module.__file__} (integer kernels: {module.kernel_isa()})" in proc.stdout
    assert Path(module.__file__).parent == PACKAGE  # the module built beside the package, not a JIT cache
    flags = kernels.cpu_flags()
    for flag in ("avx2", "f16c", "avx512_vnni"):
        assert f"{flag}={'yes' if flag in flags else 'no'}" in proc.stdout
    assert f"threads: torch {torch.get_num_threads()}" in proc.stdout
    assert "pip install --no-build-isolation -e ." in proc.stdout  # the rebuild command


def copy_package(tmp_path: Path, with_module: bool) -> Path:
    """A copy of the lmgen package (sources; the built module and its record only if asked) under tmp_path/src."""
    dest = tmp_path / "src" / "lmgen"
    built = [p.name for p in PACKAGE.iterdir() if p.name.startswith("kernels_ext")]
    shutil.copytree(PACKAGE, dest, ignore=shutil.ignore_patterns("__pycache__", *([] if with_module else built)))
    return dest


def assert_one_line_unavailable(proc: subprocess.CompletedProcess, reason: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    kernels_line = next(line for line in proc.stdout.splitlines() if line.startswith("kernels: NOT loaded: "))
    assert reason in kernels_line
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "C++ kernels unavailable" in lines[0] and reason in lines[0], proc.stderr
    assert "10-100x slower" in lines[0] and len(lines[0]) < 300  # what it costs, not a multi-KB build log


def test_disabled_missing_and_stale_kernels_are_said_in_one_line(tmp_path):
    assert_one_line_unavailable(doctor(env_with(LMGEN_QUANT_KERNELS="0")), "disabled by LMGEN_QUANT_KERNELS=0")

    bare = copy_package(tmp_path / "bare", with_module=False)
    assert_one_line_unavailable(doctor(env_with(PYTHONPATH=str(bare.parent))), "lmgen.kernels_ext is not built")

    stale = copy_package(tmp_path / "stale", with_module=True)
    with open(stale / "csrc" / "fused_ops.h", "a") as f:
        f.write("\n// edited after the build\n")
    assert_one_line_unavailable(doctor(env_with(PYTHONPATH=str(stale.parent))), "lmgen.kernels_ext was built from other sources than lmgen/csrc")
