"""`lmgen doctor`: what this installation runs with (versions, CPU features, the C++ kernels, threads), so that a
slow or odd start can be explained without reading code."""

from __future__ import annotations

import platform
import sys

# CPU features the kernels use: AVX2/FMA/F16C everywhere, AVX-512 VNNI (with F/BW/VL) for the integer kernels,
# AMX-INT8 tiles for their batches
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_tile", "amx_int8")


def lmgen_version() -> str:
    """The installed distribution's version, or a note where lmgen runs from a source tree that is not installed."""
    from importlib import metadata

    try:
        return metadata.version("lmgen")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def report() -> list[str]:
    """The lines `lmgen doctor` prints."""
    import os

    import torch

    import lmgen
    from lmgen.layers import kernels

    flags = kernels.cpu_flags()
    module = kernels.load_extension()
    parallel = next((line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
                     if line.startswith("ATen parallel backend")), "unknown")
    lines = [
        f"lmgen {lmgen_version()} ({os.path.dirname(lmgen.__file__)})",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"parallel backend {parallel}, CUDA {'available' if torch.cuda.is_available() else 'not available'})",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical CPUs",
        "cpu features: " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in KERNEL_FLAGS),
    ]
    if module is not None:
        lines.append(f"kernels: loaded from {kernels.module_file()} (integer kernels: {module.kernel_isa()})")
    else:
        lines.append(f"kernels: NOT loaded: {kernels.extension_error()}")
    t = kernels.tuning()
    lines.append(f"threads: torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
                 f"kernels {t.threads or torch.get_num_threads()}{' (torch' + chr(39) + 's)' if not t.threads else ''}")
    lines.append(kernels.REBUILD_HINT)
    return lines


def run() -> int:
    """Prints the report; exit status 0 when the kernels are loaded, 1 when they are not."""
    lines = report()
    print("\n".join(lines))
    return 0 if lines[5].startswith("kernels: loaded") else 1
