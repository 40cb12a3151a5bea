"""LLM.chat / stream_chat: templates, the context window, prefix reuse across turns, end-of-turn tokens."""

from __future__ import annotations

import pytest

from lmgen import ContextOverflowError, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def test_multi_turn_reuses_the_prefix_cache(smol_llm):
    history = [{"role": "system", "content": "You are a terse assistant. " * 8},
               {"role": "user", "content": "Name a color."}]
    first = smol_llm.chat(history, GREEDY)[0]
    history += [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "Another one?"}]
    second = smol_llm.chat(history, GREEDY)[0]
    # the earlier turns' full KV blocks are found in the cache; only the tail is prefilled
    assert second.num_cached_tokens >= len(first.prompt_token_ids) - smol_llm.engine.block_manager.block_size
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids


def test_history_is_fitted_to_the_window_dropping_oldest_turns(tiny_model_dirs):
    from lmgen import LLM

    llm = LLM(str(tiny_model_dirs["llama"]), context_length=120)
    messages = [{"role": "system", "content": "SYSTEM-PROMPT stays."}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question number {i} " * 2}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "the last question"})
    out = llm.chat(messages, SamplingParams(max_tokens=8, temperature=0))[0]
    assert out.dropped_messages > 0 and out.dropped_messages % 2 == 0  # whole user+assistant turns
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert "SYSTEM-PROMPT stays." in prompt and "the last question" in prompt
    assert "question number 0" not in prompt
    assert len(out.prompt_token_ids) + 8 <= 120
    with pytest.raises(ContextOverflowError, match="120"):
        llm.chat([{"role": "user", "content": "word " * 200}], SamplingParams(max_tokens=8))


def test_builtin_template_and_batch_of_conversations(smol_llm):
    convs = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "你好！"}]]
    outs = smol_llm.chat(convs, SamplingParams(temperature=0, max_tokens=8), chat_template="chatml")
    assert len(outs) == 2
    rendered = smol_llm.tokenizer.decode(outs[1].prompt_token_ids)
    assert rendered == "<|im_start|>user\n你好！<|im_end|>\n<|im_start|>assistant\n"  # ChatML, no default system
    for o in outs:
        assert "<|im_end|>" not in o.outputs[0].text


def test_stream_chat_equals_chat(smol_llm):
    msgs = [{"role": "user", "content": "Count from one to five."}]
    streamed = "".join(smol_llm.stream_chat(msgs, GREEDY))
    assert streamed == smol_llm.chat(msgs, GREEDY)[0].outputs[0].text
