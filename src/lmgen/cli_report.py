"""What the command line prints beside the generated text: --stats, --logprobs tables, completion headers."""

from __future__ import annotations

import sys


def rss_mib() -> tuple[float, float]:
    """(resident, peak resident) MiB of this process; the peak from /proc's VmHWM where there is one."""
    import psutil

    rss = psutil.Process().memory_info().rss / 2**20
    try:
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024))
    return rss, peak


def print_stats(llm, prompt_tokens: int, stats_before, wall: float, file=sys.stderr) -> None:
    import torch

    s = llm.engine.stats
    prefill_tokens = s.prefill_tokens - stats_before.prefill_tokens
    prefill_s = s.prefill_seconds - stats_before.prefill_seconds
    gen = s.generation_tokens - stats_before.generation_tokens
    decode_s = s.decode_seconds - stats_before.decode_seconds
    rss, peak = rss_mib()
    print(
        f"[stats] prompt tokens: {prompt_tokens} (prefilled {prefill_tokens}, {prompt_tokens - prefill_tokens} from the prefix cache) | "
        f"prefill: {prefill_tokens / prefill_s if prefill_s else 0:.1f} tok/s | "
        f"decode: {max(gen - 1, 0) / decode_s if decode_s else 0:.1f} tok/s ({gen} tokens) | "
        f"wall {wall:.2f}s | load {llm.load_seconds:.2f}s | RSS {rss:.0f} MiB (peak {peak:.0f}) | "
        f"weights {llm.model.weight_bytes() / 2**20:.0f} MiB | KV cache {llm.engine.kv_cache.bytes / 2**20:.0f} MiB reserved "
        f"({str(llm.engine.kv_cache.dtype).removeprefix('torch.')}) | "
        f"threads {torch.get_num_threads()}" + _spec_stats(llm),
        file=file,
    )


def _spec_stats(llm) -> str:
    """Speculative decoding's acceptance since start, when the engine speculates."""
    spec = llm.engine.speculator
    if spec is None:
        return ""
    st = spec.stats
    rate = st.accepted_tokens / st.draft_tokens if st.draft_tokens else 0.0
    return f" | speculative {spec.config.method}: {st.accepted_tokens}/{st.draft_tokens} proposed tokens accepted ({rate:.0%})"


def print_logprobs(llm, token_ids: list[int], logprobs: list[dict[int, float]] | None, file=sys.stderr) -> None:
    """One line per generated token: the chosen token, then the top candidates with probabilities."""
    import math

    tok = llm.tokenizer
    for step, (token, entry) in enumerate(zip(token_ids, logprobs or [])):
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        cands = "  ".join(f"{tok.decode([t])!r} {math.exp(lp):.3f}" for t, lp in ranked)
        print(f"  [{step}] {tok.decode([token])!r:>14}  <- {cands}", file=file)


def completion_header(c, params) -> str:
    """`--- [i] finish=...`, with the cumulative log-probability only where it was computed (logprobs requested,
    or beam search), and the beam score."""
    header = f"--- [{c.index}] finish={c.finish_reason}"
    if c.cumulative_logprob is not None and (params.logprobs is not None or params.beam_width > 1):
        header += f" cumulative_logprob={c.cumulative_logprob:.3f}"
    return header + (f" score={c.score:.4f}" if c.score is not None else "")
