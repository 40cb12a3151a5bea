"""From an OpenAI request to engine inputs: token-id checks, the max_tokens rule, and SamplingParams."""

from __future__ import annotations

from typing import Any

from lmgen.errors import ContextOverflowError
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.structured.spec import StructuredOutput
from lmgen.server.protocol.api_error import APIError
from lmgen.server.protocol.requests import SamplingFields


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
            f"{prompt_len} tokens, which leaves no room for a completion. Please shorten the {what}.", param=what)
    if requested is None:
        return context_length - prompt_len
    if prompt_len + requested > context_length:
        raise ContextOverflowError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} in the completion). "
            f"Please reduce the length of the {what} or {param}.", param=what)
    return requested


def sampling_params(req: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int,
                    prompt_logprobs: int | None = None, structured: StructuredOutput | None = None) -> SamplingParams:
    """Builds SamplingParams; their InvalidRequestError becomes a 400 with its `param`."""
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
        structured=structured,
    )
    try:
        return SamplingParams(**fields)
    except ValueError as e:
        raise APIError(400, str(e), param=getattr(e, "param", None)) from None
