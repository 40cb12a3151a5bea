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
"""

from __future__ import annotations

import os
import sys


def import_torch_with_passive_wait() -> bool:
    """Imports torch, with OMP_WAIT_POLICY=PASSIVE while it loads unless torch is already loaded or the user set
    the policy; returns whether the passive policy was applied."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        import torch  # noqa: F401

        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        import torch  # noqa: F401
    finally:
        del os.environ["OMP_WAIT_POLICY"]
    return True
