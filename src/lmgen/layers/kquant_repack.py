"""K-quant blocks (Q4_K, Q5_K, Q6_K) re-expressed as the 32-value block types the integer r8 kernels multiply.

Why: the r8 kernels (lmgen.layers.quant) multiply int8 activations by packed weights in register tiles at any
batch size, in a fixed order per row (batch invariance); a K-quant super-block of 256 values is made of 32-value
(Q4_K, Q5_K) or 16-value (Q6_K) sub-blocks with 6- or 8-bit scales, so at load each sub-block becomes a block of
the nearest r8 type, as llama.cpp's CPU "repack" path does for its own kernels:

  Q4_K -> Q4_1:  w = (d sc) q - (dmin m),  q in 0..15:  d' = fp16(d sc), m' = fp16(-dmin m), same q.
  Q5_K -> Q5_1:  the same with 5-bit q.
  Q6_K -> Q8_0:  w = d sc_16 (q - 32) has a scale per 16 values; each 32-value block is requantized to int8
                 with d' = max|w| / 127 (gguf-py's Q8_0 rounding).

Error against the file's own dequantization, per weight:
  Q4_1 / Q5_1: the fp16 rounding of the two block constants, |dw| <= 2^-11 (|d sc| q + |dmin m|) (+ 2^-25 (q + 1)
               for constants below fp16's normal range);
  Q8_0:        |dw| <= max|w_block| (1/254 + 2^-11), an eighth of a Q6_K step at most.
Both are far below the int8 rounding of the activations every packed kernel makes (see lmgen.layers.quant).
Bytes: Q4_K 144 -> 160, Q5_K 176 -> 192, Q6_K 210 -> 272 per 256 values.
"""

from __future__ import annotations

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf.quants import Q4_K, dequantize, quantize

__all__ = ["REPACKED", "repack_kquant"]

# K-quant type -> the r8 type it is re-expressed as
REPACKED = {QT.Q4_K: QT.Q4_1, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


def repack_kquant(qtype: QT, data: np.ndarray, rows: int, cols: int) -> tuple[QT, np.ndarray]:
    """GGUF K-quant blocks (rows, bytes_per_row) of a (rows, cols) weight -> (r8 type, its blocks (rows, bytes))."""
    if qtype == QT.Q6_K:
        return QT.Q8_0, _requantize_q8_0(qtype, data, rows, cols)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, size)  # (super-blocks, bytes)
    n = blocks.shape[0]
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # (n, 1)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])  # (n, 8) each: the sub-blocks' 6-bit scales and mins
    qs = blocks[:, size - 128:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & np.uint8(0x0F)).reshape(n, 8, 32)  # sub-block j = low nibbles (j even) / high nibbles of 32 bytes
    if qtype == QT.Q5_K:
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = q | ((qh & np.uint8(1)) << np.uint8(4))  # bit j of byte i: the fifth bit of value i of sub-block j
    scale = (d * sc.astype(np.float32)).astype(np.float16)  # (n, 8)
    minimum = (-(dmin * m.astype(np.float32))).astype(np.float16)
    if not (np.isfinite(scale).all() and np.isfinite(minimum).all()):  # a constant past fp16's range: requantize
        return QT.Q8_0, _requantize_q8_0(qtype, data, rows, cols)
    nibbles = (q[..., :16] & np.uint8(0x0F)) | ((q[..., 16:] & np.uint8(0x0F)) << np.uint8(4))  # (n, 8, 16)
    parts = [scale.view(np.uint8).reshape(n, 8, 2), minimum.view(np.uint8).reshape(n, 8, 2)]
    if qtype == QT.Q5_K:  # Q5_1's qh: bit k = the fifth bit of value k of the block
        parts.append(np.packbits(q >> np.uint8(4), axis=-1, bitorder="little"))  # (n, 8, 4)
    out = np.concatenate(parts + [nibbles], axis=-1)  # (n, 8, 20 | 24): eight Q4_1 / Q5_1 blocks
    return REPACKED[qtype], out.reshape(rows, -1)


def _requantize_q8_0(qtype: QT, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    values = dequantize(np.ascontiguousarray(data), qtype).reshape(rows, cols)  # float32
    return quantize(values, QT.Q8_0)  # (rows, cols / 32 * 34)
