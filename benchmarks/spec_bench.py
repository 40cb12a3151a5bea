"""Speculative decoding on the embedded SmolLM2 (issue 14), batch 1, greedy, 128 new tokens:

  self   float32 target (quantization="none") with the packed Q4_1 weights as its draft, vs the plain float path;
  ngram  n-gram prompt lookup on the default (packed) path, on an input-grounded task (rewrite a ~300-token
         passage given in the prompt), vs plain decoding on the same path.

Plain and speculative runs are interleaved in one process, `--rounds` times; each prints decode tok/s (tokens after
the first step over the time after it), end-to-end tok/s, the acceptance rate, and whether the greedy text equals the
plain one. The table reports medians and their ratios. The host may be shared: the load average is printed."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from lmgen import LLM, SamplingParams  # before torch: torch then loads with OpenMP's passive wait, as users get it

import torch

from common import machine

PASSAGE = (
    "The lighthouse at Point Reyes was built in 1870 to warn ships away from the rocky headland, one of the foggiest "
    "places on the Pacific coast. Its first-order Fresnel lens, made in France, was carried up the cliff in pieces and "
    "assembled by hand. For more than a century, keepers lived in a small house above the station, climbing the three "
    "hundred steps every evening to light the lamp and every morning to draw the curtains that kept the sun from "
    "cracking the glass. The work was lonely and hard. Fog could settle for weeks, and the keepers ran the fog signal "
    "day and night, feeding coal to the boilers that drove the steam whistle. In 1975 the Coast Guard installed an "
    "automated light on a nearby building, and the old lens was retired. Today the lighthouse is part of a national "
    "seashore. Visitors walk down the steps to see the lens, which still turns on special evenings, and rangers tell "
    "the stories of the keepers and the shipwrecks that made the light necessary. In winter, people also come to the "
    "headland to watch gray whales migrating south along the coast, close enough to see them blow."
)
TASKS = {
    "self": [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    "ngram": [{"role": "user", "content": f"{PASSAGE}\n\nRewrite the passage above in your own words, keeping every fact."}],
}


def timed(llm: LLM, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, float]:
    """(token ids, decode tok/s after the first step, end-to-end tok/s)."""
    t0 = time.perf_counter()
    tokens, t_first, first_n = [], None, 0
    for so in llm.stream_outputs(prompt, params):
        tokens.extend(so.new_token_ids)
        if t_first is None:
            t_first, first_n = time.perf_counter(), len(tokens)
    t1 = time.perf_counter()
    return tokens, (len(tokens) - first_n) / (t1 - t_first), len(tokens) / (t1 - t0)


def batch_sweep(args, params: SamplingParams) -> None:
    """The measurement behind the auto step-back's `max_batch`: n-gram speculation (step-back off) vs plain decoding
    on the default path for batches of B input-grounded requests, aggregate tok/s, interleaved."""
    plain = LLM()
    fast = LLM(speculative={"method": "ngram", "num_tokens": args.num_tokens, "max_batch": 1 << 20,
                            "min_acceptance": 0.0})
    asks = ["Rewrite the passage above in your own words, keeping every fact.", "Summarize the passage above.",
            "List the facts in the passage above.", "Retell the passage above for a child."]
    for b in args.batch_sweep:
        prompts = [plain.render_chat([{"role": "user", "content": f"{PASSAGE}\n\n{asks[i % 4]} ({i})"}]) for i in range(b)]
        ratios = []
        for r in range(args.rounds):
            rates = {}
            for label, llm in (("plain", plain), ("spec", fast)):
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params)
                rates[label] = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
            ratios.append(rates["spec"] / rates["plain"])
            print(f"batch {b} round {r + 1}: plain {rates['plain']:.1f} tok/s, ngram {rates['spec']:.1f} tok/s "
                  f"({ratios[-1]:.2f}x) | load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"batch {b}: median ratio {statistics.median(ratios):.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-tokens", type=int, default=None,
                    help="k (default: the method's, lmgen.spec.config.DEFAULT_NUM_TOKENS)")
    ap.add_argument("--only", choices=sorted(TASKS), default=None)
    ap.add_argument("--batch-sweep", type=lambda v: [int(x) for x in v.split(",")], default=None, metavar="B,B,...",
                    help="instead: n-gram vs plain at these batch sizes (the step-back measurement)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    if args.batch_sweep:
        print(machine(), "| load average", os.getloadavg(), flush=True)
        batch_sweep(args, params)
        return 0
    setups = {
        "self": ("none", {"method": "self", "num_tokens": args.num_tokens}),  # None: the method's default
        "ngram": ("auto", {"method": "ngram", "num_tokens": args.num_tokens}),
    }
    print(machine(), "| load average", os.getloadavg(), flush=True)
    summary = []
    for name, (quant, spec) in setups.items():
        if args.only and name != args.only:
            continue
        plain, fast = LLM(quantization=quant), LLM(quantization=quant, speculative=spec)
        prompt = plain.render_chat(TASKS[name])
        rows = {"plain": [], "spec": []}
        acc, same, paired, steps = [], True, [], {}
        want = None
        for r in range(args.rounds):
            for label, llm in (("plain", plain), ("spec", fast)):
                stats = llm.engine.speculator.stats if llm.engine.speculator else None
                before = (stats.draft_tokens, stats.accepted_tokens) if stats else None
                steps_before = llm.engine.stats.steps
                tokens, decode, e2e = timed(llm, prompt, params)
                steps[label] = llm.engine.stats.steps - steps_before  # target forward passes (load-independent)
                if label == "plain":
                    want = tokens
                else:
                    same &= tokens == want
                    acc.append((stats.accepted_tokens - before[1]) / max(1, stats.draft_tokens - before[0]))
                rows[label].append((decode, e2e))
                print(f"round {r + 1} {name} {label}: decode {decode:.1f} tok/s, end-to-end {e2e:.1f} tok/s"
                      + (f", acceptance {acc[-1]:.2f}" if label == "spec" else "") + f", {steps[label]} target steps"
                      + f" | load {os.getloadavg()[0]:.1f}", flush=True)
            paired.append(rows["spec"][-1][0] / rows["plain"][-1][0])
        med = {k: (statistics.median(d for d, _ in v), statistics.median(e for _, e in v)) for k, v in rows.items()}
        summary.append((name, quant, fast.engine.speculator.config.num_tokens, med, statistics.median(acc), same, len(prompt),
                        statistics.median(paired), steps))
    print(f"\nmedians of {args.rounds} rounds, batch 1, greedy, {args.new_tokens} new tokens")
    print(f"{'method':<7}{'target':<8}{'k':>3}{'prompt':>8}{'plain decode':>14}{'spec decode':>13}{'ratio':>7}"
          f"{'paired':>8}{'e2e ratio':>11}{'accept':>8}{'steps':>10}  identical")
    for name, quant, k, med, a, same, n_prompt, pair, steps in summary:
        print(f"{name:<7}{'float' if quant == 'none' else 'packed':<8}{k:>3}{n_prompt:>8}{med['plain'][0]:>14.1f}"
              f"{med['spec'][0]:>13.1f}{med['spec'][0] / med['plain'][0]:>6.2f}x{pair:>7.2f}x"
              f"{med['spec'][1] / med['plain'][1]:>10.2f}x{a:>8.2f}{steps['plain']:>5}/{steps['spec']:<4}  {same}")
    print("ratio: of the medians; paired: median of each round's spec/plain; steps: target forward passes plain/spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
