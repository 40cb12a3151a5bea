"""The compiled C++ extension (src/lmgen/csrc, built at install time as `lmgen.kernels_ext`): loaded once per
process, and its tuning.

Build: setup.py, when lmgen is installed (`pip install --no-build-isolation -e .`, scripts/setup.sh) or in place
(`python setup.py build_ext --inplace`), with g++ -O3 -mavx2 -mfma -mf16c -fopenmp; the AVX-512 VNNI kernels are
chosen at run time.  At run time this module only imports the built module: nothing is compiled, no lock, no
cache directory.  It refuses a module built from other sources than the csrc beside it or for another torch (the
build's record, kernels_ext.json).  Without the module, on a CPU without AVX2/FMA/F16C, or with
LMGEN_QUANT_KERNELS=0 `load_extension()` returns None, one line says so, and callers fall back to PyTorch
(dequantized float layers, plain ops).  The extension's thread pool and thresholds are process-wide, like
PyTorch's own thread settings; `KernelTuning` names them, `configure` changes them (defaults from LMGEN_QUANT_*).
`lmgen doctor` reports all of this.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("lmgen.layers.quant")  # the name users filtered on before this module existed

_ISA_CODES = {"auto": 0, "avx2": 1, "avx512vnni": 2}


def _env(name: str, default: int) -> int:
    return int(os.environ.get("LMGEN_QUANT_" + name, str(default)))


@dataclass(frozen=True)
class KernelTuning:
    """The packed kernels' thresholds and threading (benchmarks/matmul_candidates.py has the measurements)."""

    # batches of at least this many rows dequantize a weight tile and call at::mm instead of the integer kernels;
    # 0 = never (they beat dequantize + MKL sgemm at every batch measured); batch-invariant layers never do
    r8_dequant_min_batch: int = 0
    tile_rows: int = 4096  # rows of weight dequantized at once on that path (fp32 tile of tile_rows x in)
    min_units: int = 1024  # work per chunk handed to a thread (8-row groups x blocks of 32 x batch rows; ~5 us)
    # calls with less work than this (~10 us) run on the calling thread alone.  A decode-time layer matmul of a
    # small model (SmolLM2-135M: 3,456-13,824 units) is memory-bound: one core's share of the bandwidth limits it,
    # and on the 2-vCPU test host with its bandwidth halved by neighbours (7.9 GB/s one thread, 15 GB/s two)
    # spreading those calls over both threads took decode from 65 to 86 tok/s (16384 kept them on one thread)
    parallel_min_units: int = 2048
    threads: int = 0  # threads for the kernels; 0: torch.get_num_threads()
    spin_us: int = 0  # how long idle helpers spin before sleeping (spinning cost ~10% on a 2-vCPU machine)
    # integer kernels: "auto" (the best the CPU has: AMX-INT8 tiles for batches of 16+ rows, AVX-512 VNNI, AVX2),
    # "avx512vnni" (no AMX) or "avx2"; every choice gives a row the same result at any batch size
    isa: str = "auto"

    def __post_init__(self) -> None:
        if self.isa not in _ISA_CODES:
            raise ValueError(f"isa must be one of {sorted(_ISA_CODES)}, got {self.isa!r}")

    @classmethod
    def from_env(cls) -> "KernelTuning":
        d = cls()
        return cls(_env("R8_DEQUANT_MIN_BATCH", d.r8_dequant_min_batch), _env("TILE_ROWS", d.tile_rows),
                   _env("MIN_UNITS", d.min_units),
                   _env("PARALLEL_MIN_UNITS", d.parallel_min_units), _env("THREADS", d.threads),
                   _env("SPIN_US", d.spin_us), os.environ.get("LMGEN_QUANT_ISA", d.isa))

    def _args(self) -> tuple:
        """In the order the extension's set_tuning takes them."""
        return (self.r8_dequant_min_batch, self.tile_rows, self.min_units,
                self.parallel_min_units, self.threads, self.spin_us, _ISA_CODES[self.isa])


MODULE_NAME = "lmgen.kernels_ext"
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
REBUILD_HINT = "rebuild: pip install --no-build-isolation -e . (or python setup.py build_ext --inplace) in the lmgen checkout"
_lock = threading.Lock()
_tuning = KernelTuning.from_env()
_state: dict = {}  # "module" and "error" once load_extension ran (guarded by _lock)


