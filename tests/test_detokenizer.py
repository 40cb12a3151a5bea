"""IncrementalDetokenizer: streamed deltas == the non-incremental decode, never half a character, never a
piece of a stop string that then completes."""

from __future__ import annotations

import pytest
from conftest_tokenizer_helpers import sentencepiece_to_gguf, train_sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmgen.tokenizer.detokenizer import IncrementalDetokenizer
from lmgen.tokenizer.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smol(gguf_path):
    return Tokenizer.from_gguf(str(gguf_path))


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    """A SentencePiece-style vocabulary (▁ spaces, <0xNN> byte fallback, leading space stripped on decode)."""
    workdir = tmp_path_factory.mktemp("spm_detok")
    return Tokenizer.from_gguf(str(sentencepiece_to_gguf(train_sentencepiece(workdir), workdir / "spm.gguf")))


def stream(tokenizer, ids, chunks=None, **kwargs):
    """Feed `ids` (one at a time, or in the given chunk sizes), then flush. Returns (detokenizer, deltas),
    checking after every call that what was released only grows and matches the text so far."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas = []
    sizes = chunks or [1] * len(ids)
    pos = 0
    for size in sizes:
        if pos >= len(ids):
            break
        deltas.append(detok.add_tokens(ids[pos : pos + size]))
        pos += size
        assert "".join(deltas) == detok.released_text
        assert detok.text.startswith(detok.released_text)
    if pos < len(ids):
        deltas.append(detok.add_tokens(ids[pos:]))
    deltas.append(detok.flush())
    return detok, deltas


# --- random text --------------------------------------------------------------------------------------

CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
EMOJI = st.sampled_from(
    ["👩‍👩‍👧", "👨‍👩‍👧‍👦", "🧑‍💻", "👍🏽", "🇫🇷", "🇯🇵", "😀", "❤️", "🏳️‍🌈", "🤖", "🫠"]
)
COMBINING = st.tuples(
    st.sampled_from("aeiouAEnc"),
    st.text(st.characters(min_codepoint=0x300, max_codepoint=0x36F), min_size=1, max_size=3),
).map("".join)
ASCII = st.text(st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\n\t "), max_size=10)
ANY = st.characters(exclude_categories=("Cs",))  # any code point but lone surrogates
CHUNK = st.one_of(CJK, EMOJI, COMBINING, ASCII, ASCII, ANY)
TEXT = st.lists(CHUNK, max_size=14).map("".join)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_stream(tokenizer, ids, deltas, expected, full):
    assert "".join(deltas) == expected
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas)


@SETTINGS
@given(text=TEXT)
def test_stream_equals_decode(smol, text):
    ids = smol.encode(text, add_special_tokens=False)
    full = smol.decode(ids, skip_special_tokens=True)
    detok, deltas = stream(smol, ids)
    _check_stream(smol, ids, deltas, full, full)
    assert detok.output_text == full and detok.stop_string is None
    # (not always == text: SmolLM2's vocabulary lacks a few bytes, e.g. 0xF1, which get dropped)


@SETTINGS
@given(text=TEXT, data=st.data())
def test_stop_string_from_inside_the_text(smol, text, data):
    ids = smol.encode(text, add_special_tokens=False)
    full = smol.decode(ids, skip_special_tokens=True)
    if not full:
        return
    start = data.draw(st.integers(0, len(full) - 1), label="start")
    end = data.draw(st.integers(start + 1, min(len(full), start + 8)), label="end")
    stop = full[start:end]
    expected = full[: full.find(stop)]
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(ids)), label="chunks") or None
    detok, deltas = stream(smol, ids, chunks=chunks, stop=[stop])
    _check_stream(smol, ids, deltas, expected, full)
    assert detok.stop_string == stop
    assert detok.output_text == expected
    # nothing of the stop string was ever released: what was shown is exactly the text before it
    assert detok.released_text == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_sentencepiece_stream_equals_decode(spm_tok, text, data):
    """Byte-fallback tokens and the stripped leading space of a SentencePiece decode."""
    ids = spm_tok.encode(text, add_special_tokens=False)
    full = spm_tok.decode(ids, skip_special_tokens=True)
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)), label="chunks") or None
    detok, deltas = stream(spm_tok, ids, chunks=chunks)
    _check_stream(spm_tok, ids, deltas, full, full)
    assert detok.output_text == full


def _check_prompt_context(tokenizer, text, data):
    ids = tokenizer.encode(text)
    if not ids or REPLACEMENT in tokenizer.decode(ids):
        return  # (bytes the vocabulary lacks decode as U+FFFD: no clean prompt text to continue)
    cut = data.draw(st.integers(1, len(ids)), label="cut")
    prompt, generated = ids[:cut], ids[cut:]
    # a character the prompt leaves incomplete is output whole
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=True).rstrip(REPLACEMENT)
    expected = tokenizer.decode(prompt + generated, skip_special_tokens=True)[len(prompt_text) :]
    detok, deltas = stream(tokenizer, generated, prompt_token_ids=prompt)
    _check_stream(tokenizer, generated, deltas, expected, expected)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_prompt_context_stream_equals_decode_in_context(spm_tok, text, data):
    """With prompt ids as context, the output is what the generated ids add to the prompt's text."""
    _check_prompt_context(spm_tok, text, data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data())
