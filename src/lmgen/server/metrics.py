"""Prometheus metrics for the server, in the plain-text exposition format (version 0.0.4), written by hand.

Gauges and counters are read from the engine when /metrics is scraped; the two latency histograms are
fed by the engine thread, which moves `EngineStats.ttft` / `EngineStats.itl` samples into them after
every step (and empties them).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0)


def _fmt(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: dict[str, str] | None) -> str:
    if not labels:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}"


class Histogram:
    """Cumulative buckets, a sum and a count (Prometheus' histogram type)."""

    def __init__(self, name: str, help_text: str, buckets: Iterable[float]):
        self.name, self.help = name, help_text
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_fmt(float(bound))}"}} {running}')
        lines.append(f"{self.name}_sum {_fmt(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """Everything /metrics shows. Histograms and request counters are updated from the engine thread
    and read from the event loop, so both sides go through `self.lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram("lmgen_time_to_first_token_seconds", "Seconds from a request's arrival to its first token.", TTFT_BUCKETS)
        self.itl = Histogram("lmgen_inter_token_latency_seconds", "Seconds between consecutive tokens of a sequence.", ITL_BUCKETS)
        self.finished: dict[str, int] = {}  # finish_reason -> user requests
        self.rejected: dict[str, int] = {}  # reason -> requests refused at admission (queue_full, invalid, ...)
        self.engine_errors = 0
        self.snapshot = None  # the engine's latest EngineSnapshot

    # ---- engine thread ----------------------------------------------------------------------------
    def update(self, snapshot) -> None:
        """Takes the engine's latest EngineSnapshot (taken on the engine thread) and its new latency samples."""
        with self.lock:
            self.snapshot = snapshot
            for v in snapshot.new_ttft:
                self.ttft.observe(v)
            for v in snapshot.new_itl:
                self.itl.observe(v)

    def request_finished(self, reason: str | None) -> None:
        with self.lock:
            key = reason or "unknown"
            self.finished[key] = self.finished.get(key, 0) + 1

    def request_rejected(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def engine_error(self) -> None:
        with self.lock:
            self.engine_errors += 1

    # ---- scrape -----------------------------------------------------------------------------------
    def render(self, pending: int = 0) -> str:
        """The exposition text, from the latest engine snapshot; `pending` counts requests handed to the
        engine thread that it has not picked up yet (they are waiting too)."""
        with self.lock:
            snap = self.snapshot
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict | None, float]]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_fmt(value)}")

        if snap is not None:
            metric("lmgen_requests_running", "gauge", "Sequences in the running batch.", [(None, snap.running)])
            metric("lmgen_requests_waiting", "gauge", "Sequences waiting to be scheduled (queued or preempted).",
                   [(None, snap.waiting + pending)])
            metric("lmgen_kv_cache_blocks_used", "gauge", "KV-cache blocks held by live sequences.", [(None, snap.kv_blocks_used)])
            metric("lmgen_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", [(None, snap.kv_blocks_total)])
            metric("lmgen_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache blocks in use.",
                   [(None, snap.kv_blocks_used / snap.kv_blocks_total if snap.kv_blocks_total else 0.0)])
            metric("lmgen_prefix_cache_hits_total", "counter", "Prompt blocks served from the prefix cache.", [(None, snap.prefix_hits)])
            metric("lmgen_prefix_cache_queries_total", "counter", "Full prompt blocks looked up in the prefix cache.",
                   [(None, snap.prefix_queries)])
            metric("lmgen_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [(None, snap.prompt_tokens)])
            metric("lmgen_prefill_tokens_total", "counter", "Prompt tokens actually computed (prefix-cache hits excluded).",
                   [(None, snap.prefill_tokens)])
            metric("lmgen_generation_tokens_total", "counter", "Generated tokens.", [(None, snap.generation_tokens)])
            metric("lmgen_engine_steps_total", "counter", "Engine steps run.", [(None, snap.steps)])
            if snap.spec_draft_tokens is not None:
                metric("lmgen_spec_draft_tokens_total", "counter", "Speculative decoding: tokens proposed.",
                       [(None, snap.spec_draft_tokens)])
                metric("lmgen_spec_accepted_tokens_total", "counter", "Speculative decoding: proposed tokens accepted.",
                       [(None, snap.spec_accepted_tokens)])
                metric("lmgen_spec_stepped_back_steps_total", "counter",
                       "Speculative decoding: steps run without proposals because the batch was too large.",
                       [(None, snap.spec_stepped_back)])
        with self.lock:
            metric("lmgen_requests_finished_total", "counter", "User requests finished, by finish reason.",
                   [({"finish_reason": k}, v) for k, v in sorted(self.finished.items())])
            metric("lmgen_requests_rejected_total", "counter", "Requests refused at admission, by reason.",
                   [({"reason": k}, v) for k, v in sorted(self.rejected.items())])
            metric("lmgen_engine_errors_total", "counter", "Engine steps that raised (their requests were failed).",
                   [(None, self.engine_errors)])
            out.extend(self.ttft.render())
            out.extend(self.itl.render())
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name (with its label text, if any) -> value; for tests and the benchmark."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
    return values
