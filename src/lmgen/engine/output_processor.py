"""OutputProcessor: the one way back from the engine core to users. Token ids become text (UTF-8 safe,
incremental), stop strings end sequences (the caller tells the core), logprob entries and counts are kept, and
a finished request becomes a RequestOutput. `LLM`, the CLI, the chat REPL and the server all go through it."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmgen.engine.outputs import CompletionOutput, EngineCoreOutput, Logprobs, RequestOutput, StepOutput
from lmgen.sampling.params import SamplingParams
from lmgen.tokenizer.detokenizer import IncrementalDetokenizer


@dataclass
class _Sequence:
    """One of a request's n sequences as text so far."""

    detokenizer: IncrementalDetokenizer
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float | None = None


@dataclass
class _RequestState:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: dict[int, _Sequence] = field(default_factory=dict)
    prompt_logprobs: list[Logprobs | None] | None = None
    num_cached_tokens: int = 0
    remaining: int = 1  # sequences not finished yet


@dataclass(frozen=True)
class ProcessedOutputs:
    """One step's results: per-sequence deltas, the requests that finished, and the sequences (request id,
    index) that reached a stop string and must be stopped in the core."""

    steps: list[StepOutput]
    finished: list[RequestOutput]
    stop_in_core: list[tuple[str, int]]


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        n = params.n  # beam search: its n best hypotheses
        self.requests[request_id] = _RequestState(prompt, list(prompt_token_ids), params, remaining=n)

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self.requests

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        steps, finished, stop_in_core = [], [], []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:  # aborted after the step was scheduled
                continue
            step = self._advance(state, out)
            if step.finished and out.finish_reason is None:
                stop_in_core.append((out.request_id, out.index))
            steps.append(step)
            if step.finished:
                state.remaining -= 1
                if state.remaining == 0:
                    finished.append(self._result(out.request_id, self.requests.pop(out.request_id)))
        return ProcessedOutputs(steps, finished, stop_in_core)

    def _advance(self, state: _RequestState, out: EngineCoreOutput) -> StepOutput:
        params = state.params
        seq = state.sequences.get(out.index)
        if seq is None:
            seq = state.sequences[out.index] = _Sequence(IncrementalDetokenizer(
                self.tokenizer, stop=params.stop or (), skip_special_tokens=params.skip_special_tokens,
                prompt_token_ids=state.prompt_token_ids), logprobs=[] if params.logprobs is not None else None)
        if out.prompt_logprobs is not None and out.index == 0:
            state.prompt_logprobs = list(out.prompt_logprobs)
        if out.index == 0:
            state.num_cached_tokens = out.num_cached_tokens
        finish, stop_reason = out.finish_reason, out.stop_reason
        detok = seq.detokenizer
        # an EOS / stop token that ended the sequence never reaches the text
        text_ids = out.new_token_ids[:-1] if finish == "stop" and not out.last_token_is_text else out.new_token_ids
        delta = detok.add_tokens(list(text_ids)) if text_ids else ""
        if detok.stop_string is not None:
            finish, stop_reason = "stop", detok.stop_string
            if params.include_stop_str_in_output:
                delta += detok.stop_string
        if finish is not None and detok.stop_string is None:
            delta += detok.flush()
        seq.text.append(delta)
        seq.token_ids.extend(out.new_token_ids)
        if seq.logprobs is not None and out.new_logprobs is not None:
            seq.logprobs.extend(out.new_logprobs)
        if params.logprobs is not None or out.score is not None:
            seq.cumulative_logprob = out.cumulative_logprob
        seq.score = out.score
        seq.finish_reason, seq.stop_reason = finish, stop_reason
        return StepOutput(out.request_id, out.index, out.new_token_ids, delta, out.new_logprobs, finish, stop_reason,
                          out.num_prompt_tokens, out.num_cached_tokens, out.num_output_tokens, out.cumulative_logprob,
                          tuple(state.prompt_logprobs) if out.prompt_logprobs is not None and out.index == 0 else None,
                          out.score)

    @staticmethod
    def _result(request_id: str, state: _RequestState) -> RequestOutput:
        outs = [CompletionOutput(i, "".join(s.text), s.token_ids, s.cumulative_logprob, s.logprobs, s.finish_reason,
                                 s.stop_reason, s.score) for i, s in sorted(state.sequences.items())]
        return RequestOutput(request_id, state.prompt, state.prompt_token_ids, outs, True, state.prompt_logprobs,
                             state.num_cached_tokens)
