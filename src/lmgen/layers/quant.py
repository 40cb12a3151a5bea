"""Packed quantized linear layers: GGUF blocks stay quantized in memory and are multiplied directly (CPU).

Why: decoding one token reads every weight once, so on a CPU the weight bytes and the per-call overhead set
the speed.  Keeping GGUF's 4.5-8.5 bit blocks resident (instead of fp32) cuts the bytes 4-7x; a small C++
extension (`lmgen/csrc/`, AVX2 + FMA + F16C, AVX-512 VNNI where the CPU has it) multiplies them directly.
benchmarks/matmul_candidates.py holds the measurements behind the choices below.

Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 (every batch size): like llama.cpp, each activation row is quantized to int8
blocks of 32 (scale d_x = max|x_block| / 127, round to nearest) and every weight block contributes
    d_w d_x sum(q_w q_x)        (+ m_w d_x sum(q_x) for Q4_1 / Q5_1, - 8 (Q4_0) or - 16 (Q5_0) d_w d_x sum(q_x)).
Load time re-packs the blocks of 8 consecutive rows so that one 256-bit register holds 4 quants of each of the
8 rows ("r8" layout, same byte count as the file, see `_pack_r8`): one broadcast of 4 activation bytes feeds
8 rows, results land in 8 lanes without horizontal sums (2-3x a llama.cpp-style row-at-a-time kernel on the
file layout when the weight is in cache, see the benchmark's raw-q column).  Batches use register tiles of 2
groups x 6 rows (VNNI) that sum each output in the single-row kernels' order (batch invariance).  Measured faster than dequantize +
MKL sgemm at every batch size, so there is no float path for these types (R8_DEQUANT_MIN_BATCH = 0: never).

K-quants (Q4_K, Q5_K, Q6_K) are re-expressed at load as Q4_1 / Q5_1 / Q8_0 blocks (lmgen.layers.kquant_repack,
with its error bound: far below the activation rounding) and take the same integer kernels, so a Q4_K_M file runs
at r8 speed at every batch size.

Accuracy of the integer kernels: beyond the weight quantization itself, the only error is the rounding of the
activations, |x - d_x q_x| <= d_x / 2.  Per output
    |y - x @ W_deq^T| <= sum_blocks (d_x / 2) * sum_{j in block} |W_deq[n, j]|      (+ fp32 rounding),
about 0.5% relative RMS for Gaussian activations (llama.cpp makes the same error).  The dequantize + at::mm
path rounds in fp32 only.  tests/test_quant.py checks these bounds.

Threads: calls with enough work (KernelTuning.parallel_min_units: the output layer, prefill) split output rows into chunks
claimed from an atomic counter by the calling thread and torch.get_num_threads() - 1 helper threads
(`share_pool.h`); the caller never waits for a helper that has not started, so a busy machine degrades to
one-thread speed instead of OpenMP's scheduler-slice stalls.  Decode-size layer matmuls run on the calling
thread: on the 2-vCPU test machine that was the fastest end to end (SmolLM2-135M Q4_1, greedy, 64 tokens,
torch threads 2: 95-96 tok/s, vs 86-96 with helpers on every call and 80-83 with helpers spinning for 300 us
between calls; the dense fp32 model: 19 tok/s).

Memory: a layer holds its packed bytes (the file's byte count, rows padded to a multiple of 8) and its bias;
packing writes the permuted blocks straight into the new buffer (measured: 96.4 MB packed for the 211 SmolLM2
matrices, +84-128 MB process USS).

Build, loading and tuning of the C++ extension: lmgen.layers.kernels.  Without it (no compiler, a CPU without
AVX2) `supported_packed_qtypes()` is empty (callers dequantize to float layers) and `quantize_linear` uses a
slower pure-PyTorch module.
"""

from __future__ import annotations

import numpy as np
import torch

from lmgen.layers.kernels import configure, extension_error, kernels_available, load_extension

try:  # gguf is a dependency, but keep this module importable without it
    import gguf
    from gguf import GGMLQuantizationType as _QT
