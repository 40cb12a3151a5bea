"""The engine's counters (EngineStats, for --stats) and the frozen view of its state the server renders."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters since start, read by `--stats`; the server reads them through `Engine.snapshot()`."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prefill_tokens: int = 0  # prompt tokens actually computed (prefix-cache hits excluded)
    generation_tokens: int = 0
    steps: int = 0
    prefill_seconds: float = 0.0  # time in steps that computed prompt tokens
    decode_seconds: float = 0.0  # time in pure decode steps
    # Latency samples, the most recent `max_samples` of each (bounded, so a long offline run does not grow them)
    max_samples: int = 4096
    ttft: deque = field(init=False)  # seconds from arrival to first token, per sequence
    itl: deque = field(init=False)  # seconds between consecutive tokens

    def __post_init__(self) -> None:
        self.ttft, self.itl = deque(maxlen=self.max_samples), deque(maxlen=self.max_samples)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one moment, taken on the engine's thread (what /metrics renders)."""

    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_hits: int
    prefix_queries: int
    prompt_tokens: int
    prefill_tokens: int
    generation_tokens: int
    steps: int
    new_ttft: tuple[float, ...]  # latency samples since the previous draining snapshot
    new_itl: tuple[float, ...]
    spec_draft_tokens: int | None = None  # speculative decoding (None: off): tokens proposed, accepted, steps skipped
    spec_accepted_tokens: int | None = None
    spec_stepped_back: int | None = None
