"""Corrupt copies of the embedded GGUF: every one ends in a clear, typed error (or a working model) within seconds
and bounded memory; never a traceback, a hang or a runaway allocation (issue 19, item 6).

The offsets to corrupt come from gguf-py's own reader of the intact file (the oracle for where each field lies).
Copies whose corruption is in the header keep only the header's bytes and leave the 96 MB of tensor data a sparse
hole; the few meant to load are full copies. Every copy is tried in a forked child of tests/gguf_fuzz_worker.py
with an address-space ceiling and a time limit.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest

EXTRA_MEMORY_MIB = 1536  # address space a case may add to the worker's; loading the intact model needs ~700
TIMEOUT_S = 60  # per case; the slowest (a full load and two tokens) takes a few seconds on an idle machine


@dataclass(frozen=True)
class Case:
    name: str
    mutate: Callable[[bytearray, "Offsets"], None] | None = None  # edits the header bytes in place
    length: int | None = None  # cut the file to this many bytes (negative: from the end)
    loads: bool = False  # a full copy, expected to give a working model
    expect: str | None = None  # a text the error message must contain; None: error or working model both fine
    key: str | None = None  # the ModelFormatError's `key` field, where the case checks it


class Offsets:
    """Where gguf-py finds each field of the intact file."""

    def __init__(self, path: Path):
        reader = gguf.GGUFReader(str(path))
        base = reader.data.__array_interface__["data"][0]
        self.at = lambda part: part.__array_interface__["data"][0] - base
        self.fields = reader.fields
        self.tensors = {t.name: t.field for t in reader.tensors}
        self.tensor_names = [t.name for t in reader.tensors]
        self.data_offset = reader.data_offset
        self.size = len(reader.data)

    def value(self, key: str) -> int:
        """Byte offset of a scalar's value (or of an array's item count)."""
        field = self.fields[key]
        return self.at(field.parts[4] if len(field.parts) > 4 and field.types[0] == gguf.GGUFValueType.ARRAY else field.parts[-1])

    def key_len(self, key: str) -> int:
        return self.at(self.fields[key].parts[0])

    def value_type(self, key: str) -> int:
        return self.at(self.fields[key].parts[2])

    def array_item(self, key: str, index: int) -> int:
        """Byte offset of the length of string item `index` of a string array."""
        return self.at(self.fields[key].parts[5 + 2 * index])

    def tensor(self, name: str, part: str) -> int:
        """Byte offset of a tensor table entry's name length, dimension count, first dimension, type or offset."""
        parts = self.tensors[name].parts
        return self.at(parts[{"name": 0, "n_dims": 2, "dims": 3, "type": 4, "offset": 5}[part]])


def u32(key_or_at, value: int, tensor_part: str | None = None):
    return _put("<I", key_or_at, value, tensor_part)


def u64(key_or_at, value: int, tensor_part: str | None = None):
    return _put("<Q", key_or_at, value, tensor_part)


def f32(key: str, value: float):
    return _put("<f", key, value, None)


def _put(fmt: str, where, value, tensor_part):
    def mutate(buf: bytearray, o: Offsets) -> None:
        if isinstance(where, int):
            at = where
        elif tensor_part is not None:
            at = o.tensor(where, tensor_part)
        elif callable(where):
            at = where(o)
        else:
            at = o.value(where)
        struct.pack_into(fmt, buf, at, value)
    return mutate


def raw(at: Callable[[Offsets], int], data: bytes):
    def mutate(buf: bytearray, o: Offsets) -> None:
        pos = at(o)
        buf[pos:pos + len(data)] = data
    return mutate


