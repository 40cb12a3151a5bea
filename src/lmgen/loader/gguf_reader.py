"""`LeanReader`: gguf-py's GGUFReader with plain views of the memory map and whole-array metadata parts.

gguf-py keeps a chain of numpy.memmap views (slice -> view -> [:count] -> byte-order view) for every part of every
metadata value, and an array's items are parsed one recursive call at a time, two parts per string: SmolLM2's 49k
tokens and 48k merges were 157 MiB of Python objects and 2.3 s. Here a part is one plain ndarray view, an array of
numbers is one part (its `data` holds one index: `contents()` flattens the parts it indexes, so it returns the same
list), and an array of strings is one part per string, its length prefix read but not kept.
Only call this on a file `lmgen.loader.gguf_layout.read_layout` has checked: it trusts the counts and lengths.
"""

from __future__ import annotations

import struct
import sys

import gguf
import numpy as np

_ARRAY, _STRING = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING


class LeanReader(gguf.GGUFReader):
    """gguf.GGUFReader (same fields, same tensors, same `contents()`), lighter on memory and time."""

    def _get(self, offset, dtype, count=1, override_order=None):
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)  # (file_bytes,) uint8, no memmap subclass
        order = self.byte_order if override_order is None else override_order
        dt = np.dtype(dtype).newbyteorder(order)
        return plain[offset:offset + dt.itemsize * int(count)].view(dt)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != _ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        itype, n, offs = gguf.GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        if nptype is not None:
            items = self._get(offs, nptype, n)
            return 12 + int(items.nbytes), [raw_itype, alen, items], [2], [_ARRAY, itype]
        if itype != _STRING:  # arrays of arrays: gguf-py's own walk
            return super()._get_field_parts(orig_offs, raw_type)
        swapped = self.byte_order == "S"
        little = (sys.byteorder == "little") != swapped
        unpack = struct.Struct("<Q" if little else ">Q").unpack_from
        plain, parts = self._plain, [raw_itype, alen]
        for _ in range(n):
            length = unpack(plain, offs)[0]
            parts.append(plain[offs + 8:offs + 8 + length])
            offs += 8 + length
        return offs - orig_offs, parts, list(range(2, n + 2)), [_ARRAY, _STRING]