def test_prompt_context_byte_level(smol, text, data):
    _check_prompt_context(smol, text, data)


# --- hand cases ------------------------------------------------------------------------------------


def test_chinese_characters_split_over_byte_tokens(smol):
    text = "大语言模型生成词元，流式输出。"
    ids = smol.encode(text)
    # some characters really are split over several tokens: a lone token decodes to U+FFFD
    assert any(REPLACEMENT in smol.decode([i]) for i in ids)
    detok, deltas = stream(smol, ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in d for d in deltas)
    assert "" in deltas[:-1]  # something was held back while a character was incomplete
    # every delta is whole characters of the text, in order
    pos = 0
    for d in deltas:
        assert text[pos : pos + len(d)] == d
        pos += len(d)


def test_stop_string_spanning_three_tokens(smol):
    text = "The answer is forty-two. Done."
    ids = smol.encode(text)
    pieces = [smol.decode([i]) for i in ids]
    assert pieces[3:6] == [" forty", "-", "two"]  # the stop string spans these three tokens
    detok = IncrementalDetokenizer(smol, stop=["forty-two"])
    deltas = [detok.add_tokens([i]) for i in ids]
    # " forty" and "-" are held back as a possible start of the stop string, then dropped with it
    assert deltas[:6] == ["The", " answer", " is", " ", "", ""]
    assert deltas[6:] == [""] * (len(ids) - 6)  # after the stop, nothing more
    assert detok.stop_string == "forty-two"
    assert detok.output_text == "The answer is "
    assert detok.flush() == ""


def test_held_prefix_released_when_the_stop_string_does_not_complete(smol):
    ids = smol.encode("Say forty-")
    detok = IncrementalDetokenizer(smol, stop=["forty-two"])
    released = "".join(detok.add_tokens([i]) for i in ids)
    assert released == "Say "
    assert detok.flush() == "forty-"  # end of generation: the partial match is ordinary text
    assert detok.stop_string is None and detok.output_text == "Say forty-"
    # ... and also when the text moves on
    detok = IncrementalDetokenizer(smol, stop=["forty-two"])
    out = "".join(detok.add_tokens([i]) for i in smol.encode("Say forty-one"))
    assert out == "Say forty-one"


def test_first_stop_string_to_complete_wins(smol):
    ids = smol.encode("abc def ghi")
    detok, deltas = stream(smol, ids, stop=["def ghi", "c d"])
    assert detok.stop_string == "c d" and "".join(deltas) == "ab"
    # chunking does not change the answer
    detok, deltas = stream(smol, ids, chunks=[len(ids)], stop=["def ghi", "c d"])
    assert detok.stop_string == "c d" and "".join(deltas) == "ab"


