"""Every lmgen exception, with structured fields (what, value, param) so that the CLI and the server map
them without parsing messages. Loader, server-queue and model-format errors live here too."""

from __future__ import annotations

class ModelLoadError(ValueError):
    """A model file or folder is missing, truncated, corrupt, or does not match its own config."""


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture (or one of its options) is not one lmgen implements."""


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered, or its input was malformed."""


class ContextOverflowError(ValueError):
    """A prompt (or the shortest history a chat can keep) does not fit the context window; the message and
    the attributes carry the numbers."""

    def __init__(self, message: str, *, needed: int | None = None, context_length: int | None = None,
                 prompt_tokens: int | None = None, max_tokens: int | None = None, param: str | None = None):
        super().__init__(message)
        self.param = param  # the request field at fault ("prompt", "messages"), when a request is
        self.needed = needed
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class InvalidRequestError(ValueError):
    """A request's option has a value lmgen refuses; `param` names the option and `value` holds what was given."""

    def __init__(self, message: str, *, param: str | None = None, value: object = None):
        super().__init__(message)
        self.param = param
        self.value = value


class ChatTemplateLimitError(ChatTemplateError):
    """A chat template went over a render limit (time, output size, size of one value, memory); `limit` names
    which, `value` is what was reached or asked for and `maximum` the limit."""

    def __init__(self, message: str, *, limit: str, value: float | int | None = None,
                 maximum: float | int | None = None):
        super().__init__(message)
        self.limit = limit
        self.value = value
        self.maximum = maximum


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit (`max_queue`); the server answers 503."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down (or its thread died) and takes no new requests."""


class EngineStepError(RuntimeError):
    """An engine step failed; the requests it was running were failed with this error."""


class ModelFormatError(ModelLoadError):
    """A model file holds a value that cannot be right (a count or length past the end of the file, a zero head
    count, a dimension that disagrees with another): refused when read, before anything is sized or looped by it.
    `key` names the value (a GGUF metadata key, a `GGUF.*` header field, a tensor name, or a config.json field),
    `value` is what the file holds, `offset` the byte of the file it was read at (None: not from a byte offset)."""

    def __init__(self, message: str, *, key: str, value: object, offset: int | None = None):
        super().__init__(message)
        self.key = key
        self.value = value
        self.offset = offset


class ParallelConfigError(ValueError):
    """A tensor- or pipeline-parallel size the model cannot be split by (heads, layers, vocabulary or a packed
    block not dividing evenly); `param` names the option, `value` what was given."""

    def __init__(self, message: str, *, param: str, value: object):
        super().__init__(message)
        self.param = param
        self.value = value


class WorkerLostError(EngineStepError):
    """A model worker process died or stopped answering; the engine cannot go on (the server answers 503 and
    exits). `rank` is the worker's, where known."""

    def __init__(self, message: str, *, rank: int | None = None):
        super().__init__(message)
        self.rank = rank
class SpeculativeConfigError(ValueError):
    """A `speculative` option lmgen cannot honour (an unknown method, a bad token count, a draft model whose
    vocabulary differs from the target's); `param` names the option and `value` holds what was given."""

    def __init__(self, message: str, *, param: str, value: object = None):
        super().__init__(message)
        self.param = param
        self.value = value


class InvalidOptionError(ValueError):
    """An option of the LLM / engine (not of one request) has a value lmgen refuses; `param` names it, `value` is
    what was given and `choices` what is accepted."""

    def __init__(self, message: str, *, param: str, value: object, choices: tuple[str, ...] = ()):
        super().__init__(message)
        self.param = param
        self.value = value
        self.choices = choices
