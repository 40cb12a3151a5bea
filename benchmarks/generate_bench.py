"""Prefill (512-token prompt) and decode (128 tokens) tok/s: lmgen vs transformers, same model, same process.

    .venv/bin/python benchmarks/generate_bench.py [--repeats 5] [--threads 2] [--quantization none]

Both read the embedded SmolLM2-135M-Instruct Q4_1 GGUF; transformers dequantizes it to float32 (gguf_file=),
lmgen runs it with the chosen --quantization. Figures are medians; run on a quiet machine (2 cores are easily
disturbed). Results of a run are kept in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import embedded_gguf, machine, median_time  # noqa: E402


def bench_lmgen(prompt_ids: list[int], decode_prompt: list[int], new_tokens: int, repeats: int, quantization: str):
    from lmgen import LLM, SamplingParams

    llm = LLM(quantization=quantization, enable_prefix_caching=False)  # no cache hits between repeats
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prefill = median_time(lambda: llm.generate(prompt_ids, one), repeats)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    def decode_only() -> float:
        s0 = llm.engine.stats.decode_seconds
        llm.generate(decode_prompt, params)
        return llm.engine.stats.decode_seconds - s0  # pure decode steps: new_tokens - 1 of them

    decode_only()
    decode = sorted(decode_only() for _ in range(repeats))[repeats // 2]
    return len(prompt_ids) / prefill, (new_tokens - 1) / decode


def bench_transformers(prompt_ids: list[int], decode_prompt: list[int], new_tokens: int, repeats: int):
    from transformers import AutoModelForCausalLM

    path = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        prefill = median_time(lambda: model(ids), repeats)
        dp = torch.tensor([decode_prompt])
        mask = torch.ones_like(dp)
        first = median_time(lambda: model(dp), repeats)
        gen = median_time(lambda: model.generate(dp, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                 do_sample=False, pad_token_id=2), repeats)
    return len(prompt_ids) / prefill, (new_tokens - 1) / (gen - first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantization", default="none", help="lmgen's mode: none | auto | int8 | int4")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (args.prompt_tokens,), generator=gen).tolist()
    decode_prompt = prompt[:16]
    print(f"machine: {machine()}")
    ours = bench_lmgen(prompt, decode_prompt, args.new_tokens, args.repeats, args.quantization)
    theirs = bench_transformers(prompt, decode_prompt, args.new_tokens, args.repeats)
    print(f"model: SmolLM2-135M-Instruct Q4_1 GGUF | prompt {args.prompt_tokens} tokens | decode {args.new_tokens} tokens | "
          f"median of {args.repeats}")
    print(f"{'engine':<34}{'prefill tok/s':>15}{'decode tok/s':>15}")
    print(f"{'lmgen (quantization=' + args.quantization + ')':<34}{ours[0]:>15.1f}{ours[1]:>15.1f}")
    print(f"{'transformers (fp32, gguf_file=)':<34}{theirs[0]:>15.1f}{theirs[1]:>15.1f}")
    print(f"{'ratio lmgen / transformers':<34}{ours[0] / theirs[0]:>15.2f}{ours[1] / theirs[1]:>15.2f}")


if __name__ == "__main__":
    main()
