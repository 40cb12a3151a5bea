"""Loads torch with OpenMP's passive wait policy, so that torch's idle OpenMP workers do not hold the cores that
lmgen's kernels need.

torch's own ops in a step (the embedding scale, a residual add, a concatenation, the sampler's softmax) run as
OpenMP regions, and after each one libgomp's default keeps the worker spinning for 300,000 pauses, milliseconds on
this hardware, while the next packed matmul wants that core for the share pool's helper (csrc/share_pool.h).  On
the project's 2-vCPU machine a 512-token Gemma 3 270M prefill ran at ~800 tok/s with the default and ~1,150 with
the passive policy; decode speed did not move.  libgomp reads the environment once, when torch loads it, so this
only works before the first `import torch`; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone.  The
variable is removed again afterwards: child processes (a llama.cpp peer in a benchmark, a user's tools) start with
the environment they had.

`import lmgen` does not import torch itself (the command line's --help and --version answer without torch's ~2.5 s):
it puts a finder on sys.meta_path that wraps whichever import of torch comes first, by lmgen or anyone else.
"""

from __future__ import annotations

import importlib.abc
import os
import sys


def policy_chosen() -> bool:
    """Whether the user set OpenMP's wait policy (then it is theirs to keep)."""
    return "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ


def install_passive_wait() -> bool:
    """Arranges for torch to load with OMP_WAIT_POLICY=PASSIVE, unless it is loaded already; returns whether the
    finder was installed (it leaves sys.meta_path once torch has loaded)."""
    if "torch" in sys.modules or any(isinstance(f, PassiveWaitFinder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, PassiveWaitFinder())
    return True


class PassiveWaitFinder(importlib.abc.MetaPathFinder):
    """Finds `torch` through the other finders and hands back its spec with the loader wrapped; a lookup alone
    (transformers' `importlib.util.find_spec("torch")`) loads nothing, so the finder stays until torch loads."""

    def find_spec(self, name, path, target=None):
        if name != "torch" or policy_chosen():
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None:
            spec.loader = PassiveWaitLoader(spec.loader, self)
        return spec


class PassiveWaitLoader(importlib.abc.Loader):
    """torch's own loader, run with OMP_WAIT_POLICY=PASSIVE in the environment (libgomp loads inside it)."""

    def __init__(self, loader, finder: PassiveWaitFinder):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # torch sees its own loader
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)  # torch loads once per process
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            self.loader.exec_module(module)
        finally:
            os.environ.pop("OMP_WAIT_POLICY", None)
