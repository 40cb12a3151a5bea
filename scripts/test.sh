#!/usr/bin/env bash
# README command 2: set up with the test extras, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q --durations=15 "$@"  # the slowest tests listed: the suite must stay under 20 min