LAST = "output_norm.weight"  # the tensor stored last
CASES = [
    # truncations
    Case("empty file", length=0, expect="not a readable GGUF file"),
    Case("cut in the magic", length=3, expect="not a readable GGUF file"),
    Case("cut in the counts", length=20, expect="shorter than a GGUF header"),
    Case("cut after the counts", length=30, expect="GGUF.tensor_count declares 272 entries; the file has room for at most 0"),
    Case("cut in the token strings", length=500_000, expect="tokenizer.ggml.tokens"),
    Case("cut in the merges", length=1_200_000, expect="tokenizer.ggml.merges"),
    Case("cut in the tensor table", length=1_780_000, expect="name needs 8 bytes but the file ends"),
    Case("cut where the tensor data starts", length=1_785_664, expect="lies past the end of the file"),
    Case("cut halfway through the tensor data", length=50_000_000, expect="lies past the end of the file"),
    Case("one byte short", length=-1, expect=f"tensor '{LAST}'"),
    # header fields
    Case("magic flipped", raw(lambda o: 3, b"G"), expect="not a readable GGUF file"),
    Case("version 1", u32(4, 1), expect="GGUF version 1"),
    Case("version 0xfffffff0", u32(4, 0xFFFFFFF0), expect="GGUF version"),
    Case("tensor count 2**60", u64(8, 1 << 60), expect="GGUF.tensor_count declares 1152921504606846976"),
    Case("kv count 2**60", u64(16, 1 << 60), expect="GGUF.kv_count declares 1152921504606846976", key="GGUF.kv_count"),
    Case("kv count one more", u64(16, 34)),
    Case("tensor count one less", u64(8, 271)),
    # metadata strings and arrays
    Case("key length 2**62", u64(lambda o: o.key_len("general.architecture"), 1 << 62), expect="metadata key 0"),
    Case("architecture string length 2**40", u64(lambda o: o.value("general.architecture") - 8, 1 << 40),
         expect="general.architecture: a string length of 1099511627776"),
    Case("token count 2**60", u64("tokenizer.ggml.tokens", 1 << 60), expect="tokenizer.ggml.tokens declares"),
    Case("token_type count 2**60", u64("tokenizer.ggml.token_type", 1 << 60),
         expect="tokenizer.ggml.token_type declares 1152921504606846976", key="tokenizer.ggml.token_type"),
    Case("merges count 2**60", u64("tokenizer.ggml.merges", 1 << 60), expect="tokenizer.ggml.merges declares"),
    Case("token_type count 2**21 + 1", u64("tokenizer.ggml.token_type", (1 << 21) + 1), expect="lmgen's limit"),
    Case("token 1000 length 2**50", u64(lambda o: o.array_item("tokenizer.ggml.tokens", 1000), 1 << 50),
         expect="tokenizer.ggml.tokens: item 1000 has a string length"),
    Case("token_type one short", u64("tokenizer.ggml.token_type", 49151)),
    Case("value type code 99", u32(lambda o: o.value_type("llama.block_count"), 99),
         expect="llama.block_count: unknown value type code 99"),
    Case("array item type 77", u32(lambda o: o.value("tokenizer.ggml.merges") - 4, 77),
         expect="unknown array item type code 77"),
    Case("key not UTF-8", raw(lambda o: o.key_len("llama.block_count") + 8, b"\xff\xfe"), expect="not valid UTF-8"),
    Case("architecture llamb", raw(lambda o: o.value("general.architecture") + 4, b"b"), expect="'llamb'"),
    Case("block_count key renamed", raw(lambda o: o.key_len("llama.block_count") + 8 + 16, b"u"),
         expect="missing the required key 'llama.block_count'"),
    # dimensions, head counts and other numbers
    Case("head_count 0", u32("llama.attention.head_count", 0), expect="llama.attention.head_count must be",
         key="llama.attention.head_count"),
    Case("rope.dimension_count 0", u32("llama.rope.dimension_count", 0), expect="llama.rope.dimension_count must be",
         key="llama.rope.dimension_count"),
    Case("head_count_kv 0", u32("llama.attention.head_count_kv", 0), expect="llama.attention.head_count_kv must be"),
    Case("head_count 4 over 3 kv heads", u32("llama.attention.head_count", 4), expect="not a multiple of"),
    Case("head_count 6 (q rows disagree)", u32("llama.attention.head_count", 6), expect="blk.0.attn_q.weight"),
    Case("embedding_length 2**31", u32("llama.embedding_length", 1 << 31), expect="model.embed_tokens.weight"),
    Case("block_count 2**31", u32("llama.block_count", 1 << 31), expect="llama.block_count = 2147483648"),
    Case("block_count 0", u32("llama.block_count", 0), expect="llama.block_count must be"),
    Case("feed_forward_length 0", u32("llama.feed_forward_length", 0), expect="llama.feed_forward_length must be"),
    Case("context_length 2**32-1", u32("llama.context_length", 0xFFFFFFFF), expect="llama.context_length must be"),
    Case("rms epsilon NaN", u32("llama.attention.layer_norm_rms_epsilon", 0x7FC00000), expect="layer_norm_rms_epsilon"),
    Case("freq_base -1", f32("llama.rope.freq_base", -1.0), expect="llama.rope.freq_base must be"),
    Case("vocab_size 7", u32("llama.vocab_size", 7), expect="llama.vocab_size (7)"),
    Case("head_count typed float32", u32(lambda o: o.value_type("llama.attention.head_count"), 6),
         expect="llama.attention.head_count must be an integer", key="llama.attention.head_count"),
    Case("eos_token_id typed float32", u32(lambda o: o.value_type("tokenizer.ggml.eos_token_id"), 6),
         expect="tokenizer.ggml.eos_token_id must be an integer token id"),
    # the tensor table
    Case("tensor with 0 dims", u32("blk.0.attn_q.weight", 0, "n_dims"), expect="has 0 dimensions"),
    Case("tensor with 5 dims", u32("blk.0.attn_q.weight", 5, "n_dims"), expect="has 5 dimensions"),
    Case("tensor dimension 0", u64("blk.0.attn_q.weight", 0, "dims"), expect="zero dimension"),
    Case("tensor dimension 2**40", u64("blk.0.attn_q.weight", 1 << 40, "dims"), expect="lies past the end"),
    Case("tensor offset 2**62", u64("blk.3.ffn_up.weight", 1 << 62, "offset"), expect="lies past the end",
         key="blk.3.ffn_up.weight"),
    Case("tensor offset misaligned", u64("blk.3.ffn_up.weight", 1, "offset"), expect="not a multiple of the alignment"),
    Case("tensor name length 2**33", u64("blk.0.attn_k.weight", 1 << 33, "name"), expect="name: a string length of 8589934592 bytes"),
    Case("tensor type code 200", u32("blk.0.attn_q.weight", 200, "type"), expect="unknown type code 200"),
    Case("tensor type I32", u32("blk.0.attn_q.weight", gguf.GGMLQuantizationType.I32, "type"),
         expect="not a weight type lmgen reads"),
    Case("last tensor F32 -> F64 (twice the bytes)", u32(LAST, gguf.GGMLQuantizationType.F64, "type"), expect="lies past the end"),
    Case("duplicate tensor name", raw(lambda o: o.tensor("blk.0.attn_k.weight", "name") + 8 + 11, b"q"),
         expect="appears twice"),
    # corruptions a model survives: the file still describes a working model
    Case("general.name byte changed", raw(lambda o: o.value("general.name") + 2, b"X"), loads=True),
    Case("bos_token_id outside the vocabulary", u32("tokenizer.ggml.bos_token_id", 1 << 31), loads=True),
    Case("attn_q Q4_1 -> Q4_0 (smaller, garbage weights)", u32("blk.2.attn_q.weight", gguf.GGMLQuantizationType.Q4_0,
                                                                "type"), loads=True),
]


