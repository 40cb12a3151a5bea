"""Per-app request helpers shared by the routes (the `ServerContext`): auth and model checks, all-or-nothing
admission to the engine, collecting outputs, usage, logprobs formatting, prompt / chat-message rendering."""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import Request

from lmgen.chat.tools import Tools, template_source
from lmgen.errors import ChatTemplateLimitError, InvalidRequestError
from lmgen.sampling.params import SamplingParams
from lmgen.server.protocol import requests as Q
from lmgen.server.protocol import responses as R
from lmgen.server.protocol.api_error import APIError
from lmgen.sampling.structured.spec import StructuredOutput
from lmgen.server.protocol.sampling import check_token_ids
from lmgen.server.protocol.structured import structured_output
from lmgen.server.async_engine import AsyncEngine
from lmgen.server.request_stream import RequestStream
from lmgen.engine.outputs import RequestOutput
from lmgen.server.outputs import TokenText
from lmgen.tokenizer.chat_template.template import ChatTemplate

PROMPT_THREADS = 4  # renders and tokenizations in flight at once, off the event loop


class ServerContext:
    def __init__(self, llm, engine: AsyncEngine, model_names: list[str], api_key: str | None,
                 trust_request_chat_template: bool = False):
        self.llm, self.engine = llm, engine
        self.trust_request_chat_template = trust_request_chat_template
        self.model_names = model_names
        self.api_key = api_key
        self.tok = llm.tokenizer
        self.vocab_size = llm.config.vocab_size
        self.context_length = llm.context_length
        self.token_text = TokenText(llm.tokenizer)
        self.created = int(time.time())
        self.fingerprint = system_fingerprint(llm)
        # No token covers more characters than the longest vocabulary piece, so a text longer than
        # context_length times that cannot fit the window: it is refused without tokenizing it.
        pieces = llm.tokenizer.convert_ids_to_tokens(range(llm.tokenizer.vocab_size))
        self.max_prompt_chars = self.context_length * max([len(p) for p in pieces] + [1])
        # Template rendering and tokenization run here, never on the event loop (they can take seconds).
        self.pool = ThreadPoolExecutor(max_workers=PROMPT_THREADS, thread_name_prefix="lmgen-prompt")

    async def offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the prompt threads, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def check_prompt_chars(self, text: str, what: str, param: str) -> None:
        """400 for a text that certainly does not fit the context window, before anything tokenizes it."""
        if len(text) > self.max_prompt_chars:
            raise APIError(
                400, f"This model's maximum context length is {self.context_length} tokens. However, your {what} "
                     f"has {len(text)} characters, more than {self.context_length} tokens can hold "
                     f"({self.max_prompt_chars}). Please shorten the {what}.", param=param,
                code="context_length_exceeded")

    # ---- checks ---------------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided." if header else "Missing API key: send 'Authorization: Bearer <key>'.",
                             type="invalid_request_error", code="invalid_api_key")

    def check_model(self, name: str | None, required: bool = True) -> None:
        if name is None and not required:
            return
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist. Available: {', '.join(self.model_names)}.",
                             param="model", code="model_not_found")

    # ---- admission ------------------------------------------------------------------------------
    async def admit(self, jobs: list[tuple[list[int], SamplingParams]], rid: str) -> list[RequestStream]:
        """Adds every job or none."""
        streams: list[RequestStream] = []
        try:
            for i, (ids, sp) in enumerate(jobs):
                streams.append(await self.engine.add_request(ids, sp, rid if len(jobs) == 1 else f"{rid}-{i}"))
        except BaseException:
            for s in streams:
                s.abort()
            raise
        return streams

    @staticmethod
    async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
        """Waits for every stream's finished RequestOutput (aborting them all if this is cancelled)."""
        async def one(stream: RequestStream) -> RequestOutput:
            async for _ in stream:
                pass
            return stream.result

        try:
            return list(await asyncio.gather(*(one(s) for s in streams)))
        finally:
            for s in streams:
                s.abort()

    @staticmethod
    def usage(prompt_lens: list[int], cached: list[int], completion_tokens: int,
              spec: tuple[int, int] = (0, 0)) -> R.Usage:
        """OpenAI usage; `spec` = (tokens proposed, tokens accepted) adds spec_acceptance_rate when any were proposed."""
        prompt = sum(prompt_lens)
        return R.Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens,
                       prompt_tokens_details=R.PromptTokensDetails(cached_tokens=sum(cached)),
                       spec_acceptance_rate=round(spec[1] / spec[0], 4) if spec[0] else None)

    @staticmethod
    def spec_counts(results: list) -> tuple[int, int]:
        """(tokens proposed, tokens accepted) over RequestOutputs' metrics or StepOutputs (speculative decoding)."""
        draft = accepted = 0
        for r in results:
            if hasattr(r, "metrics"):
                draft += int(r.metrics.get("spec_draft_tokens", 0))
                accepted += int(r.metrics.get("spec_accepted_tokens", 0))
            else:
                draft, accepted = draft + r.num_draft_tokens, accepted + r.num_accepted_tokens
        return draft, accepted

    # ---- logprobs -------------------------------------------------------------------------------
    def completion_logprobs(self, pairs: list[tuple[int, dict | None]], k: int, offset: int) -> tuple[R.CompletionLogprobs, int]:
        """OpenAI legacy logprobs for (token, entry) pairs; entries hold top-k plus the chosen token.
        `top_logprobs` lists the k best and the chosen one (as vLLM). Returns the next text offset."""
        lp = R.CompletionLogprobs()
        for tid, entry in pairs:
            text = self.token_text.text(tid)
            lp.tokens.append(text)
            lp.text_offset.append(offset)
            offset += len(text)
            if entry is None:  # the first prompt token has no prediction
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(entry.get(tid))
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            if tid not in dict(ranked):
                ranked.append((tid, entry[tid]))
            top: dict[str, float] = {}
            for t, v in ranked:
                top.setdefault(self.token_text.text(t), v)
            lp.top_logprobs.append(top)
        return lp, offset

    def chat_logprobs(self, pairs: list[tuple[int, dict]], k: int) -> R.ChoiceLogprobs:
        content = []
        for tid, entry in pairs:
            ranked = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(R.TokenLogprob(
                token=self.token_text.text(tid), logprob=entry[tid], bytes=self.token_text.bytes(tid),
                top_logprobs=[R.TopLogprob(token=self.token_text.text(t), logprob=v, bytes=self.token_text.bytes(t))
                              for t, v in ranked]))
        return R.ChoiceLogprobs(content=content)

    # ---- chat prompt ----------------------------------------------------------------------------
    async def render_messages(self, messages: list[Q.ChatMessage], add_generation_prompt: bool,
                              chat_template: str | None = None, extra: dict | None = None,
                              fit_context: bool = True, tools: Tools | None = None) -> list[int]:
        """Prompt ids of a conversation, rendered and tokenized in the prompt threads. A request's own
        `chat_template` is template text (or a built-in / the model's named template), never a file, and
        only taken when the server trusts request templates."""
        if chat_template is not None and not self.trust_request_chat_template:
            raise APIError(400, "chat_template is not accepted in requests by this server (start it with "
                                  "--trust-request-chat-template to allow it)", param="chat_template")
        msgs = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages[{i}].content: only text parts are supported, got type {part.type!r}",
                                         param="messages")
                    texts.append(part.text)
                content = "\n".join(texts)
            d: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
            if m.name is not None:
                d["name"] = m.name
            for key, value in (m.model_extra or {}).items():
                if value is not None:
                    d[key] = value
            msgs.append(d)
        if not msgs:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            if tools is not None:  # a template that takes `tools` gets them; another gets them described
                msgs, more = tools.messages_for(msgs, await self.offload(self.template_source, chat_template))
                extra = {**(extra or {}), **more}
            text = await self.offload(self._render, msgs, add_generation_prompt, chat_template, extra or {})
        except (APIError, InvalidRequestError):
            raise
        except ChatTemplateLimitError as e:
            raise APIError(400, f"the chat template went over a limit: {e}",
                             param="chat_template" if chat_template is not None else "messages",
                             code="chat_template_limit") from None
        except Exception as e:  # the template raised (bad roles, raise_exception(), ...)
            raise APIError(400, f"could not apply the chat template: {e}",
                             param="chat_template" if chat_template is not None else "messages") from None
        if fit_context:
            self.check_prompt_chars(text, "messages", "messages")
        return await self.offload(self.tok.encode, text, False)

    def template_source(self, chat_template: str | None) -> str | None:
        """The Jinja source a chat request renders with (to tell whether it takes `tools`)."""
        return template_source(self.tok, chat_template or self.llm.chat_template, allow_files=chat_template is None)

    def constraint(self, req: Any, tools: Tools | None = None) -> StructuredOutput | None:
        """The request's output constraint (response_format / guided_* / tools), compiled for this model now, in a
        prompt thread (bounded by the grammar limits; the engine thread then only copies the compiled matcher)."""
        spec = structured_output(req)
        tool_spec = tools.structured() if tools is not None else None
        if spec is not None and tool_spec is not None:
            raise InvalidRequestError(f"{spec.param} cannot be combined with tools unless tool_choice is 'none'",
                                      param="tool_choice", value=tools.choice)
        spec = spec or tool_spec
        if spec is not None:
            self.llm.engine.grammar_backend.matcher(spec)
        return spec

    def _render(self, msgs: list[dict], add_generation_prompt: bool, chat_template: str | None, extra: dict) -> str:
        """The prompt text (runs in a prompt thread): the operator's / model's template, or the request's."""
        extra = {**self.llm.chat_template_kwargs, **extra}  # the request's chat_template_kwargs over the server's
        if chat_template is None:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                chat_template=self.llm.chat_template, **extra)
        named = self.tok.chat_templates.get(chat_template)
        if named is not None:
            template = ChatTemplate(named, self.tok.bos_token, self.tok.eos_token)
        else:
            template = ChatTemplate.resolve(chat_template, self.tok.bos_token, self.tok.eos_token, allow_files=False)
        return template.render(msgs, add_generation_prompt=add_generation_prompt, **extra)


