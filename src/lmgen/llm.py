"""LLM: the user-facing facade (vLLM's surface): load a model, then generate, stream or chat."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Sequence, Union

import torch

from lmgen.chat.tool_calls import parse_tool_calls
from lmgen.chat.tools import Tools, template_source
from lmgen.engine.engine import Engine
from lmgen.engine.kv_cache import resolve_kv_cache_dtype
from lmgen.engine.output_processor import OutputProcessor, ProcessedOutputs
from lmgen.engine.outputs import RequestOutput, StepOutput
from lmgen.errors import InvalidRequestError
from lmgen.loader import load_model
from lmgen.loader.loaded import LoadedModel
from lmgen.models.registry import build_model
from lmgen.parallel.check import check_pipeline_parallel, check_tensor_parallel
from lmgen.parallel.driver import DriverModel, MirroredKVCache, local_spec, start_workers
from lmgen.parallel.worker import WorkerSpec
from lmgen.loader.resolve import resolve_model
from lmgen.sampling.params import SamplingParams
from lmgen.sampling.structured.backend import GrammarBackend
from lmgen.spec.build import build_speculator
from lmgen.spec.config import SpeculativeConfig

Prompt = Union[str, Sequence[int]]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANTIZATION = ("auto", "none", "int8", "int4")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bf16 matmuls are slow on CPUs without bf16 units, so float32 there
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


class LLM:
    """A loaded model plus its engine.

    >>> llm = LLM()                                    # the embedded SmolLM2-135M-Instruct
    >>> out = llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))
    >>> out[0].outputs[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "cpu",
        quantization: str = "auto",
        context_length: int | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: dict | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        kv_cache_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        threads: int | None = None,
        compile: bool = False,
        progress: Callable[[int, int], None] | None = None,
        batch_invariant: bool = True,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        speculative: dict | SpeculativeConfig | None = None,
        kv_cache_dtype: str = "auto",
    ):
        if quantization not in _QUANTIZATION:
            raise ValueError(f"quantization must be one of {', '.join(_QUANTIZATION)}; got {quantization!r}")
        spec_config = SpeculativeConfig.parse(speculative)  # fail before loading anything
        if threads is not None:
            if not (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
                raise ValueError(f"threads must be a positive integer, got {threads!r}")
            # PyTorch's intra-op pool is per process: this sets it for every model in the process; the packed
            # kernels follow it (lmgen.layers.quant)
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        # the KV cache's element type, e.g. "float16" (refused here, before loading, when invalid)
        self.kv_cache_dtype = str(resolve_kv_cache_dtype(kv_cache_dtype, self.dtype, self.device)).removeprefix("torch.")
        t0 = time.perf_counter()
        loaded: LoadedModel = load_model(resolve_model(model))
        self.model_name = model or "smollm2"
        self.loaded, self.config, self.tokenizer = loaded, loaded.config, loaded.tokenizer
        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress:
                progress(done[0], loaded.config.num_layers)

        limit = loaded.config.max_position_embeddings
        if context_length is not None and not (isinstance(context_length, int) and 2 <= context_length <= limit):
            raise ValueError(f"context_length must be an integer in [2, {limit}] (the model's window), got {context_length!r}")
        self.context_length = context_length or limit
        # Room for a couple of full-window sequences, and at least 16k tokens for concurrent requests.
        num_blocks = math.ceil((kv_cache_tokens or max(2 * self.context_length, 16384)) / block_size)
        # batch_invariant: a request's tokens and logprobs do not depend on what shares its steps (float32 CPU)
        self.quantization = quantization
        self.workers, kv_cache, tp = None, None, check_tensor_parallel(loaded.config, tensor_parallel_size)
        pp = check_pipeline_parallel(loaded.config, pipeline_parallel_size)
        if tp * pp > 1:  # ranks 1.. in their own processes; this one is rank 0, the driver (lmgen.parallel)
            if threads is None:
                torch.set_num_threads(1)  # one thread per rank by default
            spec = local_spec(WorkerSpec(str(loaded.path), tp, pp, str(self.dtype).removeprefix("torch."),
                                         str(self.device), quantization, batch_invariant, num_blocks, block_size,
                                         torch.get_num_threads(), kv_cache_dtype=self.kv_cache_dtype))
            self.workers = start_workers(spec, loaded.config.num_layers)
        layout = self.workers.layout if self.workers is not None else (None, None)  # rank 0's slice / stage
        self.model = build_model(loaded.config, loaded.weights.items(), self.dtype, self.device, quantization, tick,
                                 compile, batch_invariant, *layout)
        loaded.weights = {}  # the model owns its tensors now; drop the loader's references
        if self.workers is not None:
            self.model = DriverModel(self.model, self.workers)
            cfg = self.model.config  # this rank's heads
            kv_cache = MirroredKVCache(self.workers, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                                       cfg.head_dim, getattr(torch, self.kv_cache_dtype), self.model.device)
        if chat_template is not None:
            from lmgen.tokenizer.chat_template.template import ChatTemplate

            ChatTemplate.resolve(chat_template)  # fail now, not at the first chat
        self.chat_template = chat_template
        self.chat_template_kwargs = self._check_template_kwargs(chat_template_kwargs)
        # the model's end tokens: the config's (GGUF / generation_config) and the tokenizer's, merged by LoadedModel
        self.eos_token_ids = frozenset(loaded.config.eos_token_ids)
        # speculative decoding: a draft model (or this file packed) with its own KV cache, or n-gram lookup
        self.speculative = spec_config
        speculator = build_speculator(spec_config, loaded, quantization, self.dtype, self.device, num_blocks, block_size,
                                      batch_invariant)
        self.engine = Engine(
            self.model, eos_token_ids=self.eos_token_ids, context_length=self.context_length,
            num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching, kv_cache=kv_cache,
            # masks overlap the forward pass only on a GPU: on the CPU the model's threads already use every core
            grammar_backend=GrammarBackend(self.tokenizer, loaded.config.vocab_size, self.eos_token_ids,
                                           overlap=self.device.type == "cuda"),
            speculator=speculator,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.load_seconds = time.perf_counter() - t0

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (a single-process LLM holds nothing to release)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- prompts --------------------------------------------------------------------------------
    def _to_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")

    @staticmethod
    def _batch(prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        return list(prompts)

    # ---- generation -----------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Completes each prompt; returns one RequestOutput per prompt, in order."""
        batch = self._batch(prompts)
        plist = self._params_list(params, len(batch))
        return self._run([self._to_ids(p) for p in batch], plist)

    @staticmethod
    def _params_list(params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        plist = list(params)
        if len(plist) != count:
            raise ValueError(f"got {len(plist)} SamplingParams for {count} prompts; give one, or one per prompt")
        return plist

    def _add_all(self, encoded, plist) -> list[str]:
        """Adds every request or none: if one is rejected, the ones already queued are aborted."""
        ids = []
        try:
            for (text, prompt_ids), sp in zip(encoded, plist):
                rid = self.engine.add_request(prompt_ids, sp)
                self.output_processor.add_request(rid, text, prompt_ids, sp)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self._abort(rid)
            raise
        return ids

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)
        self.output_processor.abort(request_id)

    def _step(self) -> ProcessedOutputs:
        """One engine step through the output processor; sequences that reached a stop string stop in the core."""
        processed = self.output_processor.process(self.engine.step())
        self.engine.stop_sequences(processed.stop_in_core)
        return processed

    def _run(self, encoded, plist) -> list[RequestOutput]:
        rids = self._add_all(encoded, plist)
        results: dict[str, RequestOutput] = {}
        try:
            while len(results) < len(rids):
                for out in self._step().finished:
                    results[out.request_id] = out
        except BaseException:
            for rid in rids:
                self._abort(rid)
            raise
        return [results[rid] for rid in rids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields the completion's text as it is generated (UTF-8 safe, stop strings held back)."""
        for so in self.stream_outputs(prompt, params):
            if so.delta_text:
                yield so.delta_text

    def stream_outputs(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """Token-level stream: one StepOutput per generated token; closing the iterator aborts the request."""
        params = params or SamplingParams()
        if params.n != 1 or params.beam_width != 1:
            raise ValueError("streaming supports n=1 without beam search; use generate() for n > 1 or beams")
        (rid,) = self._add_all([self._to_ids(prompt)], [params])
        finished = False
        try:
            while not finished:
                for so in self._step().steps:
                    if so.request_id == rid:
                        finished = so.finished
                        yield so
        finally:
            if not finished:
                self._abort(rid)

    # ---- chat -----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Messages -> prompt token ids through the model's (or the given) chat template; `kwargs` (e.g.
        enable_thinking=False) over the LLM's `chat_template_kwargs`."""
        template = chat_template or self.chat_template
        return self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, chat_template=template,
            **{**self.chat_template_kwargs, **kwargs}
        )

    def _check_template_kwargs(self, kwargs: dict | None) -> dict:
        """Template variables every chat render gets; `enable_thinking` is refused (ValueError) for a chat template
        whose output does not depend on it, since it could not be honoured."""
        kwargs = dict(kwargs or {})
        if not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise ValueError(f"chat_template_kwargs keys must be identifiers, got {sorted(map(repr, kwargs))}")
        if "enable_thinking" in kwargs:
            probe = [{"role": "user", "content": "hi"}]
            on, off = (self.tokenizer.apply_chat_template(probe, chat_template=self.chat_template, enable_thinking=v)
                       for v in (True, False))
            if on == off:
                raise ValueError("enable_thinking: this model's chat template has no thinking switch (it renders the "
                                 "same with thinking on and off)")
        return kwargs

    def chat(self, messages, params: SamplingParams | None = None, chat_template: str | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool = True, **template_kwargs) -> list[RequestOutput]:
        """Chat completion for one conversation (a list of {role, content}) or a list of conversations.

        The model has no memory: the whole history is the prompt. If it does not fit the context window with
        `max_tokens` left for the answer, the oldest turns are dropped whole (never the system prompt) and
        `RequestOutput.dropped_messages` says how many; a last message too long alone raises ContextOverflowError.
        `tools` (OpenAI's shape) with `tool_choice` none / auto / required / {"type": "function", "function":
        {"name": ...}}, `parallel_tool_calls` (False: at most one call): the output is constrained to calls (lmgen.chat.tools), read into each output's `tool_calls`
        (finish_reason "tool_calls").
        """
        params = params or SamplingParams()
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        spec = Tools(tools, tool_choice, parallel_tool_calls) if tools is not None or tool_choice is not None else None
        if spec is not None:
            source = template_source(self.tokenizer, chat_template or self.chat_template)
            prepared = [spec.messages_for(list(m), source) for m in convs]
            convs, template_kwargs = [m for m, _ in prepared], {**template_kwargs, **(prepared[0][1] if prepared else {})}
            if spec.active:
                if params.structured is not None:
                    raise InvalidRequestError("params.structured cannot be combined with tools unless tool_choice is "
                                              "'none'", param="tool_choice", value=spec.choice)
                params = params.replace(structured=spec.structured())
        fitted = [self.fit_chat(m, params.max_tokens, chat_template, add_generation_prompt, **template_kwargs) for m in convs]
        outs = self.generate([ids for ids, _ in fitted], params)
        for out, (_, dropped) in zip(outs, fitted):
            out.dropped_messages = dropped
            for c in out.outputs if spec is not None and spec.active else ():
                _, c.tool_calls = parse_tool_calls(c.text)
                if c.tool_calls and c.finish_reason == "stop":
                    c.finish_reason = "tool_calls"
        return outs

    def fit_chat(self, messages: list[dict], max_tokens: int | None, chat_template: str | None = None,
                 add_generation_prompt: bool = True, **template_kwargs) -> tuple[list[int], int]:
        """Renders `messages`, dropping the oldest turns if needed; returns (prompt ids, messages dropped)."""
        from lmgen.chat.conversation import Conversation

        ids = self.render_chat(messages, chat_template, add_generation_prompt, **template_kwargs)
        budget = max_tokens or 1
        if len(ids) + budget <= self.context_length:
            return ids, 0
        system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
        conv = Conversation(system=system, messages=[dict(m) for m in messages[1 if system is not None else 0:]])
        dropped = conv.fit(lambda msgs: len(self.render_chat(msgs, chat_template, add_generation_prompt, **template_kwargs)),
                           self.context_length, budget)
        return self.render_chat(conv.to_messages(), chat_template, add_generation_prompt, **template_kwargs), dropped

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None, chat_template: str | None = None,
                    **template_kwargs) -> Iterator[str]:
        """Streams the assistant's answer to one conversation (history fitted to the window like `chat`)."""
        params = params or SamplingParams()
        ids, _ = self.fit_chat(messages, params.max_tokens, chat_template, True, **template_kwargs)
        return self.stream(ids, params)
