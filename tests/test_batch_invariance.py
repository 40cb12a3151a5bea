"""Batch invariance: a request's token ids and logprobs are bit-identical whatever else shares its steps.

Modelled on SGLang's determinism tests (single / mixed / prefix), on the embedded model in its default packed
mode and on the float path (quantization="none"):
  single  the same prompt alone and inside batches of 1, 2, 8 and 32 other requests, greedy and seeded
          temperature=0.8 sampling, with logprobs;
  mixed   requests of very different prompt lengths arriving while others decode (steps that mix prefill
          chunks and decode tokens), driven through Engine.add_request / step;
  prefix  a prompt served after a prefix-cache hit vs cold;
  chunks  a long prompt prefilled with max_num_batched_tokens 16, 64 and 512.
Plus the server: 32 concurrent streamed greedy requests with staggered arrival through the official openai
client equal their solo answers.  Equality is ==, never allclose.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from lmgen import LLM, SamplingParams
from lmgen.engine.engine import Engine

TEXT = ("The history of the printing press begins in East Asia, where woodblock printing was used on cloth and "
        "paper. 大语言模型逐个生成词元。 Movable type followed, and centuries later Gutenberg's press changed "
        "how Europe shared knowledge, from bibles and pamphlets to scientific journals and newspapers. ")
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.8, seed=1234, ignore_eos=True, logprobs=3)


def others(llm: LLM, count: int, seed: int = 0) -> list[list[int]]:
    """`count` filler prompts of very different lengths (1 to ~200 tokens)."""
    ids = llm.tokenizer.encode(TEXT * 3, add_special_tokens=False)
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice([1, 3, 7, 20, 45, 90, 150])
        start = rng.randrange(0, len(ids) - n)
        out.append(ids[start:start + n])
    return out


def result(out) -> tuple[list[int], list[dict[int, float]]]:
    c = out.outputs[0]
    return c.token_ids, c.logprobs


def drive(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict[str, tuple]:
    """Runs an engine step by step, adding each `arrivals[step]` before that step; returns each request's
    (token ids, logprobs) once finished."""
    done: dict[str, tuple] = {}
    seen: dict[str, tuple[list, list]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for name, prompt, params in arrivals.get(step, ()):
            engine.add_request(prompt, params, request_id=name)
            seen[name] = ([], [])
        for out in engine.step():  # EngineCoreOutputs: this step's token ids and logprobs per sequence
            tokens, logprobs = seen[out.request_id]
            tokens.extend(out.new_token_ids)
            logprobs.extend(dict(d) for d in out.new_logprobs or ())
            if out.finished:
                done[out.request_id] = (tokens, logprobs)
        step += 1
    return done


def fresh_engine(llm: LLM, **kw) -> Engine:
    """Another engine (own KV cache, scheduler) over the same loaded model."""
    kw.setdefault("max_num_batched_tokens", 2048)
    kw.setdefault("enable_prefix_caching", False)
    kw.setdefault("kv_cache_dtype", llm.kv_cache_dtype)  # the same cache element type as llm's own engine
    return Engine(llm.model, eos_token_ids=llm.eos_token_ids, context_length=llm.context_length, num_blocks=512,
                  block_size=16, max_num_seqs=64, **kw)


@pytest.fixture(scope="module")
def packed_llm():
    return LLM()  # the default: quantization="auto" (packed Q4_1 / Q8_0), batch-invariant


@pytest.fixture(scope="module", params=["packed", "float"])
def llm(request, packed_llm):
    return packed_llm if request.param == "packed" else request.getfixturevalue("smol_llm")


def test_default_is_batch_invariant(packed_llm):
    assert packed_llm.model.batch_invariant and packed_llm.model._fused is not None


def test_single_prompt_alone_and_in_batches(llm):
    target = llm.tokenizer.encode("Once upon a time, in a small village by the mountains,", add_special_tokens=True)
    alone = {name: result(llm.generate([target], p)[0]) for name, p in (("greedy", GREEDY), ("sampled", SAMPLED))}
    for k in (1, 2, 8, 32):
        fill = others(llm, k, seed=k)
        prompts = fill[: k // 2] + [target, target] + fill[k // 2:]
        params = [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)] * (k // 2) + [GREEDY, SAMPLED] \
            + [SamplingParams(max_tokens=3 + i % 6, temperature=1.0, seed=i, ignore_eos=True) for i in range(k - k // 2)]
        outs = llm.generate(prompts, params)
        assert result(outs[k // 2]) == alone["greedy"], f"greedy, {k} others"
        assert result(outs[k // 2 + 1]) == alone["sampled"], f"sampled, {k} others"
    tokens, logprobs = alone["sampled"]
    assert len(tokens) == 8 and all(math.isfinite(v) for d in logprobs for v in d.values())


def test_mixed_prefill_and_decode_steps(llm):
    assert_mixed_steps_equal_alone(llm)


def test_int8_cache_mixed_steps_equal_alone(packed_llm):
    """An int8 cache row's scale is its own block's: the int8 cache keeps a request's results independent too."""
    assert_mixed_steps_equal_alone(packed_llm, kv_cache_dtype="int8")


