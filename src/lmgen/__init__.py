"""lmgen: a readable, fast text-generation engine for LLaMA-family models.

    from lmgen import LLM, SamplingParams
    llm = LLM()                                     # embedded SmolLM2-135M-Instruct (GGUF)
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text)

The names below load on first use (PEP 562), so `import lmgen` and `lmgen --help` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lmgen.openmp_wait import install_passive_wait

install_passive_wait()  # before anything imports torch: libgomp reads its wait policy once, when torch loads it

# the public API: each name and the module that defines it
_HOMES = {
    "LLM": "lmgen.llm", "SamplingParams": "lmgen.sampling.params", "RequestOutput": "lmgen.engine.outputs",
    "CompletionOutput": "lmgen.engine.outputs", "StepOutput": "lmgen.engine.outputs",
    "InvalidRequestError": "lmgen.errors", "RequestStatus": "lmgen.engine.request",
    "ChatTemplate": "lmgen.tokenizer.chat_template.template", "ChatTemplateError": "lmgen.errors",
    "Conversation": "lmgen.chat.conversation", "Retriever": "lmgen.chat.retrieval", "Tokenizer": "lmgen.tokenizer.tokenizer",
    "ModelConfig": "lmgen.config", "Engine": "lmgen.engine.engine", "ContextOverflowError": "lmgen.errors",
    "ModelLoadError": "lmgen.errors", "UnsupportedModelError": "lmgen.errors",
}
__all__ = list(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'lmgen' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # what editors and type checkers see
    from lmgen.chat.conversation import Conversation
    from lmgen.chat.retrieval import Retriever
    from lmgen.config import ModelConfig
    from lmgen.engine.engine import Engine
    from lmgen.engine.outputs import CompletionOutput, RequestOutput, StepOutput
    from lmgen.engine.request import RequestStatus
    from lmgen.errors import ChatTemplateError, ContextOverflowError, InvalidRequestError, ModelLoadError, UnsupportedModelError
    from lmgen.llm import LLM
    from lmgen.sampling.params import SamplingParams
    from lmgen.tokenizer.chat_template.template import ChatTemplate
    from lmgen.tokenizer.tokenizer import Tokenizer