def test_special_tokens_skipped_or_shown(smol):
    ids = smol.encode("<|im_start|>assistant\nHello<|im_end|>")
    detok, deltas = stream(smol, ids)
    assert "".join(deltas) == "assistant\nHello"
    detok, deltas = stream(smol, ids, skip_special_tokens=False)
    assert "".join(deltas) == "<|im_start|>assistant\nHello<|im_end|>"
    # a stop string made of special-token text only matches when specials are shown
    detok, deltas = stream(smol, ids, skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(deltas) == "<|im_start|>assistant\nHello" and detok.stop_string == "<|im_end|>"


def test_incomplete_character_at_the_end_matches_decode(smol):
    ids = smol.encode("ok 👍")
    ids = ids[:-1]  # cut inside the emoji's bytes
    full = smol.decode(ids)
    assert full.endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(smol)
    released = "".join(detok.add_tokens([i]) for i in ids)
    assert REPLACEMENT not in released
    assert released + detok.flush() == full == detok.output_text


def test_prompt_context_gives_the_first_token_its_space(spm_tok):
    prompt = spm_tok.encode("Hello")
    generated = spm_tok.encode("Hello world again", add_special_tokens=False)[len(prompt) - 1 :]
    assert spm_tok.convert_ids_to_tokens(generated)[0].startswith("▁")
    # without context the first token's leading space goes, as in decode(generated)
    detok, deltas = stream(spm_tok, generated)
    assert "".join(deltas) == spm_tok.decode(generated) == "world again"
    # with the prompt as context it stays, as in decode(prompt + generated)
    detok, deltas = stream(spm_tok, generated, prompt_token_ids=prompt)
    assert "".join(deltas) == " world again"
    assert spm_tok.decode(prompt + generated, skip_special_tokens=True) == "Hello world again"


def test_add_tokens_after_finish(smol):
    detok = IncrementalDetokenizer(smol, stop=["b"])
    assert detok.add_tokens(smol.encode("a b c")) == "a "
    assert detok.add_tokens(smol.encode(" more")) == ""
    assert detok.flush() == ""
    assert detok.output_text == "a "
    assert detok.token_ids == smol.encode("a b c")  # ids after the stop are not recorded


def test_prompt_ending_inside_a_character(smol):
    ids = smol.encode("你好世界")
    cut = next(k for k in range(1, len(ids)) if smol.decode(ids[:k]).endswith(REPLACEMENT))
    prompt, generated = ids[:cut], ids[cut:]
    complete = smol.decode(prompt).rstrip(REPLACEMENT)
    detok, deltas = stream(smol, generated, prompt_token_ids=prompt)
    # the character the prompt started is output whole, then the rest
    assert "".join(deltas) == "你好世界"[len(complete) :]
    assert not any(REPLACEMENT in d for d in deltas)


def test_sentencepiece_truncated_character(spm_tok):
    """Generation cut inside a character (length limit): the complete characters before it are released
    at once, the tail shows as U+FFFD only at the end, as in decode()."""
    ids = spm_tok.encode("xa\u0300\u0300", add_special_tokens=False)[:-1]  # drop the last byte token
    assert spm_tok.convert_ids_to_tokens(ids)[-3:] == ["<0xCC>", "<0x80>", "<0xCC>"]
    full = spm_tok.decode(ids)
    assert full == "xa\u0300\ufffd"
    detok = IncrementalDetokenizer(spm_tok)
    released = "".join(detok.add_tokens([i]) for i in ids)
    assert released == "xa\u0300"
    assert released + detok.flush() == full


def test_byte_fallback_runs_are_held_for_other_decoders(tmp_path, spm_tok):
    """With tokenizers' own ByteFallback decoding, a run of byte tokens that ends badly turns wholly into
    U+FFFDs, so the detokenizer holds byte runs back until they end."""
    import json

    from tokenizers import decoders

    tk = spm_tok.backend_tokenizer
    tk = type(tk).from_str(tk.to_str())
    tk.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer.from_hf_folder(tmp_path)
    ids = spm_tok.encode("xa\u0300\u0300", add_special_tokens=False)[:-1]
    full = tok.decode(ids)
    assert full == "xa" + REPLACEMENT * 3  # the whole run, although its first two bytes were a character
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == full
    assert not any(REPLACEMENT in d for d in deltas[:-1])  # nothing of the run was shown early
    # complete runs still stream, and agree with decode
    ids = spm_tok.encode("大语言 model 模型", add_special_tokens=False)
    detok, deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == "大语言 model 模型"