def _random_cases(n: int, seed: int = 19) -> list[Case]:
    """Bytes of the scalar metadata and of the tensor table set to random values (tensor data left sparse, so a
    case that still loads runs an all-zero model: what is checked is that it loads or fails cleanly)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        region = (lambda o: (24, o.fields["tokenizer.ggml.tokens"].offset)) if i % 2 else \
            (lambda o: (o.tensors[o.tensor_names[0]].offset, o.data_offset))
        pick, value = rng.random(), rng.randrange(256)

        def mutate(buf: bytearray, o: Offsets, region=region, pick=pick, value=value) -> None:
            lo, hi = region(o)
            buf[lo + int(pick * (hi - lo))] = value

        cases.append(Case(f"random byte {i}", mutate))
    return cases


ALL_CASES = CASES + _random_cases(12)


@pytest.fixture(scope="module")
def case_files(gguf_path, tmp_path_factory):
    """Writes every case's file; yields {path: case}; removes them (three are full 94 MB copies) afterwards."""
    offsets = Offsets(gguf_path)
    with open(gguf_path, "rb") as f:
        header = f.read(offsets.data_offset)
    folder = tmp_path_factory.mktemp("gguf_fuzz")
    paths = {}
    for i, case in enumerate(ALL_CASES):
        path = folder / f"case{i:02d}.gguf"
        buf = bytearray(header)
        if case.mutate:
            case.mutate(buf, offsets)
        length = offsets.size if case.length is None else case.length if case.length >= 0 else offsets.size + case.length
        if case.loads:
            shutil.copyfile(gguf_path, path)
            with open(path, "r+b") as f:
                f.write(buf)
        else:
            with open(path, "wb") as f:
                f.write(buf[:length])
                f.truncate(length)  # past the header: a sparse hole of the file's length
        paths[str(path)] = case
    yield paths
    for path in paths:
        Path(path).unlink()


