"""Prefill (512-token prompt) and decode (128 tokens) tok/s: lmgen vs transformers, same model, one run.

    .venv/bin/python benchmarks/generate_bench.py [--repeats 5] [--threads 2] [--quantization none]

Both read the embedded SmolLM2-135M-Instruct Q4_1 GGUF; transformers dequantizes it to float32 (gguf_file=),
lmgen runs it with the chosen --quantization. Medians; run on a quiet machine (2 cores are easily disturbed).
The measuring code is cpu_bench.py's (which adds llama.cpp and every quantization mode).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, workload_args  # noqa: E402
from cpu_bench import _prompts, run_lmgen, run_transformers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    workload_args(ap)
    ap.add_argument("--quantization", default="none", help="lmgen's mode: none | auto | int8 | int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompt, short = _prompts(args.prompt_tokens)
    print(f"machine: {machine()}")
    ours = run_lmgen(args.quantization, prompt, short, args.new_tokens, args.repeats)
    theirs = run_transformers(prompt, short, args.new_tokens, args.repeats)
    print(f"model: SmolLM2-135M-Instruct Q4_1 GGUF | prompt {args.prompt_tokens} tokens | decode {args.new_tokens} tokens | "
          f"median of {args.repeats}")
    print(f"{'engine':<34}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'lmgen (quantization=' + args.quantization + ')':<34}{ours['prefill']:>15.1f}{ours['decode']:>15.1f}")
    print(f"{'transformers (fp32, gguf_file=)':<34}{theirs['prefill']:>15.1f}{theirs['decode']:>15.1f}")
    print(f"{'ratio lmgen / transformers':<34}{ours['prefill'] / theirs['prefill']:>15.2f}{ours['decode'] / theirs['decode']:>15.2f}")


if __name__ == "__main__":
    main()