def tuning() -> KernelTuning:
    """The settings in force."""
    return _tuning


def configure(**changes) -> KernelTuning:
    """Changes some `KernelTuning` fields at run time (ValueError for a bad value); returns the settings that
    were in force before, so a caller can restore them with `configure(**dataclasses.asdict(before))`."""
    global _tuning
    before = _tuning
    _tuning = dataclasses.replace(_tuning, **{k: (v if k == "isa" else int(v)) for k, v in changes.items()})
    if _state.get("module") is not None:
        _state["module"].set_tuning(*_tuning._args())
    return before


def extension_error() -> str | None:
    """Why the extension is unavailable (None while it is available or not yet tried)."""
    return _state.get("error")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return set()


def _cpu_problem() -> str | None:
    """Why this CPU cannot run the kernels, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU is {platform.machine()}, the kernels are x86-64 AVX2 code"
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        cap = "unknown"
    if cap not in ("AVX2", "AVX512"):
        return f"CPU lacks AVX2/FMA (torch reports {cap})"
    flags = cpu_flags()
    if flags and "f16c" not in flags:  # AVX2 capability in torch implies FMA; F16C is checked here
        return "CPU lacks F16C"
    return None


def sources_digest(csrc: Path = CSRC_DIR) -> str | None:
    """sha256 over the names and bytes of every .cpp/.h in csrc, as setup.py records it; None without sources."""
    try:
        files = sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))
    except OSError:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest() if files else None


def _record_problem(module_file: str) -> str | None:
    """Why the built module at `module_file` does not match these sources or this torch (its kernels_ext.json)."""
    try:
        record = json.loads(Path(module_file).with_name("kernels_ext.json").read_text())
    except (OSError, ValueError):
        return "has no readable build record (kernels_ext.json)"
    if record.get("torch") != torch.__version__:
        return f"was built for torch {record.get('torch')}, this is torch {torch.__version__}"
    digest = sources_digest()
    if digest is not None and record.get("sources_sha256") != digest:
        return "was built from other sources than lmgen/csrc (edited since the build)"
    return None


def _find_module() -> tuple[object | None, str | None]:
    """(module, None) or (None, why not); imports the built module without loading a mismatched one."""
    if os.environ.get("LMGEN_QUANT_KERNELS", "1") == "0":
        return None, "disabled by LMGEN_QUANT_KERNELS=0"
    problem = _cpu_problem()
    if problem is not None:
        return None, problem
    spec = importlib.util.find_spec(MODULE_NAME)
    if spec is None or spec.origin is None:
        return None, f"{MODULE_NAME} is not built"
    problem = _record_problem(spec.origin)
    if problem is not None:
        return None, f"{MODULE_NAME} {problem}"
    try:
        module = importlib.import_module(MODULE_NAME)
    except ImportError as exc:  # e.g. an undefined symbol after torch changed
        return None, f"{MODULE_NAME} does not load: {str(exc)[:200]}"
    module.set_tuning(*_tuning._args())
    return module, None


def load_extension():
    """The compiled module, or None if unavailable (reason in `extension_error()`, said once on stderr)."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" not in _state:
            module, error = _find_module()
            _state.update(module=module, error=error)
            if error is not None:
                logger.warning("lmgen: C++ kernels unavailable (%s): packed GGUF weights are dequantized to "
                               "float32 (5x the memory) and decoding is 10-100x slower; `lmgen doctor` explains", error)
        return _state["module"]


def module_file() -> str | None:
    """Where the loaded extension came from (None while it is not loaded)."""
    module = load_extension()
    return getattr(module, "__file__", None) if module is not None else None


def kernels_available() -> bool:
    """True when the compiled packed-weight kernels can be used (loads them on first call)."""
    return load_extension() is not None


def fused_ops():
    """The extension's fused float32 decode ops (rms_norm, add_rms_norm, silu_mul, gelu_tanh_mul, paged_attention,
    see csrc/fused_ops.h), or None where it is unavailable (callers then use plain PyTorch ops)."""
    return load_extension()