except ImportError:  # pragma: no cover
    gguf = None
    _QT = None

__all__ = [
    "QuantizedLinear",
    "packed_linear_from_gguf",
    "quantize_linear",
    "supported_packed_qtypes",
    "kernels_available",  # re-exported from lmgen.layers.kernels
    "configure",
]

_R8_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
_KQ_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def _qtype(qtype) -> "gguf.GGMLQuantizationType":
    if gguf is None:  # pragma: no cover
        raise ValueError("the gguf package is needed for packed GGUF weights")
    try:
        return _QT(qtype)
    except (ValueError, TypeError):
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None


def supported_packed_qtypes() -> set:
    """GGML quantization types that `packed_linear_from_gguf` keeps packed on this machine (empty if the
    kernels cannot be built here)."""
    if gguf is None or load_extension() is None:
        return set()
    return {_QT[n] for n in _R8_TYPES + _KQ_TYPES}


# ------------------------------------------------------------------------------------------------------------
# packing
# ------------------------------------------------------------------------------------------------------------
def _pack_r8(qt, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """GGUF blocks (rows, bytes_per_row) -> r8 layout (flat uint8).

    Rows are taken 8 at a time (zero rows pad the last group); for each group and each block of 32 columns:
      Q4_0: d[8] fp16                    | q[c][r][j] = qs[4c + j] of row r, c < 4, j < 4   (16 + 128 bytes)
      Q4_1: d[8] fp16 | m[8] fp16         | same 128 nibble bytes                           (32 + 128 bytes)
      Q8_0: d[8] fp16                    | q[c][r][j] = qs[4c + j] of row r, c < 8, j < 4   (16 + 256 bytes)
      Q5_0 / Q5_1: as Q4_0 / Q4_1 with hb[8] u32 (the fifth bits, `_q5_high_bits`) before the nibbles (+32 bytes)
    """
    if qt in (_QT.Q5_0, _QT.Q5_1):
        data = _q5_high_bits(qt, data, rows, cols)
    _, type_size = gguf.GGML_QUANT_SIZES[qt]
    nb = cols // 32
    raw = np.asarray(data).reshape(rows, nb, type_size)  # a view when the data is contiguous
    groups = (rows + 7) // 8
    head = 4 if qt in (_QT.Q4_1, _QT.Q5_1) else 2  # bytes of fp16 scale (and min) per block
    chunks = (type_size - head) // 4
    # written in place (no full-size temporaries): out[g, b] = scales of the 8 rows | their quants interleaved
    out = np.zeros((groups, nb, 8 * type_size), np.uint8)
    full = rows // 8
    for g0, g1, src in ((0, full, raw[: full * 8]), (full, groups, raw[full * 8:])):
        if g1 <= g0:
            continue
        if src.shape[0] != (g1 - g0) * 8:  # last, partial group: pad with zero rows (zero scales)
            src = np.concatenate([src, np.zeros(((g1 - g0) * 8 - src.shape[0], nb, type_size), np.uint8)])
        src = src.reshape(g1 - g0, 8, nb, type_size)
        dst = out[g0:g1]
        dst[..., : 8 * head].reshape(g1 - g0, nb, head // 2, 8, 2)[...] = (
            src[..., :head].reshape(g1 - g0, 8, nb, head // 2, 2).transpose(0, 2, 3, 1, 4))
        dst[..., 8 * head:].reshape(g1 - g0, nb, chunks, 8, 4)[...] = (
            src[..., head:].reshape(g1 - g0, 8, nb, chunks, 4).transpose(0, 2, 3, 1, 4))
    return out.reshape(-1)


def _q5_high_bits(qt, data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Q5_0 / Q5_1 GGUF blocks (rows, bytes_per_row) -> the same blocks with qh (bit k: fifth bit of value k)
    permuted so that byte j has at bit c the fifth bit of value 4c+j and at bit 4+c that of value 16+4c+j: the
    kernels then move a chunk's fifth bits next to its nibbles with one shift (quant_kernels.h, nibble_chunk)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qt]
    head = 4 if qt == _QT.Q5_1 else 2
    blocks = np.array(data, dtype=np.uint8).reshape(rows, cols // 32, type_size)  # a copy
    bits = np.unpackbits(blocks[..., head:head + 4], axis=-1, bitorder="little")  # (rows, nb, 32): value k
    bits = bits.reshape(rows, cols // 32, 2, 4, 4)  # value 16h + 4c + j -> [h, c, j]
    blocks[..., head:head + 4] = np.packbits(bits.transpose(0, 1, 4, 2, 3).reshape(rows, cols // 32, 32),
                                             axis=-1, bitorder="little")  # bit 8j + 4h + c
    return blocks.reshape(rows, -1)


def _check_gguf_args(qt, data: np.ndarray, shape) -> tuple[int, int]:
    try:
        rows, cols = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    if rows <= 0 or cols <= 0 or cols % block:
        raise ValueError(
            f"shape {shape!r}: in_features must be a positive multiple of {block} for {qt.name}"
        )
    data = np.asarray(data)
    expected = (rows, cols // block * type_size)
    if data.dtype != np.uint8 or data.size != expected[0] * expected[1]:
        raise ValueError(
            f"{qt.name} data for shape {shape!r} must be uint8 {expected} (rows, bytes_per_row); "
            f"got {data.dtype} {tuple(data.shape)}"
        )
    return rows, cols


# ------------------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------------------
class QuantizedLinear(torch.nn.Module):
    """y = x W^T (+ bias) with W kept packed (see the module docstring).

    forward: x (..., in_features) float32 -> (..., out_features) float32; other float dtypes are computed in
    float32 and cast back.  Inference only (no autograd through the weight or x).  The whole forward runs in
    C++ (`PackedLinear.__call__`): one Python frame per call.
    """

    def __init__(self, qtype, packed: torch.Tensor, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None, batch_invariant: bool = True):
        super().__init__()
        # True: each row's result is the same in any batch (never the dequantize + at::mm path of large batches)
        self.batch_invariant = bool(batch_invariant)
        if load_extension() is None:
            raise RuntimeError(f"lmgen quant kernels unavailable: {extension_error()}")
        self.qtype = _qtype(qtype)
        self.out_features = int(out_features)
        self.in_features = int(in_features)
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous().view(-1)
        self.register_buffer("packed", packed.contiguous().view(-1))
        self.register_buffer("bias", bias)
        self._bind()

    def _bind(self):
        # validates qtype / shape / byte count / bias (ValueError) and holds references to the buffers
        self._impl = load_extension().PackedLinear(self.packed, int(self.qtype), self.out_features, self.in_features,
                                                   self.bias, self.batch_invariant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._impl(x)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32 (out_features, in_features) (a new tensor; for tests and debugging)."""
        return self._impl.dequantize()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) int64 -> rows `ids` of the weight as fp32 (T, in_features), dequantized on the fly: the packed
        matrix used as an embedding table (IndexError for an id outside [0, out_features))."""
        return self._impl.rows(ids)

    def _apply(self, fn, *args, **kwargs):  # .to() / .share_memory() may replace the buffers
        out = super()._apply(fn, *args, **kwargs)
        self._bind()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._bind()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
                f"bias={self.bias is not None}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_impl", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._bind()


class TorchPackedLinear(torch.nn.Module):
    """Pure-PyTorch fallback for `quantize_linear` when the compiled kernels are unavailable: keeps Q8_0 / Q4_1
    blocks as small tensors and dequantizes the whole weight on every call (correct and memory-light, slower
    than a float Linear)."""

    def __init__(self, qtype, data: np.ndarray, out_features: int, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.qtype = _qtype(qtype)
        self.out_features, self.in_features = int(out_features), int(in_features)
        nb = self.in_features // 32
        _, ts = gguf.GGML_QUANT_SIZES[self.qtype]
        raw = np.ascontiguousarray(data).reshape(self.out_features, nb, ts)
        head = {_QT.Q8_0: 2, _QT.Q4_1: 4, _QT.Q4_0: 2}[self.qtype]
        scales = np.ascontiguousarray(raw[..., :head]).view(np.float16)  # (out, nb, 1|2)
        self.register_buffer("scales", torch.from_numpy(scales.copy()))
        self.register_buffer("quants", torch.from_numpy(np.ascontiguousarray(raw[..., head:])))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(-1))

    def dequantized_weight(self) -> torch.Tensor:
        s = self.scales.to(torch.float32)
        if self.qtype == _QT.Q8_0:
            w = self.quants.view(torch.int8).to(torch.float32) * s[..., 0:1]
        else:
            q = self.quants
            w = torch.cat([q & 0x0F, q >> 4], dim=-1).to(torch.float32)
            w = w * s[..., 0:1] + (s[..., 1:2] if self.qtype == _QT.Q4_1 else -8.0 * s[..., 0:1])
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        y = torch.nn.functional.linear(x.to(torch.float32), w, self.bias)
        return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# public constructors
# ------------------------------------------------------------------------------------------------------------
def packed_linear_from_gguf(qtype, data: np.ndarray, shape: tuple[int, int],
                            bias: torch.Tensor | None = None, batch_invariant: bool = True) -> torch.nn.Module | None:
    """A linear layer that keeps GGUF blocks packed.

    qtype: gguf.GGMLQuantizationType (or its int); data: raw blocks (rows, bytes_per_row) of an
    (out_features, in_features) = `shape` weight, several matrices possibly concatenated along rows (fused
    QKV / gate+up: pass the summed out_features).  Returns None for a type not packed here (see
    `supported_packed_qtypes()`); the caller then dequantizes to a float layer.  Raises ValueError for an unknown
    type or data that does not match `shape`.  batch_invariant (default): a row's result never depends on the
    other rows of the call; False lets batches past the kernel tuning's dequantize threshold take dequantize + at::mm.
    """
    qt = _qtype(qtype)
    if qt.name not in _R8_TYPES + _KQ_TYPES:
        return None
    rows, cols = _check_gguf_args(qt, data, shape)
    if load_extension() is None:
        return None
    data = np.asarray(data)
    if qt.name in _KQ_TYPES:  # re-expressed as Q4_1 / Q5_1 / Q8_0 blocks (lmgen.layers.kquant_repack)
        from lmgen.layers.kquant_repack import repack_kquant

        qt, data = repack_kquant(qt, data, rows, cols)
    return QuantizedLinear(qt, torch.from_numpy(_pack_r8(qt, data, rows, cols)), rows, cols, bias, batch_invariant)


_MODES = {"int8": "Q8_0", "int4": "Q4_1"}


def quantize_linear(weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None,
                    batch_invariant: bool = True) -> torch.nn.Module:
    """Quantize a float (out_features, in_features) weight at load time and return a packed linear layer.

    mode "int8": Q8_0 blocks (32 values, one fp16 scale); per weight |w - w_q| <= max|w_block| (1/254 + 2^-11).
    mode "int4": Q4_1 blocks (32 values, fp16 scale and min); |w - w_q| <= (max - min)_block / 30 + max|w_block| 2^-9.
    (The 2^-k terms are the fp16 rounding of the block scale / min.)
    in_features must be a multiple of 32 (ValueError otherwise).
    """
    if mode not in _MODES:
        raise ValueError(f"quantize_linear mode must be one of {sorted(_MODES)}, got {mode!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % 32 or rows == 0:
        raise ValueError(f"weight shape {tuple(weight.shape)}: in_features must be a multiple of 32 for {mode}")
    qt = _QT[_MODES[mode]]
    w = weight.detach().to(torch.float32).cpu().contiguous().numpy()
    data = gguf.quants.quantize(w, qt)  # (rows, bytes_per_row) uint8
    if load_extension() is not None:
        module = packed_linear_from_gguf(qt, data, (rows, cols), bias, batch_invariant)
        if module is not None:
            return module
    return TorchPackedLinear(qt, data, rows, cols, bias)
