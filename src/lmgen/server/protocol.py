"""OpenAI wire format: the error body (APIError) and the mapping from a request to SamplingParams.

The request models live in `protocol_requests` (validated strictly: a string where a number belongs is
a 400, not a coercion; unknown fields are ignored, as OpenAI does; besides OpenAI's fields, vLLM's
sampling extras are taken: top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids,
skip_special_tokens, include_stop_str_in_output), the response and stream-chunk models in
`protocol_responses`; both are re-exported here, so `protocol.<Name>` reaches every model.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel

from lmgen.errors import ContextOverflowError
from lmgen.sampling.params import SamplingParams
from lmgen.server.protocol_requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    DetokenizeRequest,
    ResponseFormat,
    StreamOptions,
    TokenizeRequest,
    _SamplingFields,
    _Strict,
)
from lmgen.server.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    # errors
    "ErrorInfo", "ErrorResponse", "APIError", "param_of",
    # requests (protocol_requests)
    "StreamOptions", "CompletionRequest", "ContentPart", "ChatMessage", "ResponseFormat",
    "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest",
    # responses and stream chunks (protocol_responses)
    "PromptTokensDetails", "Usage", "CompletionLogprobs", "CompletionChoice", "CompletionResponse",
    "TopLogprob", "TokenLogprob", "ChoiceLogprobs", "AssistantMessage", "ChatChoice",
    "ChatCompletionResponse", "DeltaMessage", "ChatChunkChoice", "ChatCompletionChunk", "CompletionChunk",
    "ModelCard", "ModelList", "TokenizeResponse", "DetokenizeResponse",
    # request -> SamplingParams
    "check_token_ids", "resolve_max_tokens", "sampling_params",
]


# ---- errors ------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Union[str, int, None] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the server answers in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()


def param_of(error: ValueError) -> str | None:
    """SamplingParams' messages start with the field's name ("top_p must be ...")."""
    m = re.match(r"([a-z_]+) must\b", str(error))
    return m.group(1) if m else None


# ---- request -> SamplingParams -----------------------------------------------------------------------
def check_token_ids(ids, vocab_size: int, param: str) -> None:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise APIError(400, f"{param} has token id {t}, outside the vocabulary [0, {vocab_size})", param=param)


def resolve_max_tokens(requested: int | None, prompt_len: int, context_length: int, param: str = "max_tokens",
                       what: str = "prompt") -> int:
    """OpenAI/vLLM rule: prompt + max_tokens must fit the window; no max_tokens means 'the rest of it'."""
    if requested is not None and (not isinstance(requested, int) or requested < 1):
        raise APIError(400, f"{param} must be at least 1, got {requested!r}", param=param)
    if prompt_len >= context_length:
        raise ContextOverflowError(
            f"This model's maximum context length is {context_length} tokens. However, your {what} has "
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the {what}.")
    if requested is None:
        return context_length - prompt_len
    if prompt_len + requested > context_length:
        raise ContextOverflowError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the completion). "
            f"Please reduce the length of the {what} or {param}.")
    return requested


def sampling_params(req: _SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """Builds SamplingParams; their ValueError (naming the field) becomes a 400 with that `param`."""
    if req.logit_bias:
        bad = [k for k in req.logit_bias if not (k.strip().lstrip("+").isdigit() and int(k) < vocab_size)]
        if bad:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {bad[0]!r}", param="logit_bias")
    if req.stop_token_ids:
        check_token_ids(req.stop_token_ids, vocab_size, "stop_token_ids")
    fields: dict[str, Any] = dict(
        n=req.n, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=dict(req.logit_bias) if req.logit_bias else None, seed=req.seed, stop=req.stop,
        stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        beam_width=req.beam_width, length_penalty=req.length_penalty, early_stopping=req.early_stopping,
    )
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise APIError(400, str(e), param=param_of(e)) from None
