"""lmgen: a readable, fast text-generation engine for LLaMA-family models.

    from lmgen import LLM, SamplingParams
    llm = LLM()                                     # embedded SmolLM2-135M-Instruct (GGUF)
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text)
"""

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

__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "StepOutput", "InvalidRequestError", "RequestStatus", "ChatTemplate", "ChatTemplateError",
    "Conversation", "Retriever", "Tokenizer", "ModelConfig", "Engine", "ContextOverflowError", "ModelLoadError", "UnsupportedModelError",
]
