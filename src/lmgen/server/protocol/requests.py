"""OpenAI wire format, requests: the strictly validated bodies of /v1/completions, /v1/chat/completions,
/tokenize and /detokenize (OpenAI's fields plus vLLM's sampling extras; unknown fields are ignored).
As OpenAI, a message role outside ROLES and more than MAX_STOP_STRINGS stop strings are refused (400).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator

# The roles OpenAI's chat API takes; a template sees nothing else.
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ROLES: tuple[str, ...] = Role.__args__
# OpenAI takes up to 4 stop strings, vLLM any number; each is matched against every new token, so a cap.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
    """Sampling fields shared by both endpoints (OpenAI's, then vLLM's extras)."""

    model: str
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # vLLM extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # beam search (vLLM's `use_beam_search` + `best_of`, as lmgen's SamplingParams names them)
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, Literal["never"]] = False
    # structured output (vLLM's names); checked and compiled by protocol/structured.py
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    structured_outputs: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(strings)}")
        longest = max((len(s) for s in strings), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop


class ResponseFormat(StrictModel):
    type: str
    json_schema: Optional[dict[str, Any]] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    add_special_tokens: bool = True
    response_format: Optional[ResponseFormat] = None  # vLLM takes it on completions too


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # tool_calls, tool_call_id... reach the template
    role: Role
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    # OpenAI's deprecated function calling: refused (400) rather than ignored, so a constraint is never dropped
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None
    # vLLM extras
    add_generation_prompt: bool = True
    chat_template: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None


class TokenizeRequest(StrictModel):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True


class DetokenizeRequest(StrictModel):
    model: Optional[str] = None
    tokens: list[int]
