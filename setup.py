"""Builds lmgen's C++ kernels (src/lmgen/csrc) into the extension module `lmgen.kernels_ext` when lmgen is installed.

The metadata lives in pyproject.toml; this file only adds the extension.  The build needs the torch that lmgen
pins (2.13.0) importable, so install with `pip install --no-build-isolation -e .` after installing torch,
setuptools and ninja (scripts/setup.sh does exactly that); with build isolation pip would download torch a second
time for the build.  After editing src/lmgen/csrc rebuild in place with `python setup.py build_ext --inplace`
(or the same pip command).  Beside the module the build writes kernels_ext.json (hash of the sources, torch
version, flags), so that lmgen refuses a module built from other sources or for another torch
(lmgen.layers.kernels).  On a CPU other than x86-64 nothing is built: the kernels are AVX2 code.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
CSRC = HERE / "src" / "lmgen" / "csrc"
EXT_NAME = "lmgen.kernels_ext"
# The same flags as the former JIT build: AVX2/FMA/F16C everywhere; the AVX-512 VNNI kernels carry their own
# target attribute (csrc/quant_kernels.h) and are chosen at run time; OpenMP as torch's CPU build uses it.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-g0"]
LDFLAGS = ["-fopenmp"]


def sources_digest(csrc: Path) -> str:
    """sha256 over the names and bytes of every .cpp/.h in csrc (lmgen.layers.kernels computes the same)."""
    h = hashlib.sha256()
    for f in sorted(p for p in csrc.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def extensions_and_commands():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"lmgen: not building the C++ kernels on {platform.machine()} (they are x86-64 AVX2 code)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    class BuildKernels(BuildExtension):
        """BuildExtension that says what it builds and records the build beside the module."""

        def build_extensions(self):
            # Python's own CFLAGS come first on the line; -fwrapv (signed overflow wraps) can stop loop
            # optimisations the JIT build had, -g only adds size: drop both, as the former JIT build had neither
            self.compiler.compiler_so = [f for f in self.compiler.compiler_so if f not in ("-fwrapv", "-g")]
            super().build_extensions()

        def build_extension(self, ext):
            print(f"lmgen: compiling the C++ kernels ({ext.name}, g++ {' '.join(CFLAGS)}); about a minute")
            super().build_extension(ext)
            record = {"sources_sha256": sources_digest(CSRC), "torch": torch.__version__, "cflags": CFLAGS}
            Path(self.get_ext_fullpath(ext.name)).with_name("kernels_ext.json").write_text(json.dumps(record) + "\n")
            print(f"lmgen: built the C++ kernels: {self.get_ext_fullpath(ext.name)}")

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()  # in-place and editable builds: the module, then its record
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                record = Path(regular_file).with_name("kernels_ext.json")
                if record.exists():
                    shutil.copyfile(record, Path(inplace_file).with_name("kernels_ext.json"))

    ext = CppExtension(EXT_NAME, [os.path.relpath(CSRC / "quant_kernels.cpp", HERE)],
                       extra_compile_args=CFLAGS, extra_link_args=LDFLAGS,
                       optional=True)  # no compiler: lmgen installs, runs without them and says so
    return [ext], {"build_ext": BuildKernels}


ext_modules, cmdclass = extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