async def completion_prompts(srv: ServerContext, req: Q.CompletionRequest) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids) for each prompt of a completions request; tokenized in the prompt threads
    after a cheap length check."""
    prompt = req.prompt
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        items = [prompt]
    else:
        items = list(prompt)
    for p in items:
        if isinstance(p, str):
            srv.check_prompt_chars(p, "prompt", "prompt")
        elif len(p) > srv.context_length:
            raise APIError(400, f"This model's maximum context length is {srv.context_length} tokens. However, "
                                  f"your prompt has {len(p)} tokens. Please shorten the prompt.", param="prompt",
                             code="context_length_exceeded")
    return await srv.offload(_tokenize_prompts, srv, items, req.add_special_tokens)


def _tokenize_prompts(srv: ServerContext, items: list, add_special_tokens: bool) -> list[tuple[str, list[int]]]:
    out = []
    for p in items:
        if isinstance(p, str):
            ids = srv.tok.encode(p, add_special_tokens=add_special_tokens)
            text = p
        else:
            check_token_ids(p, srv.vocab_size, "prompt")
            ids, text = list(p), srv.tok.decode(p)
        if not ids:
            raise APIError(400, "the prompt is empty: give at least one token", param="prompt")
        out.append((text, ids))
    return out


def system_fingerprint(llm) -> str:
    """OpenAI's `system_fingerprint`: names the backend configuration that can change outputs (lmgen's version,
    the model file, dtype, quantization, batch invariance), so a client can tell when the same request may answer
    differently."""
    import hashlib

    from lmgen.doctor import lmgen_version

    config = "|".join(str(x) for x in (lmgen_version(), llm.model_name, llm.dtype, llm.quantization,
                                       getattr(llm.model, "batch_invariant", "")))
    return "fp_" + hashlib.sha256(config.encode()).hexdigest()[:12]
