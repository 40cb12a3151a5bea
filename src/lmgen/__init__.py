"""lmgen: a readable, fast text-generation engine for LLaMA-family models.

    from lmgen import LLM, SamplingParams
    llm = LLM()                                     # embedded SmolLM2-135M-Instruct (GGUF)
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text)
"""

from lmgen.openmp_wait import import_torch_with_passive_wait

import_torch_with_passive_wait()  # first: libgomp reads its wait policy once, when torch loads it

from lmgen.chat.conversation import Conversation  # noqa: E402
from lmgen.chat.retrieval import Retriever  # noqa: E402
from lmgen.config import ModelConfig  # noqa: E402
from lmgen.engine.engine import Engine  # noqa: E402
from lmgen.engine.outputs import CompletionOutput, RequestOutput, StepOutput  # noqa: E402
from lmgen.engine.request import RequestStatus  # noqa: E402
from lmgen.errors import ChatTemplateError, ContextOverflowError, InvalidRequestError, ModelLoadError, UnsupportedModelError  # noqa: E402
from lmgen.llm import LLM  # noqa: E402
from lmgen.sampling.params import SamplingParams  # noqa: E402
from lmgen.tokenizer.chat_template.template import ChatTemplate  # noqa: E402
from lmgen.tokenizer.tokenizer import Tokenizer  # noqa: E402

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StepOutput", "InvalidRequestError", "RequestStatus", "ChatTemplate", "ChatTemplateError",
    "Conversation", "Retriever", "Tokenizer", "ModelConfig", "Engine", "ContextOverflowError", "ModelLoadError", "UnsupportedModelError",
]