def assert_mixed_steps_equal_alone(llm, **engine_kw):
    ids = llm.tokenizer.encode(TEXT * 2, add_special_tokens=False)
    short, mid, long = ids[:4], ids[:37], ids[:150]
    reqs = {"short": (short, GREEDY), "mid": (mid, SAMPLED), "long": (long, GREEDY), "one": (ids[5:6], SAMPLED)}
    alone = {}
    for name, (prompt, params) in reqs.items():
        alone.update(drive(fresh_engine(llm, **engine_kw), {0: [(name, prompt, params)]}))
    # a 48-token budget: the long prompt is prefilled in chunks beside the others' decode tokens, and requests
    # arrive while others decode
    arrivals = {0: [("short", short, GREEDY)], 2: [("long", long, GREEDY), ("x1", ids[50:60], GREEDY)],
                3: [("mid", mid, SAMPLED)], 5: [("one", ids[5:6], SAMPLED), ("x2", ids[9:80], SAMPLED)]}
    mixed = drive(fresh_engine(llm, max_num_batched_tokens=48, **engine_kw), arrivals)
    for name in reqs:
        assert mixed[name] == alone[name], name


def test_prefix_cache_hit_equals_cold(llm):
    ids = llm.tokenizer.encode(TEXT, add_special_tokens=False)
    prompt = ids[:70] + ids[80:90]
    cold = drive(fresh_engine(llm), {0: [("p", prompt, SAMPLED)]})["p"]  # no prefix cache at all
    first = llm.generate([ids[:70] + ids[100:104]], GREEDY)[0]  # fills the cache with the first 64 tokens' blocks
    again = llm.generate([prompt], SAMPLED)[0]
    assert again.num_cached_tokens == 64  # the RequestOutput says the cache served them
    assert result(again) == cold
    assert len(result(first)[0]) == 8


def test_prefill_chunk_size_does_not_change_results(llm):
    ids = llm.tokenizer.encode(TEXT * 2, add_special_tokens=False)
    prompt = ids[:140]
    runs = {budget: drive(fresh_engine(llm, max_num_batched_tokens=budget),
                          {0: [("p", prompt, SAMPLED), ("q", ids[20:45], GREEDY)]})
            for budget in (16, 64, 512)}
    assert runs[16] == runs[64] == runs[512]


def test_batch_invariant_false_is_opt_in():
    """The non-invariant mode still works (it is the faster generic path for prefill on some machines)."""
    llm = LLM(batch_invariant=False)
    assert not llm.model.batch_invariant
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4


def test_server_32_staggered_streams_equal_solo(tmp_path):
    """32 concurrent streamed greedy requests (completions and chat, prompts of 1 to ~200 tokens), arriving
    30 ms apart so that prefills land among decodes, through the official openai client: 32/32 equal their
    answers sent alone to the same server."""
    openai = pytest.importorskip("openai")
    from server_process import KEY, MODEL, ServerProcess

    words = TEXT.split()
    prompts = [" ".join(words[i % 7: i % 7 + 1 + (i * 37) % len(words)]) for i in range(32)]
    kw = dict(model=MODEL, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    server = ServerProcess(tmp_path, "--quantization", "auto", "--max-num-seqs", "32")
    try:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=300, max_retries=0)

        def solo(i: int) -> str:
            if i % 2:
                msgs = [{"role": "user", "content": prompts[i]}]
                return client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
            return client.completions.create(prompt=prompts[i], **kw).choices[0].text

        alone = [solo(i) for i in range(32)]

        async def run() -> list[str]:
            aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key=KEY, timeout=300, max_retries=0)

            async def one(i: int) -> str:
                await asyncio.sleep(0.03 * i)
                if i % 2:
                    msgs = [{"role": "user", "content": prompts[i]}]
                    stream = await aclient.chat.completions.create(messages=msgs, stream=True, **kw)
                    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                stream = await aclient.completions.create(prompt=prompts[i], stream=True, **kw)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            try:
                return await asyncio.gather(*(one(i) for i in range(32)))
            finally:
                await aclient.close()

        together = asyncio.run(run())
        same = sum(a == b for a, b in zip(alone, together))
        assert same == 32, [(i, a, b) for i, (a, b) in enumerate(zip(alone, together)) if a != b]
        assert len(set(alone)) > 8  # the prompts really differ
    finally:
        server.stop()