@pytest.fixture(scope="module")
def fuzz_results(case_files) -> dict[str, dict]:
    """Case name -> how loading it ended, from the worker (all cases, two at a time)."""
    worker = Path(__file__).with_name("gguf_fuzz_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(EXTRA_MEMORY_MIB), str(TIMEOUT_S), "2"],
                          input=json.dumps(list(case_files)), capture_output=True, text=True,
                          timeout=TIMEOUT_S * len(case_files))
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    return {case_files[r["path"]].name: {**r, "worker_rss_mib": lines[0]["worker_rss_mib"]} for r in lines[1:]}


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.name for c in ALL_CASES])
def test_corrupt_gguf_ends_cleanly(case: Case, fuzz_results):
    r = fuzz_results[case.name]
    assert r["outcome"] in ("ok", "error"), r  # not a crash (an untyped exception), a kill or a hang
    assert r["peak_rss_mib"] - r["worker_rss_mib"] < EXTRA_MEMORY_MIB, r
    if case.loads:
        assert r["outcome"] == "ok" and r["tokens"] == 2, r
    elif case.expect is not None:
        assert r["outcome"] == "error", r
        assert case.expect in r["message"], r
    if case.key is not None:
        assert r["type"] == "ModelFormatError" and r["fields"]["key"] == repr(case.key), r
    if r["outcome"] == "error":
        assert "\n" not in r["message"] and "Traceback" not in r["message"], r
        assert r["seconds"] < TIMEOUT_S


CLI_CASES = ("head_count 0", "token_type count 2**60", "cut halfway through the tensor data", "architecture llamb")


def test_cli_reports_one_error_line(case_files):
    """`lmgen generate` on a few corrupt files: exit 1, one `lmgen: error:` line naming the file, no traceback."""
    by_name = {case.name: path for path, case in case_files.items()}
    procs = {name: subprocess.Popen([sys.executable, "-m", "lmgen.cli", "generate", "hi", "--model", by_name[name]],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in CLI_CASES}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.startswith("lmgen: error:")]
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, (name, err)
        assert Path(by_name[name]).name in lines[0], (name, err)
