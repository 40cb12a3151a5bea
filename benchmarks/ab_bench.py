"""Before/after in one run: cpu_bench.py and serve_bench.py of two lmgen checkouts (and this one's
--no-batch-invariant mode), interleaved round by round so that a busy machine's noise hits every variant alike;
prints each figure's median over the rounds and its ratio to the first variant.

    .venv/bin/python benchmarks/ab_bench.py --before /path/to/older/checkout [--rounds 3] [--engines lmgen:auto]

Each variant runs the benchmark scripts of its own checkout with that checkout's src/ first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(root: Path, script: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(root / "src"))
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{script} in {root} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def parse_cpu(out: str) -> dict[str, float]:
    figures = {}
    for line in out.splitlines():
        m = re.match(r"(lmgen:\S+)\s+([\d.]+)\s+([\d.]+)", line)
        if m:
            figures[f"{m.group(1)} prefill tok/s"] = float(m.group(2))
            figures[f"{m.group(1)} decode tok/s"] = float(m.group(3))
    return figures


def parse_serve(out: str) -> dict[str, float]:
    figures = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) > 6 and f[0] in ("sequential", "concurrent") and f[1].isdigit():
            figures[f"serve {f[0]} {f[1]} clients tok/s"] = float(f[5])
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, type=Path, help="an older lmgen checkout (its src/ and benchmarks/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="lmgen:auto", help="cpu_bench engines")
    ap.add_argument("--repeats", type=int, default=3, help="cpu_bench repeats per round")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--cpu-args", default="", help="more cpu_bench flags, e.g. '--prompt-tokens 256 --new-tokens 64'")
    ap.add_argument("--no-serve", action="store_true", help="cpu_bench only")
    args = ap.parse_args()
    variants = {"before": (args.before.resolve(), []), "after": (HERE, []),
                "after --no-batch-invariant": (HERE, ["--no-batch-invariant"])}
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    machine = ""
    for r in range(args.rounds):
        for name, (root, extra) in variants.items():
            cpu = run(root, "cpu_bench.py", ["--engines", args.engines, "--repeats", str(args.repeats),
                                             *args.cpu_args.split(), *extra])
            serve = "" if args.no_serve else run(root, "serve_bench.py", ["--concurrency", args.concurrency, *extra])
            machine = machine or next((l for l in cpu.splitlines() if l.startswith("machine:")), "")
            for k, v in {**parse_cpu(cpu), **parse_serve(serve)}.items():
                figures[name].setdefault(k, []).append(v)
            print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures[name].items()),
                  flush=True)
    print(machine)
    names = list(variants)
    print(f"{'figure (median of ' + str(args.rounds) + ' rounds)':<40}" + "".join(f"{n:>28}" for n in names))
    for key in figures[names[0]]:
        base = statistics.median(figures[names[0]][key])
        cells = []
        for n in names:
            vals = figures[n].get(key)
            med = statistics.median(vals) if vals else float("nan")
            cells.append(f"{med:.1f} ({med / base:.2f}x)")
        print(f"{key:<40}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    main()
