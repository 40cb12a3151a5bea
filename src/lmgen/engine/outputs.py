"""The plain values that leave the engine: the core's per-sequence step news, the output processor's per-step
deltas, and the finished results users get (vLLM v1's EngineCoreOutput / RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

Logprobs = dict[int, float]  # {token id: logprob}: the top-k candidates plus the chosen token


@dataclass(frozen=True)
class EngineCoreOutput:
    """One step's news about one sequence, from the engine core: token ids and counts, never text."""

    request_id: str  # the user's request id (shared by its n sequences)
    index: int  # which of the n sequences
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[Logprobs, ...] | None  # one entry per new token, when logprobs were asked for
    cumulative_logprob: float
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | None  # the stop token id that ended it (EOS: None)
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served by the prefix cache
    num_output_tokens: int
    prompt_logprobs: tuple[Logprobs | None, ...] | None = None  # sent with a sequence's first output only
    score: float | None = None  # beam search: cumulative_logprob / len(token_ids) ** length_penalty
    last_token_is_text: bool = False  # "stop" at a grammar's end: the last token is output text, not an end token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class StepOutput:
    """One step's news about one sequence as the library, CLI and server see it: new tokens and the text they
    released (UTF-8 safe, stop strings held back)."""

    request_id: str
    index: int
    new_token_ids: tuple[int, ...]
    delta_text: str
    new_logprobs: tuple[Logprobs, ...] | None
    finish_reason: str | None
    stop_reason: int | str | None  # the stop string or stop token id that ended it
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    cumulative_logprob: float
    prompt_logprobs: tuple[Logprobs | None, ...] | None = None  # with the first output of sequence 0 only
    score: float | None = None  # beam search's score of a finished hypothesis

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    """One of a request's n completions (vLLM's CompletionOutput)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    score: float | None = None  # beam search: cumulative_logprob / len(token_ids) ** length_penalty
    tool_calls: list | None = None  # LLM.chat(tools=...): the ToolCalls read from `text` (then "tool_calls" finishes)


@dataclass
class RequestOutput:
    """What `LLM.generate` returns per prompt (vLLM's RequestOutput)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    dropped_messages: int = 0  # chat only: oldest history messages dropped to fit the context window
    metrics: dict[str, float] = field(default_factory=dict)
