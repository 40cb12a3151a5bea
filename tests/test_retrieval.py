"""Retrieval-augmented chat: BM25 against its formula, chunking, prompt augmentation, and a real chat that can
only answer from the given document."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lmgen.chat.retrieval import Passage, Retriever, split_passages, terms

LIGHTHOUSE = "The Harbor Lighthouse was built in 1887.\n\nIts keeper, Mara Voss, chose the door code 4417.\n"
TOWN = "The town bakery opens at six in the morning and sells rye bread.\n\nThe mayor rides a red bicycle to work.\n"
ZH = "海港灯塔建于1887年。\n\n镇上的面包店早上六点开门。\n"


def test_terms_words_numbers_and_cjk_bigrams():
    assert terms("The Door-code: 4417!") == ["the", "door", "code", "4417"]
    assert terms("面包店 open") == ["面", "包", "店", "面包", "包店", "open"]


def test_bm25_scores_follow_the_formula():
    docs = ["apple banana apple", "banana cherry", "cherry cherry cherry date"]
    r = Retriever([Passage(t, "d", i) for i, t in enumerate(docs)])
    n, avg = 3, (3 + 2 + 4) / 3

    def bm25(query_terms, doc):
        words = doc.split()
        total = 0.0
        for t in set(query_terms):
            tf = words.count(t)
            if tf:
                df = sum(t in d.split() for d in docs)
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(words) / avg))
        return total

    for q in ("apple", "banana cherry", "date apple", "kiwi"):
        for i, d in enumerate(docs):
            assert r.score(q, i) == pytest.approx(bm25(q.split(), d), rel=1e-12)
    assert [p.text for p in r.search("cherry", k=2)] == [docs[2], docs[1]]  # more occurrences rank first
    assert r.search("kiwi") == []  # nothing shares a term: nothing is returned


def test_split_passages_keeps_all_text_within_max_chars():
    text = "One. Two two! Three three three?\n\n" + "x" * 25 + "\n\n\n第一句。第二句！"
    chunks = split_passages(text, max_chars=12)
    assert all(len(c) <= 12 for c in chunks)
    assert "".join(c.replace("\n\n", "").replace(" ", "") for c in chunks) == text.replace("\n", "").replace(" ", "")
    assert split_passages("a.\n\nb.", max_chars=100) == ["a.\n\nb."]  # short paragraphs merge
    assert split_passages("a long sentence without any end", max_chars=16) == ["a long sentence", "without any end"]
    with pytest.raises(ValueError, match="max_chars"):
        split_passages("x", max_chars=0)


def test_search_english_and_chinese_and_augment():
    r = Retriever.from_texts({"lighthouse.txt": LIGHTHOUSE, "town.md": TOWN, "zh.txt": ZH}, max_chars=80)
    assert r.search("What is the door code of the lighthouse?")[0].source == "lighthouse.txt"
    zh = Retriever.from_texts({"zh.txt": ZH}, max_chars=15)  # one passage per sentence
    assert [p.text for p in zh.search("面包店几点开门？")] == ["镇上的面包店早上六点开门。"]
    assert zh.search("灯塔是哪一年建的")[0].text == "海港灯塔建于1887年。"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who rides a bicycle?"}]
    out, used = r.augment(messages, k=1)
    assert [p.label for p in used] == ["town.md#2"] and messages[0]["content"] == "Be brief."  # input untouched
    assert out[0]["content"].startswith("Be brief.\n\n") and "[1] (town.md#2) The mayor rides a red bicycle" in out[0]["content"]
    assert out[1:] == messages[1:]
    no_system, _ = r.augment(messages[1:], k=1)
    assert no_system[0]["role"] == "system" and no_system[1:] == messages[1:]
    # a token budget keeps only what fits, best first
    out, used = r.augment(messages, k=3, count_tokens=len, max_tokens=60)
    assert len(used) == 1 and len(out[0]["content"]) < len("Be brief.") + 300
    assert r.augment([{"role": "user", "content": "zzz"}], k=2) == ([{"role": "user", "content": "zzz"}], [])


def test_from_paths_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        Retriever.from_paths([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no .txt / .md documents"):
        Retriever.from_paths([tmp_path])
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="bad.txt.*UTF-8"):
        Retriever.from_paths([tmp_path])


def test_chat_answers_from_the_documents_only(tmp_path):
    """`lmgen chat --docs`: the embedded model answers a question only the document knows, and says which
    passages it was given; the same question without documents does not get the code."""
    (tmp_path / "lighthouse.txt").write_text(LIGHTHOUSE, encoding="utf-8")
    (tmp_path / "town.md").write_text(TOWN, encoding="utf-8")
    (tmp_path / "zh.txt").write_text(ZH, encoding="utf-8")
    question = "What is the door code of the Harbor Lighthouse?\n"

    def chat(*flags):
        return subprocess.run([sys.executable, "-m", "lmgen.cli", "chat", "--temperature", "0", "--max-tokens", "30", *flags],
                              input=question, capture_output=True, text=True, timeout=600)

    with_docs = chat("--docs", str(tmp_path), "--docs-k", "2")
    assert with_docs.returncode == 0, with_docs.stderr
    assert "4417" in with_docs.stdout
    assert "[context: lighthouse.txt#1" in with_docs.stderr
    without = chat()
    assert without.returncode == 0 and "4417" not in without.stdout
