"""A bounds-checked walk over a GGUF file's header, metadata and tensor table, done before gguf-py reads it.

gguf-py trusts what it reads: an array that declares 2**60 items is looped over item by item, a tensor offset past
the end becomes an empty view, a bad type code a bare ValueError. This walk checks every count, length, type code,
dimension and offset against the bytes the file actually has (a count is refused as soon as it is read, from its
smallest possible size), so the file gguf-py then parses is known to be consistent. Cost: one pass over the header
in Python, about 30 ms for a 49k-token vocabulary (numeric arrays are skipped, not read).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from lmgen.errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 256  # ggml's GGML_MAX_NAME is 64; a little slack for other writers
MAX_KEY_BYTES = 65535  # the GGUF spec's limit on a metadata key
MAX_NESTING = 3  # arrays of arrays of ...: none of lmgen's models use any
# LeanReader keeps one Python object per string of an array (~0.2 KiB): these bound the memory and time of a crafted
# file (2M strings: ~0.5 GiB, ~2 s). The largest real vocabularies have ~260k tokens (and as many scores / types /
# merges: Llama 3 has 128k tokens and 280k merges).
MAX_ARRAY_ITEMS = 1 << 21
MAX_TOTAL_ITEMS = 1 << 22

# GGUFValueType code -> (struct format, bytes); STRING (8) and ARRAY (9) are walked, not unpacked
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4), 7: ("?", 1),
            10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9
_MIN_BYTES = {**{code: size for code, (_, size) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table, checked: dims fastest-first (as stored), absolute byte range in the file."""

    name: str
    ggml_type: GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int
    n_bytes: int


@dataclass
class GGUFLayout:
    """What the walk found: scalar and string metadata (arrays only by item count), and the tensor table."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_counts: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = 32
    data_offset: int = 0
    file_bytes: int = 0


class _Walk:
    """A read position over the file's bytes; every read checks that the bytes exist."""

    def __init__(self, buf, path: Path, order: str):
        self.buf, self.path, self.order, self.pos, self.size = buf, path, order, 0, len(buf)
        self.items = 0  # array items seen so far, all arrays together

    def fail(self, what: str, *, key: str, value: Any, offset: int | None = None) -> ModelFormatError:
        at = self.pos if offset is None else offset
        return ModelFormatError(f"{self.path}: {what} (at byte {at} of {self.size}: a truncated or corrupt GGUF file)",
                                key=key, value=value, offset=at)

    def need(self, n: int, key: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{key} needs {n} bytes but the file ends {self.size - self.pos} bytes later",
                            key=key, value=n)

    def scalar(self, code: int, key: str) -> Any:
        fmt, n = _SCALARS[code]
        self.need(n, key)
        value = struct.unpack_from(self.order + fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, key: str) -> int:
        return self.scalar(4, key)

    def u64(self, key: str) -> int:
        return self.scalar(10, key)

    def raw_string(self, key: str, limit: int | None = None) -> tuple[int, int]:
        """(start, length) of a length-prefixed string, checked against the file (and `limit`), skipped over."""
        start = self.pos
        n = self.u64(key)
        if n > self.size - self.pos or (limit is not None and n > limit):
            bound = self.size - self.pos if limit is None else min(limit, self.size - self.pos)
            raise self.fail(f"{key}: a string length of {n} bytes (at most {bound} possible here)",
                            key=key, value=n, offset=start)
        self.pos += n
        return self.pos - n, n

    def string(self, key: str, limit: int | None = None) -> str:
        start, n = self.raw_string(key, limit)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{key}: a string that is not valid UTF-8", key=key, value=bytes(self.buf[start:start + 24]),
                            offset=start - 8) from None

    def count(self, key: str, min_bytes: int, cap: int) -> int:
        """A declared number of entries, refused at once if even the smallest entries could not fit the file."""
        start = self.pos
        n = self.u64(key)
        room = (self.size - self.pos) // max(min_bytes, 1)
        if n > min(cap, room):
            limit = f"the file has room for at most {room}" if n > room else f"lmgen's limit is {cap}"
            raise self.fail(f"{key} declares {n} entries; {limit}", key=key, value=n, offset=start)
        return n

    def value(self, code: int, key: str, depth: int = 0) -> Any:
        """Reads (scalars, strings) or skips (arrays: their item count is returned) one metadata value."""
        if code in _SCALARS:
            return self.scalar(code, key)
        if code == _STRING:
            return self.string(key)
        if code != _ARRAY:
            raise self.fail(f"{key}: unknown value type code {code}", key=key, value=code, offset=self.pos - 4)
        if depth >= MAX_NESTING:
            raise self.fail(f"{key}: arrays nested more than {MAX_NESTING} deep", key=key, value=depth)
        item_code = self.u32(key)
        if item_code not in _MIN_BYTES:
            raise self.fail(f"{key}: unknown array item type code {item_code}", key=key, value=item_code,
                            offset=self.pos - 4)
        n = self.count(key, _MIN_BYTES[item_code], MAX_ARRAY_ITEMS)
        self.items += n
        if self.items > MAX_TOTAL_ITEMS:
            raise self.fail(f"{key}: more than {MAX_TOTAL_ITEMS} array items in the metadata", key=key, value=n)
        if item_code in _SCALARS:
            self.pos += n * _SCALARS[item_code][1]  # fits: count() checked n * size against the file
        elif item_code == _STRING:
            self._skip_strings(n, key)
        else:
            for _ in range(n):
                self.value(_ARRAY, key, depth + 1)
        return n

    def _skip_strings(self, n: int, key: str) -> None:
        unpack, buf, size, pos = struct.Struct(self.order + "Q").unpack_from, self.buf, self.size, self.pos
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"{key}: item {i} of {n} starts past the end of the file", key=key, value=n)
            length = unpack(buf, pos)[0]
            if length > size - pos - 8:
                self.pos = pos
                raise self.fail(f"{key}: item {i} has a string length of {length} bytes, past the end of the file",
                                key=key, value=length)
            pos += 8 + length
        self.pos = pos


