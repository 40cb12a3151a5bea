#!/usr/bin/env bash
# README command 1: set up, then stream a completion and a chat answer from the embedded SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== completion (greedy) =="
.venv/bin/lmgen generate "The capital of France is" --max-tokens 24 --temperature 0 --stats --echo
echo
echo "== chat =="
printf 'What is the capital of France?\n用一句话介绍一下你自己。\n' | .venv/bin/lmgen chat --preset precise --seed 0 --max-tokens 64
