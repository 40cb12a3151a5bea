"""The fast frame for a stream's text deltas is byte for byte the event the response models make, for any text
(Chinese, emoji, quotes, backslashes, control characters, line separators), any index and any request fields."""

from __future__ import annotations

import json
import random

import pytest

from lmgen.server.protocol import responses as R
from lmgen.server.sse import TextFrames, sse

TEXTS = ["", " the", "你好，世界", "生成文本", "🙂👍🏽", '"quoted" \\back\\slash', "tab\there\nnew line\r",
         "\x00\x01\x1f\x7f", "\u2028\u2029", "</script>", "\ufffd", "a" * 5000, "data: [DONE]\n\n"]


def _random_text(rng: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x80, 0x7FF), (0xE000, 0xF8FF)]
    out = []
    for _ in range(rng.randint(0, 40)):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _completion(model: str, fingerprint: str | None):
    return lambda index, text: R.CompletionChunk(id="cmpl-1", created=1764547200, model=model,
                                                 system_fingerprint=fingerprint,
                                                 choices=[R.CompletionChoice(index=index, text=text)])


def _chat(model: str, fingerprint: str | None):
    return lambda index, text: R.ChatCompletionChunk(id="chatcmpl-1", created=1764547200, model=model,
                                                     system_fingerprint=fingerprint,
                                                     choices=[R.ChatChunkChoice(index=index,
                                                                                delta=R.DeltaMessage(content=text))])


@pytest.mark.parametrize("make", [_completion, _chat])
@pytest.mark.parametrize("model, fingerprint", [("smollm2", "fp_1"), ('模型 "q" \\', None), ("\x00lmgen-text", "fp")])
def test_text_frames_equal_the_models_events(make, model, fingerprint):
    build = make(model, fingerprint)
    frames = TextFrames(build)
    rng = random.Random(0)
    texts = TEXTS + [_random_text(rng) for _ in range(300)]
    for i, text in enumerate(texts):
        index = i % 7
        got = frames.frame(index, text)
        assert got == sse(build(index, text)), (index, text)
        assert got.startswith("data: ") and got.endswith("\n\n") and got.count("\n") == 2  # one event, whatever the text
        assert json.loads(got[6:])["choices"][0]["index"] == index


def test_a_render_holding_the_marker_twice_stays_on_the_models_path():
    mark = "\x00lmgen-text\x00"  # a request field equal to the marker: the event is built by the models every time
    build = _completion(mark, mark)
    frames = TextFrames(build)
    for text in ("a", "你好", mark):
        assert frames.frame(0, text) == sse(build(0, text))