def _tensor_info(walk: _Walk, index: int) -> tuple[str, int, tuple[int, ...], int, int]:
    """(name, type code, dims, relative offset, byte where the entry starts) of one tensor table entry."""
    start = walk.pos
    name = walk.string(f"tensor {index} name", MAX_NAME_BYTES)
    n_dims = walk.u32(f"{name}: dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        raise walk.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", key=name, value=n_dims,
                        offset=walk.pos - 4)
    dims = tuple(walk.u64(f"{name}: dimensions") for _ in range(n_dims))
    if min(dims) < 1:
        raise walk.fail(f"tensor {name!r} has a zero dimension {list(dims)}", key=name, value=list(dims))
    code = walk.u32(f"{name}: type")
    offset = walk.u64(f"{name}: offset")
    return name, code, dims, offset, start


def _check_tensor(walk: _Walk, layout: GGUFLayout, name: str, code: int, dims: tuple[int, ...], rel: int,
                  start: int) -> TensorInfo:
    try:
        qtype = GGMLQuantizationType(code)
        block, type_bytes = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise walk.fail(f"tensor {name!r} has an unknown type code {code}", key=name, value=code, offset=start) from None
    if dims[0] % block:
        raise walk.fail(f"tensor {name!r} of type {qtype.name} has a row of {dims[0]} values, not a multiple of its "
                        f"block of {block}", key=name, value=list(dims), offset=start)
    elements = 1
    for d in dims:
        elements *= d
    n_bytes = elements // block * type_bytes
    if rel % layout.alignment:
        raise walk.fail(f"tensor {name!r} has offset {rel}, not a multiple of the alignment {layout.alignment}",
                        key=name, value=rel, offset=start)
    begin = layout.data_offset + rel
    if n_bytes > layout.file_bytes or begin > layout.file_bytes - n_bytes:
        raise walk.fail(f"tensor {name!r} ({qtype.name} {list(dims)}: {n_bytes} bytes at byte {begin}) lies past the "
                        f"end of the file", key=name, value=rel, offset=start)
    return TensorInfo(name, qtype, dims, begin, n_bytes)


def _alignment(walk: _Walk, layout: GGUFLayout, types: dict[str, int]) -> int:
    if "general.alignment" not in types:
        return 32
    value = layout.metadata["general.alignment"] if types["general.alignment"] == 4 else None
    if not isinstance(value, int) or value < 1 or value & (value - 1) or value > 1 << 20:
        raise walk.fail(f"general.alignment must be a uint32 power of two, got {value!r}", key="general.alignment",
                        value=value, offset=0)
    return value


def read_layout(path: str | Path) -> GGUFLayout:
    """Walks `path`'s header, metadata and tensor table; a ModelFormatError (naming the key, the value and the
    byte) for the first thing that cannot be right. Reads only the header's pages of the file."""
    path = Path(path)
    with open(path, "rb") as f:
        magic, size = f.read(4), os.fstat(f.fileno()).st_size
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"{path} is not a readable GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}",
                                   key="GGUF.magic", value=magic, offset=0)
        if size < 24:
            raise ModelFormatError(f"{path} is not a readable GGUF file: {size} bytes, shorter than a GGUF header "
                                   f"(truncated or corrupt)", key="GGUF.header", value=size, offset=0)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(buf, path, size)


def _walk(buf, path: Path, size: int) -> GGUFLayout:
    version = struct.unpack_from("<I", buf, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py's test)
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    walk = _Walk(buf, path, order)
    walk.pos = 8
    if version not in SUPPORTED_VERSIONS:
        raise walk.fail(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})", key="GGUF.version",
                        value=version, offset=4)
    layout = GGUFLayout(version=version, file_bytes=size)
    n_tensors = walk.count("GGUF.tensor_count", 8 + 1 + 4 + 8 + 4 + 8, 1 << 20)
    n_kv = walk.count("GGUF.kv_count", 8 + 1 + 4 + 1, 1 << 20)
    types: dict[str, int] = {}
    for i in range(n_kv):
        key_at = walk.pos
        key = walk.string(f"metadata key {i}", MAX_KEY_BYTES)
        if key in types:
            raise walk.fail(f"metadata key {key!r} appears twice", key=key, value=i, offset=key_at)
        code = types[key] = walk.u32(key)
        value = walk.value(code, key)
        if code == _ARRAY:
            layout.array_counts[key] = value
        else:
            layout.metadata[key] = value
    layout.alignment = _alignment(walk, layout, types)
    entries = [_tensor_info(walk, i) for i in range(n_tensors)]
    layout.data_offset = -(-walk.pos // layout.alignment) * layout.alignment
    seen: set[str] = set()
    for name, code, dims, rel, start in entries:
        if name in seen:
            raise walk.fail(f"tensor {name!r} appears twice in the tensor table", key=name, value=rel, offset=start)
        seen.add(name)
        layout.tensors.append(_check_tensor(walk, layout, name, code, dims, rel, start))
    return layout
