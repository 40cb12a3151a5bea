"""Retrieval-augmented chat: find the passages of the user's documents that match the question, and put them
in the prompt, since the model only knows what it was trained on plus what the prompt says.

Retrieval is lexical: BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework", 2009) with Lucene's
always-positive idf, k1 = 1.2 and b = 0.75 (the usual defaults).  Terms are lower-cased words and numbers; Chinese,
Japanese and Korean text has no spaces, so runs of those characters give their single characters and their
bigrams as terms (the classic CJK indexing of Lucene's CJKAnalyzer).  No embedding model is needed, so it works
with any chat model and offline.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Passage", "Retriever", "split_passages"]

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TERM_RE = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+")
_CJK_RUN = re.compile(rf"[{_CJK}]+")
_SENTENCE_END = re.compile(r"[.!?。！？]+\s*")
CONTEXT_HEADER = "Use the following context to answer. If the answer is not in it, say you do not know."
DOC_SUFFIXES = (".txt", ".md")


@dataclass
class Passage:
    """A piece of a document: its text, where it comes from (file name or given name) and its number there."""

    text: str
    source: str
    index: int
    score: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.source}#{self.index}"


def terms(text: str) -> list[str]:
    """Index terms of `text`: lower-cased words / numbers, and CJK characters plus their bigrams."""
    out: list[str] = []
    for token in _TERM_RE.findall(text.lower()):
        if _CJK_RUN.fullmatch(token):
            out.extend(token)
            out.extend(token[i:i + 2] for i in range(len(token) - 1))
        else:
            out.append(token)
    return out


def split_passages(text: str, max_chars: int = 600) -> list[str]:
    """Chunks of at most `max_chars`: a paragraph (blank-line separated, whitespace runs collapsed) is cut at
    sentence ends, a sentence longer than `max_chars` at spaces (or anywhere, for text without spaces), and
    consecutive short paragraphs are merged."""
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer, got {max_chars!r}")
    chunks: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        # sentence boundaries: after . ! ? and their full-width forms (plus the spaces that follow)
        cuts = [m.end() for m in _SENTENCE_END.finditer(para) if 0 < m.end() < len(para)] + [len(para)]
        start = 0
        while start < len(para):
            fitting = [c for c in cuts if start < c <= start + max_chars]
            if fitting:
                end = fitting[-1]
            else:  # a sentence longer than max_chars: cut at its last space that fits, else (CJK) anywhere
                space = para.rfind(" ", start + 1, start + max_chars + 1)
                end = space if space > start else start + max_chars
            chunks.append(para[start:end].strip())
            start = end
    merged: list[str] = []
    for chunk in filter(None, chunks):
        if merged and len(merged[-1]) + 2 + len(chunk) <= max_chars:
            merged[-1] += "\n\n" + chunk
        else:
            merged.append(chunk)
    return merged


class Retriever:
    """BM25 over passages; `search` ranks them for a query, `augment` puts the best ones into a chat's system
    prompt."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.2, b: float = 0.75):
        if not passages:
            raise ValueError("a Retriever needs at least one passage (the documents were empty)")
        self.passages, self.k1, self.b = list(passages), k1, b
        self._tf = [Counter(terms(p.text)) for p in self.passages]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg_len = sum(self._len) / len(self._len) or 1.0
        df = Counter(t for tf in self._tf for t in tf)
        n = len(self.passages)
        self._idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}

    @classmethod
    def from_texts(cls, texts: dict[str, str] | Sequence[str], max_chars: int = 600) -> "Retriever":
        """From document texts, by name ({name: text}) or as a list (named doc1, doc2, ...)."""
        named = texts.items() if isinstance(texts, dict) else ((f"doc{i + 1}", t) for i, t in enumerate(texts))
        return cls([Passage(chunk, name, i + 1) for name, text in named
                    for i, chunk in enumerate(split_passages(text, max_chars))])

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], max_chars: int = 600) -> "Retriever":
        """From .txt / .md files, or folders of them (searched recursively), read as UTF-8."""
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in DOC_SUFFIXES and f.is_file()))
            elif p.is_file():
                files.append(p)
            else:
                raise ValueError(f"document path {str(p)!r} does not exist")
        if not files:
            raise ValueError(f"no {' / '.join(DOC_SUFFIXES)} documents under {', '.join(map(str, paths))}")
        texts = {}
        for f in files:
            try:
                texts[f.name if f.name not in texts else str(f)] = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"document {str(f)!r} is not UTF-8 text") from None
        return cls.from_texts(texts, max_chars)

    def score(self, query: str, index: int) -> float:
        """BM25 score of passage `index` for `query`."""
        tf, length = self._tf[index], self._len[index]
        norm = self.k1 * (1 - self.b + self.b * length / self._avg_len)
        return sum(self._idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in set(terms(query)) if t in tf)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` best passages for `query` (best first; passages sharing no term with it are never returned)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        scored = [(self.score(query, i), i) for i in range(len(self.passages))]
        best = sorted((s, i) for s, i in scored if s > 0)[::-1][:k]
        return [Passage(self.passages[i].text, self.passages[i].source, self.passages[i].index, s) for s, i in best]

    def augment(self, messages: list[dict], k: int = 3, count_tokens: Callable[[str], int] | None = None,
                max_tokens: int | None = None) -> tuple[list[dict], list[Passage]]:
        """`messages` with the passages that best match the last user message added to the system prompt (a new
        one first if there is none).  With `count_tokens` and `max_tokens`, passages are added best first while
        the context block stays within `max_tokens`.  Returns (new messages, the passages used)."""
        query = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        if not isinstance(query, str):
            return [dict(m) for m in messages], []
        found, used = self.search(query, k), []
        block = ""
        for p in found:
            candidate = block + f"\n[{len(used) + 1}] ({p.label}) {p.text}"
            if count_tokens is not None and max_tokens is not None and count_tokens(candidate) > max_tokens:
                break
            block, used = candidate, used + [p]
        out = [dict(m) for m in messages]
        if not used:
            return out, []
        context = f"{CONTEXT_HEADER}\n\nContext:{block}"
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0]["content"] = out[0]["content"] + "\n\n" + context
        else:
            out.insert(0, {"role": "system", "content": context})
        return out, used
