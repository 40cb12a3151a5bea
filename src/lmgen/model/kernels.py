"""The compiled C++ extension (src/lmgen/csrc): built at first use, loaded once per process, and its tuning.

Build: torch.utils.cpp_extension (g++ -O3 -mavx2 -mfma -mf16c -fopenmp, ninja), cached under
$TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/<py>_cpu/lmgen_quant_kernels_<source hash>; the first build
takes about a minute.  Without a compiler or on a CPU without AVX2 `load_extension()` returns None and callers
fall back to PyTorch (dequantized float layers, plain ops).  LMGEN_QUANT_KERNELS=0 disables the extension,
LMGEN_QUANT_VERBOSE=1 shows the build.  The extension's thread pool and thresholds are process-wide, like
PyTorch's own thread settings; `KernelTuning` names them, `configure` changes them (defaults from LMGEN_QUANT_*).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("lmgen.model.quant")  # the name users filtered on before this module existed

_ISA_CODES = {"auto": 0, "avx2": 1}


def _env(name: str, default: int) -> int:
    return int(os.environ.get("LMGEN_QUANT_" + name, str(default)))


@dataclass(frozen=True)
class KernelTuning:
    """The packed kernels' thresholds and threading (benchmarks/matmul_candidates.py has the measurements)."""

    # K-quants: batches of at least this many rows dequantize a weight tile and call at::mm instead of the fused
    # dequantize-and-dot kernel (crossover measured at 8-16 rows for Q6_K / Q4_K, 2048 x 2048, 1 thread)
    dequant_min_batch: int = 16
    # the same switch for Q4_0/Q4_1/Q8_0's integer kernels; 0 = never (they beat dequantize + MKL sgemm at
    # every batch measured)
    r8_dequant_min_batch: int = 0
    tile_rows: int = 4096  # rows of weight dequantized at once on that path (fp32 tile of tile_rows x in)
    min_units: int = 1024  # work per chunk handed to a thread (8-row groups x blocks of 32 x batch rows; ~5 us)
    # calls with less work than this (16384 ~ 80 us: every decode-time layer matmul of a small model) run on
    # the calling thread alone: waking a helper costs about as much as it saves and competes with torch's threads
    parallel_min_units: int = 16384
    threads: int = 0  # threads for the kernels; 0: torch.get_num_threads()
    spin_us: int = 0  # how long idle helpers spin before sleeping (spinning cost ~10% on a 2-vCPU machine)
    isa: str = "auto"  # integer kernels: "auto" (AVX-512 VNNI where the CPU has it, else AVX2) or "avx2"

    def __post_init__(self) -> None:
        if self.isa not in _ISA_CODES:
            raise ValueError(f"isa must be one of {sorted(_ISA_CODES)}, got {self.isa!r}")

    @classmethod
    def from_env(cls) -> "KernelTuning":
        d = cls()
        return cls(_env("DEQUANT_MIN_BATCH", d.dequant_min_batch), _env("R8_DEQUANT_MIN_BATCH", d.r8_dequant_min_batch),
                   _env("TILE_ROWS", d.tile_rows), _env("MIN_UNITS", d.min_units),
                   _env("PARALLEL_MIN_UNITS", d.parallel_min_units), _env("THREADS", d.threads),
                   _env("SPIN_US", d.spin_us), os.environ.get("LMGEN_QUANT_ISA", d.isa))

    def _args(self) -> tuple:
        """In the order the extension's set_tuning takes them."""
        return (self.dequant_min_batch, self.r8_dequant_min_batch, self.tile_rows, self.min_units,
                self.parallel_min_units, self.threads, self.spin_us, _ISA_CODES[self.isa])


_CSRC = Path(__file__).resolve().parent.parent / "csrc" / "quant_kernels.cpp"
_CSRC_FILES = (_CSRC, _CSRC.with_suffix(".h"), _CSRC.parent / "share_pool.h", _CSRC.parent / "fused_ops.h")
_lock = threading.Lock()
_tuning = KernelTuning.from_env()
_module = None
_error: str | None = None


def tuning() -> KernelTuning:
    """The settings in force."""
    return _tuning


def configure(**changes) -> KernelTuning:
    """Changes some `KernelTuning` fields at run time (ValueError for a bad value); returns the settings that
    were in force before, so a caller can restore them with `configure(**dataclasses.asdict(before))`."""
    global _tuning
    before = _tuning
    _tuning = dataclasses.replace(_tuning, **{k: (v if k == "isa" else int(v)) for k, v in changes.items()})
    if _module is not None:
        _module.set_tuning(*_tuning._args())
    return before


def extension_error() -> str | None:
    """Why the extension is unavailable (None while it is available or not yet tried)."""
    return _error


def _cpu_ok() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        return False
    if cap not in ("AVX2", "AVX512"):
        return False
    try:  # AVX2 capability in torch implies FMA; F16C is checked separately where we can
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "f16c" in line.split()
    except OSError:  # pragma: no cover
        pass
    return True


def load_extension():
    """The compiled module, building it on first use; None if unavailable (reason in `extension_error()`)."""
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("LMGEN_QUANT_KERNELS", "1") == "0":
            _error = "disabled by LMGEN_QUANT_KERNELS=0"
        elif not _cpu_ok():
            _error = "CPU lacks x86-64 AVX2/FMA/F16C"
        else:
            try:
                from torch.utils import cpp_extension

                # torch finds `ninja` on PATH; the `ninja` wheel puts it beside this interpreter (.venv/bin),
                # which is not on PATH when .venv/bin/python is run without activating the venv.
                bindir = os.path.dirname(sys.executable)
                if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
                    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

                # One build per source version (hash in the name): processes running different checkouts
                # never rebuild over each other or load a stale module; torch's cache keys on the .cpp only.
                cflags, ldflags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], ["-fopenmp"]
                digest = hashlib.sha1(b"".join(f.read_bytes() for f in _CSRC_FILES)
                                      + " ".join(cflags + ldflags).encode()).hexdigest()[:12]
                module = cpp_extension.load(
                    name=f"lmgen_quant_kernels_{digest}",
                    sources=[str(_CSRC)],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    verbose=os.environ.get("LMGEN_QUANT_VERBOSE", "0") == "1",
                )
                module.set_tuning(*_tuning._args())
                _module = module
            except Exception as exc:  # no compiler, no ninja, build error
                _error = f"building {_CSRC.name} failed: {type(exc).__name__}: {str(exc)[-2000:]}"
        if _error is not None:
            logger.warning("lmgen quant kernels unavailable (%s); packed GGUF weights will be dequantized", _error)
        return _module


def kernels_available() -> bool:
    """True when the compiled packed-weight kernels can be used (builds them on first call)."""
    return load_extension() is not None


def fused_ops():
    """The extension's fused float32 decode ops (rms_norm, add_rms_norm, silu_mul, decode_attention, see
    csrc/fused_ops.h), or None where it is unavailable (callers then use plain PyTorch ops)."""
    return load_extension()
