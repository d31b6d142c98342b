"""The NumPy engine (gpucnn/engines/numpy_ops.py) against the float64 oracle (tests/reference.py).

Inputs are drawn in float64, rounded to float32 once, and the same rounded values go to both: the engine
computes in float32, the oracle in float64, so what is left is the engine's float32 rounding (test plan
rows 3, 5-7, 9, 14). Pooling is compared exactly, on values whose sums float32 holds exactly.
"""
import numpy as np
import pytest

import helpers
import reference as ref
from helpers import (CONV_GRID, EXTRA_CONV, F32, POOL_GRID, VALID, expected_hw, f32, normal,
                     padding_for)
from helpers import conv_case as _conv_case, conv_id as _conv_id, pool_args as _pool_args
from helpers import pool_id as _pool_id
from helpers import CONV_POOL_GRID, conv_pool_id, window_taps
from helpers import DEPTHWISE_GRID, bn_case, depthwise_case, depthwise_id
from checks_batchnorm import BatchNormChecks
from gpucnn.engines import numpy_ops as ops


def assert_close(got, want, rtol=1e-5, atol_scale=1e-5):
    helpers.assert_close(got, want, rtol, atol_scale)


assert_exact = helpers.assert_exact


# ===================================================================================== conv2d grid
# The full cross product of test plan row 3: batch × channels × kernel × stride × padding × size.
def _check_conv(n, c, hw, k, s, pad, f=4, bias=True):
    x, wt, b, s, padding, rng = _conv_case(n, c, hw, k, s, pad, f, bias)
    saved = (x.copy(), wt.copy())
    ctx = {}
    y = ops.conv2d_forward(x, wt, b, s, padding, None, ctx)
    y_ref = ref.conv2d_forward(x, wt, b, s, padding, None)
    assert y.shape == (n,) + expected_hw(pad, hw[0], hw[1], wt.shape[:2], s) + (f,)
    assert_close(y, y_ref)

    dy = normal(rng, y_ref.shape)
    dx = ops.conv2d_backward_data(dy, wt, x.shape, s, padding, ctx)
    assert_close(dx, ref.conv2d_backward_data(dy, wt, x.shape, s, padding))
    dw, db = ops.conv2d_backward_filter(dy, x, wt.shape, s, padding, ctx)
    dw_ref, db_ref = ref.conv2d_backward_filter(dy, x, wt.shape, s, padding)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)
    dw2, db2 = ops.conv2d_backward_filter(dy, x, wt.shape, s, padding, None)  # without the forward's ctx
    assert_close(dw2, dw_ref)
    assert_close(db2, db_ref)
    # both in one call (the layer's): the same numbers, into the given buffers; without dx
    bufs = np.empty_like(x), np.empty_like(wt), np.empty(f, F32)
    got = ops.conv2d_backward(dy, x, wt, s, padding, ctx, *bufs)
    for g, buf, want in zip(got, bufs, (dx, dw, db)):
        assert g is buf
        np.testing.assert_array_equal(g, want)
    none, dw3, db3 = ops.conv2d_backward(dy, x, wt, s, padding, {}, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw3, dw)
    np.testing.assert_array_equal(db3, db)
    np.testing.assert_array_equal(x, saved[0])  # inputs not written to
    np.testing.assert_array_equal(wt, saved[1])


@pytest.mark.parametrize("n, c, hw, k, s, pad", CONV_GRID + EXTRA_CONV,
                         ids=map(_conv_id, CONV_GRID + EXTRA_CONV))
def test_conv2d_matches_reference(n, c, hw, k, s, pad):
    _check_conv(n, c, hw, k, s, pad)


@pytest.mark.parametrize("f, bias", [(1, True), (16, False), (3, False)])
def test_conv2d_filters_and_no_bias(f, bias):
    _check_conv(2, 3, (7, 5), 3, 1, "same", f=f, bias=bias)
    _check_conv(2, 3, (5, 5), 2, 2, "same", f=f, bias=bias)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_conv2d_fused_activation(activation):
    x, wt, b, s, padding, rng = _conv_case(2, 3, (7, 5), 3, 1, "same", f=5)
    y = ops.conv2d_forward(x, wt, b, s, padding, activation, {})
    y_ref = ref.conv2d_forward(x, wt, b, s, padding, activation)
    assert_close(y, y_ref)
    if activation == "relu":
        assert (y_ref == 0).any() and (y_ref > 0).any()
    else:
        np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 0, 0, 0), (0, 2, 1, 0), (3, 1, 0, 2)],
                         ids=["same", "valid", "asymmetric", "over-2"])
@pytest.mark.parametrize("c, f, k, s", [(8, 6, 3, 1), (ops.PLAIN_WINOGRAD_MIN_CHANNELS, 6, 3, 1), (8, 6, 3, 2),
                                        (8, 6, 1, 1), (8, ops.PLAIN_WINOGRAD_MIN_CHANNELS, 3, 1), (3, 6, 3, 2)],
                         ids=["im2col", "winograd", "strided", "1x1", "dx-by-winograd", "few-channels"])
@pytest.mark.parametrize("pad_group_bytes", [ops.PAD_GROUP_BYTES, 1], ids=["padded-at-once", "padded-by-chunk"])
def test_conv2d_in_chunks_of_images(monkeypatch, padding, c, f, k, s, pad_group_bytes):
    """A convolution runs a few images at a time: with chunks of 2 images over a batch of 5 (2 + 2 + 1, two chunk
    sizes), forward and backward match the oracle and the run in one chunk (up to rounding: BLAS may sum in
    another order for another size) — through im2col and Winograd, the images padded all at once or a chunk at a
    time (PAD_GROUP_BYTES: the last, shorter chunk in the first chunks' work array); the input gradient as the
    correlation of dy
    (stride 1, padding up to K − 1 on a side; through Winograd where the kernel turned has its many filters as
    channels) and from the taps' products (strides, or padding 3); dx into a C-contiguous out= buffer is written
    there, into a strided one is copied there; a strided dy."""
    monkeypatch.setattr(ops, "PAD_GROUP_BYTES", pad_group_bytes)
    rng = np.random.default_rng(12)
    x, wt, b = normal(rng, (5, 7, 8, c)), normal(rng, (k, k, c, f)), normal(rng, (f,))
    s = (s, s)
    y_ref = ref.conv2d_forward(x, wt, b, s, padding, None)
    dy = normal(rng, y_ref.shape)
    dx_ref = ref.conv2d_backward_data(dy, wt, x.shape, s, padding)
    dw_ref, db_ref = ref.conv2d_backward_filter(dy, x, wt.shape, s, padding)
    results = {}
    p, q = y_ref.shape[1:3]
    if ops._plain_winograd_applies(wt.shape, s):  # one image's work values: its Winograd tiles or im2col rows
        per_image = 25 * -(-p // 3) * -(-q // 3) * max(c, f)
    else:
        per_image = p * q * k * k * c
    for chunk in (2, 5):
        monkeypatch.setattr(ops, "CHUNK_BYTES", chunk * per_image * 4)
        ctx = {}
        y = ops.conv2d_forward(x, wt, b, s, padding, None, ctx)
        sizes = sorted(key[1] for key in ctx if isinstance(key, tuple) and key[0] == "chunk")
        assert sizes == ([1, 2] if chunk == 2 else [5])
        assert_close(y, y_ref)
        strided = np.empty((5, 7, 8, 2 * c), F32)[..., ::2]
        for out in (None, np.empty_like(x), strided):
            dx, dw, db = ops.conv2d_backward(dy, x, wt, s, padding, ctx, out=out)
            assert out is None or dx is out
            assert_close(dx, dx_ref)
            assert_close(dw, dw_ref)
            assert_close(db, db_ref)
        assert_close(ops.conv2d_backward_data(dy, wt, x.shape, s, padding, {}), dx_ref)
        strided_dy = np.empty(dy.shape[:3] + (2 * f,), F32)[..., ::2]
        strided_dy[...] = dy
        assert_close(ops.conv2d_backward(strided_dy, x, wt, s, padding, ctx)[0], dx_ref)
        assert_close(ops.conv2d_backward_filter(dy, x, wt.shape, s, padding, None)[0], dw_ref)
        results[chunk] = (y, dx.copy(), dw)
    for small, whole in zip(results[2], results[5]):
        assert_close(small, whole)


def test_conv2d_asymmetric_explicit_padding():
    rng = np.random.default_rng(11)
    x, wt, b = normal(rng, (2, 6, 5, 2)), normal(rng, (3, 2, 2, 3)), normal(rng, (3,))
    padding, s = (0, 2, 1, 0), (2, 1)
    y = ops.conv2d_forward(x, wt, b, s, padding, None, {})
    assert_close(y, ref.conv2d_forward(x, wt, b, s, padding, None))
    dy = normal(rng, y.shape)
    assert_close(ops.conv2d_backward_data(dy, wt, x.shape, s, padding, {}),
                 ref.conv2d_backward_data(dy, wt, x.shape, s, padding))
    for got, want in zip(ops.conv2d_backward_filter(dy, x, wt.shape, s, padding, {}),
                         ref.conv2d_backward_filter(dy, x, wt.shape, s, padding)):
        assert_close(got, want)


# ===================================================================================== pooling
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "an-image-at-a-time"])
@pytest.mark.parametrize("hw, p, s, pad", POOL_GRID, ids=map(_pool_id, POOL_GRID))
def test_maxpool2d_exact(hw, p, s, pad, chunked, monkeypatch):
    """Against the oracle, exactly; ``chunked``: max-pooling works a chunk of images at a time (here one image),
    also into strided out= buffers."""
    if chunked:
        monkeypatch.setattr(ops, "CHUNK_BYTES", 1)
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng([hw[0], hw[1], pool[0], pool[1], stride[0], stride[1], pad == "same"])
    x = normal(rng, (3,) + hw + (3,))
    y, idx = ops.maxpool2d_forward(x, pool, stride, padding)
    y_ref, idx_ref = ref.maxpool2d_forward(x, pool, stride, padding)
    assert y.shape == (3,) + expected_hw(pad, hw[0], hw[1], pool, stride) + (3,)
    assert_exact(y, y_ref)
    np.testing.assert_array_equal(idx.astype(np.int64), idx_ref)
    dy = f32(rng.integers(-8, 9, size=y.shape))  # small integers: overlapping windows sum exactly
    dx = ops.maxpool2d_backward(dy, idx, x.shape, pool, stride, padding)
    assert_exact(dx, ref.maxpool2d_backward(dy, idx_ref, x.shape, pool, stride, padding))
    out, out_idx = np.empty(y.shape[:3] + (6,), F32)[..., ::2], np.empty(y.shape[:3] + (6,), np.int8)[..., ::2]
    got = ops.maxpool2d_forward(x, pool, stride, padding, out=out, out_idx=out_idx)
    assert got[0] is out and got[1] is out_idx
    assert_exact(out, y_ref)
    np.testing.assert_array_equal(out_idx.astype(np.int64), idx_ref)


@pytest.mark.parametrize("hw, p, s, pad", POOL_GRID, ids=map(_pool_id, POOL_GRID))
def test_avgpool2d_exact(hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng([hw[0], hw[1], pool[0], pool[1], stride[0], stride[1], pad == "same", 1])
    # integer inputs: window sums are exact in float32, and one rounded division matches the oracle's
    x = f32(rng.integers(-50, 51, size=(2,) + hw + (3,)))
    y = ops.avgpool2d_forward(x, pool, stride, padding)
    assert y.shape == (2,) + expected_hw(pad, hw[0], hw[1], pool, stride) + (3,)
    assert_exact(y, ref.avgpool2d_forward(x, pool, stride, padding))
    # dy a multiple of 2520 (divisible by every window count up to 10): every share is an integer
    dy = f32(2520 * rng.integers(-4, 5, size=y.shape))
    dx = ops.avgpool2d_backward(dy, x.shape, pool, stride, padding)
    assert_exact(dx, ref.avgpool2d_backward(dy, x.shape, pool, stride, padding))
    # and general floats, to float32 rounding
    xf, dyf = normal(rng, x.shape), normal(rng, y.shape)
    assert_close(ops.avgpool2d_forward(xf, pool, stride, padding),
                 ref.avgpool2d_forward(xf, pool, stride, padding), rtol=1e-6, atol_scale=1e-6)
    assert_close(ops.avgpool2d_backward(dyf, x.shape, pool, stride, padding),
                 ref.avgpool2d_backward(dyf, x.shape, pool, stride, padding), rtol=1e-6, atol_scale=1e-6)


@pytest.mark.parametrize("n, c", [(1, 1), (7, 8)])
def test_pooling_batch_and_channels_on_28x28(n, c):
    rng = np.random.default_rng(n * 10 + c)
    x = f32(rng.permutation(n * 28 * 28 * c).reshape(n, 28, 28, c))  # distinct: no ties
    y, idx = ops.maxpool2d_forward(x, (2, 2), (2, 2), VALID)
    y_ref, idx_ref = ref.maxpool2d_forward(x, (2, 2), (2, 2), VALID)
    assert_exact(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    dy = f32(rng.integers(-8, 9, size=y.shape))
    assert_exact(ops.maxpool2d_backward(dy, idx, x.shape, (2, 2), (2, 2), VALID),
                 ref.maxpool2d_backward(dy, idx_ref, x.shape, (2, 2), (2, 2), VALID))
    assert_exact(ops.avgpool2d_forward(x, (2, 2), (2, 2), VALID),
                 ref.avgpool2d_forward(x, (2, 2), (2, 2), VALID))


@pytest.mark.parametrize("kind", ["constant", "duplicates"])
@pytest.mark.parametrize("hw, p, s, pad", [((5, 5), 2, 1, "same"), ((7, 5), 3, 2, "same"),
                                           ((11, 11), 3, 1, "valid"), ((5, 5), 3, 3, "same")])
def test_maxpool2d_ties_go_to_the_first_maximum(kind, hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng(21)
    shape = (2,) + hw + (3,)
    x = np.full(shape, 1.5, F32) if kind == "constant" else f32(rng.integers(0, 3, size=shape))
    y, idx = ops.maxpool2d_forward(x, pool, stride, padding)
    y_ref, idx_ref = ref.maxpool2d_forward(x, pool, stride, padding)
    assert_exact(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    dy = f32(rng.integers(1, 9, size=y.shape))
    dx = ops.maxpool2d_backward(dy, idx, x.shape, pool, stride, padding)
    assert_exact(dx, ref.maxpool2d_backward(dy, idx_ref, x.shape, pool, stride, padding))
    assert dx.sum() == dy.sum()  # every window's gradient lands on exactly one cell
    if kind == "constant" and pad == "valid":
        assert not idx.any()  # the first tap of every window


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "an-image-at-a-time"])
@pytest.mark.parametrize("hw, p, s, pad", [((5, 5), 2, 2, "same"), ((7, 5), 3, 1, "same"),
                                           ((5, 5), 3, 2, "valid")])
def test_maxpool2d_nan_propagates_and_takes_the_gradient(hw, p, s, pad, chunked, monkeypatch):
    if chunked:  # the NaN scan then runs on each image alone
        monkeypatch.setattr(ops, "CHUNK_BYTES", 1)
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng(22)
    x = normal(rng, (2,) + hw + (2,))
    x[0, 1, 1, 0] = np.nan
    x[0, 1, 2, 0] = np.nan  # two NaNs that share windows: the first in scan order wins
    x[0, 2, 1, 0] = 1e30    # a large value next to them must not win
    x[1, hw[0] - 1, hw[1] - 1, 1] = np.nan  # in the bottom-right corner (next to "same" padding)
    y, idx = ops.maxpool2d_forward(x, pool, stride, padding)
    y_ref, idx_ref = ref.maxpool2d_forward(x, pool, stride, padding)
    assert np.isnan(y_ref).any()
    assert_exact(y, y_ref)  # assert_array_equal treats NaNs in the same places as equal
    np.testing.assert_array_equal(idx, idx_ref)
    dy = f32(rng.integers(1, 9, size=y.shape))
    assert_exact(ops.maxpool2d_backward(dy, idx, x.shape, pool, stride, padding),
                 ref.maxpool2d_backward(dy, idx_ref, x.shape, pool, stride, padding))


def test_global_avgpool2d_matches_reference():
    rng = np.random.default_rng(23)
    for shape in [(1, 5, 5, 1), (7, 7, 5, 3), (2, 28, 28, 8)]:
        x = normal(rng, shape)
        y = ops.global_avgpool2d_forward(x)
        assert_close(y, ref.global_avgpool2d_forward(x), rtol=1e-5, atol_scale=1e-5)
        dy = normal(rng, y.shape)
        assert_close(ops.global_avgpool2d_backward(dy, shape), ref.global_avgpool2d_backward(dy, shape),
                     rtol=1e-6, atol_scale=1e-7)


@pytest.mark.parametrize("shape", [(1, 5, 5, 1), (7, 7, 5, 3), (2, 28, 28, 8), (3, 1, 1, 2)])
def test_global_maxpool2d_exact(shape):
    rng = np.random.default_rng(list(shape))
    x = normal(rng, shape)
    y, idx = ops.global_maxpool2d_forward(x)
    y_ref, idx_ref = ref.global_maxpool2d_forward(x)
    assert_exact(y, y_ref)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx, idx_ref)
    dy = normal(rng, y.shape)
    assert_exact(ops.global_maxpool2d_backward(dy, idx, shape), ref.global_maxpool2d_backward(dy, idx_ref, shape))
    out, out_idx = np.empty_like(y), np.empty_like(idx)
    assert ops.global_maxpool2d_forward(x, out=out, out_idx=out_idx)[0] is out
    np.testing.assert_array_equal(out_idx, idx)


def test_global_maxpool2d_ties_and_nan_go_to_the_first():
    x = f32(np.random.default_rng(26).integers(0, 3, size=(2, 5, 4, 3)))  # many ties
    x[1, 2, 1, 2], x[1, 3, 0, 2], x[0, 4, 3, 0] = np.nan, np.nan, np.nan  # two NaNs in one channel
    y, idx = ops.global_maxpool2d_forward(x)
    y_ref, idx_ref = ref.global_maxpool2d_forward(x)
    assert np.isnan(y_ref).sum() == 2
    assert_exact(y, y_ref)
    np.testing.assert_array_equal(idx, idx_ref)
    dy = f32(np.arange(1, 7).reshape(2, 3))
    dx = ops.global_maxpool2d_backward(dy, idx, x.shape)
    assert_exact(dx, ref.global_maxpool2d_backward(dy, idx_ref, x.shape))
    assert dx.sum() == dy.sum()  # each channel's gradient on one cell
    with pytest.raises(ValueError, match="no maximum"):
        ops.global_maxpool2d_forward(np.zeros((2, 0, 3, 1), F32))


@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 2, 3, 0), (0, 0, 0, 0), (3, 1, 0, 2)])
def test_zero_padding2d_exact(padding):
    rng = np.random.default_rng(sum(padding))
    x = normal(rng, (2, 5, 4, 3))
    y = ops.zero_padding2d_forward(x, padding)
    assert_exact(y, ref.zero_padding2d_forward(x, padding))
    dy = normal(rng, y.shape)
    assert_exact(ops.zero_padding2d_backward(dy, x.shape, padding), ref.zero_padding2d_backward(dy, x.shape, padding))
    out = np.full(y.shape, np.nan, F32)
    assert ops.zero_padding2d_forward(x, padding, out=out) is out
    assert_exact(out, y)
    out = np.full(x.shape, np.nan, F32)
    assert ops.zero_padding2d_backward(dy, x.shape, padding, out=out) is out
    assert_exact(out, ref.zero_padding2d_backward(dy, x.shape, padding))


def test_zero_padding2d_bad_padding():
    x = np.zeros((1, 3, 3, 1), F32)
    for bad in [(1, 1, 1), (1, -1, 0, 0), (0.5, 0, 0, 0)]:
        with pytest.raises(ValueError, match="non-negative ints"):
            ops.zero_padding2d_forward(x, bad)
    with pytest.raises(ValueError, match="dy must be"):
        ops.zero_padding2d_backward(np.zeros((1, 5, 5, 1), F32), (1, 3, 4, 1), (1, 1, 1, 1))


# ===================================================================================== batch normalization
class TestNumpyBatchNorm(BatchNormChecks):
    """tests/checks_batchnorm.py's tests on the NumPy engine; the parts of a batch that exchange their sums (the
    two-process step) below."""
    engine = helpers.numpy_engine()
    rtol, atol_scale = 1e-5, 1e-5


class TestNumpyBatchNormInChunks(TestNumpyBatchNorm):
    """The same checks with chunks of a few rows (the NumPy ops work a chunk of rows at a time: 660 bytes are 55
    rows of 3 channels, 20 of 8, 5 of 33, 2 of 70; 4096 bytes 341 of 3, 128 of 8), so that every shape runs in
    several chunks, the last one shorter, viewed k rows at a time with k from 1 (an odd count) to 32."""

    @pytest.fixture(autouse=True, params=[660, 4096])
    def small_chunks(self, monkeypatch, request):
        monkeypatch.setattr(ops, "CHUNK_BYTES", request.param)
        assert {k for _, k in ops._row_chunks(1000, 8)} == ({4} if request.param == 660 else {32, 8})


def _parts_of(x2, sizes):
    """Row ranges of the parts of a batch of rows ``x2`` (M, C) with the given sizes."""
    edges = np.cumsum([0] + list(sizes))
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 3 * 8], ids=["one-chunk", "chunks-of-8-rows"])
@pytest.mark.parametrize("shape, sizes", [((8, 5, 5, 3), (4, 4)), ((9, 3, 3, 8), (4, 5)), ((7, 6), (1, 6)),
                                          ((5, 4), (3, 0, 2))])
def test_batchnorm_of_parts_that_exchange_their_sums_is_the_whole_batchs(shape, sizes, chunk_bytes, monkeypatch):
    """The two-process step's batch normalization: each part of the batch sends its per-channel statistics
    (``exchange``) and gets every part's; each part's y and dx are the whole batch's rows (the oracle's), the
    moving statistics the whole batch's update, dgamma and dbeta the part's own sums (they add up to the whole's).
    Also with each part worked through in chunks of a few rows."""
    if chunk_bytes is not None:
        monkeypatch.setattr(ops, "CHUNK_BYTES", chunk_bytes)
    x, gamma, beta, mm, mv, rng = bn_case(shape)
    dy = normal(rng, shape)
    c = shape[-1]
    x2, dy2 = x.reshape(-1, c), dy.reshape(-1, c)
    bounds = _parts_of(x2, [s * x2.shape[0] // shape[0] for s in sizes])
    y_ref, mean_ref, inv_ref, mm_ref, mv_ref = ref.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.9, 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = ref.batchnorm_backward(dy, x, gamma, mean_ref, inv_ref, True)
    y_ref, dx_ref = y_ref.reshape(-1, c), dx_ref.reshape(-1, c)

    def stats(a, b):  # every part's forward statistics (rows, mean, squared deviations), in float64
        part = x2[a:b].astype(np.float64)
        mean = part.mean(axis=0) if b > a else np.zeros(c)
        return np.stack([np.full(c, float(b - a)), mean, ((part - mean) ** 2).sum(axis=0)])

    def sums(a, b):  # every part's backward sums (rows, Σ dy, Σ dy·x̂) with the whole batch's statistics
        xhat = (x2[a:b] - mean_ref) * inv_ref
        return np.stack([np.full(c, float(b - a)), dy2[a:b].sum(axis=0), (dy2[a:b] * xhat).sum(axis=0)])

    dgammas, dbetas = [], []
    for k, (a, b) in enumerate(bounds):
        if a == b:
            continue
        def exchange(mine, table):
            parts = [table(*ab) for ab in bounds]
            np.testing.assert_allclose(mine, parts[k], rtol=1e-5, atol=1e-4)  # what this part sends
            parts[k] = mine
            return parts
        moving_mean, moving_var = mm.copy(), mv.copy()
        y, mean, inv_std = ops.batchnorm_forward_training(
            x2[a:b], gamma, beta, moving_mean, moving_var, 0.9, 1e-3, exchange=lambda m: exchange(m, stats))
        assert_close(y, y_ref[a:b])
        assert_close(mean, mean_ref)
        assert_close(inv_std, inv_ref)
        assert_close(moving_mean, mm_ref)
        assert_close(moving_var, mv_ref)
        dx, dgamma, dbeta = ops.batchnorm_backward(dy2[a:b], x2[a:b], gamma, mean, inv_std, True,
                                                   exchange=lambda m: exchange(m, sums))
        assert_close(dx, dx_ref[a:b], atol_scale=1e-4)
        dgammas.append(dgamma)
        dbetas.append(dbeta)
    assert_close(np.sum(dgammas, axis=0), dgamma_ref, atol_scale=1e-4)
    assert_close(np.sum(dbetas, axis=0), dbeta_ref, atol_scale=1e-4)


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 4 * 64], ids=["one-chunk", "chunks-of-64-rows"])
def test_batchnorm_statistics_of_data_far_from_zero(monkeypatch, chunk_bytes):
    """Channels at 1000 with a spread of about 1.4 that differs from image to image, so the chunks' means differ:
    the batch's mean and variance (through inv_std and the moving variance) stay within float32 rounding of the
    float64 oracle's, in one chunk and in many (each chunk's float32 mean is corrected before the merge)."""
    if chunk_bytes is not None:
        monkeypatch.setattr(ops, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(21)
    x = f32(1000 + rng.normal(size=(16, 1, 1, 4)) + rng.normal(size=(16, 8, 8, 4)))
    gamma, beta, mm, mv = np.ones(4, F32), np.zeros(4, F32), np.zeros(4, F32), np.ones(4, F32)
    _, mean, inv_std = ops.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.0, 1e-3)
    x64 = x.astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=2e-7)
    np.testing.assert_allclose(mv, x64.var(axis=0), rtol=2e-6)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(x64.var(axis=0) + 1e-3), rtol=2e-6)


def test_batchnorm_backward_of_an_empty_batch_in_inference_mode():
    """A frozen BatchNormalization (moving statistics) given no rows: an empty dx and zero weight gradients."""
    x, gamma, _, mm, mv, _ = bn_case((2, 3, 3, 5))
    inv_std = f32(1 / np.sqrt(mv + 1e-3))
    empty = np.zeros((0, 3, 3, 5), F32)
    dx, dgamma, dbeta = ops.batchnorm_backward(empty, empty, gamma, mm, inv_std, False, {})
    assert dx.shape == empty.shape
    np.testing.assert_array_equal(dgamma, 0)
    np.testing.assert_array_equal(dbeta, 0)


def test_merge_moments_has_no_cancellation_and_needs_a_row():
    """Parts far from zero with a tiny spread (the case where E[x²] − E[x]² loses every digit)."""
    rng = np.random.default_rng(3)
    x = 1e4 + rng.normal(size=(300, 2)) * 1e-2
    parts = [x[:100], x[100:250], x[250:]]
    stats = [np.stack([np.full(2, float(len(p))), p.mean(axis=0), ((p - p.mean(axis=0)) ** 2).sum(axis=0)])
             for p in parts]
    mean, var = ops._merge_moments(stats)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(var, x.var(axis=0), rtol=1e-4)
    empty = np.zeros((3, 2))
    with pytest.raises(ValueError, match="at least one row"):
        ops._merge_moments([empty, empty])


# ===================================================================================== depthwise conv2d
def _check_depthwise(n, c, hw, k, s, pad, dm, bias=True, activation=None):
    x, wt, b, s, padding, rng = depthwise_case(n, c, hw, k, s, pad, dm, bias)
    saved = (x.copy(), wt.copy())
    y = ops.depthwise_conv2d_forward(x, wt, b, s, padding, activation, {})
    y_ref = ref.depthwise_conv2d_forward(x, wt, b, s, padding, activation)
    assert y.shape == (n,) + expected_hw(pad, hw[0], hw[1], wt.shape[:2], s) + (c * dm,)
    assert_close(y, y_ref)
    dy = normal(rng, y.shape)
    if activation is not None:
        dy = f32(ref.activation_backward(dy, y_ref, activation))
    assert_close(ops.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding, {}),
                 ref.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding))
    dw, db = ops.depthwise_conv2d_backward_filter(dy, x, wt.shape, s, padding, {})
    dw_ref, db_ref = ref.depthwise_conv2d_backward_filter(dy, x, wt.shape, s, padding)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)
    np.testing.assert_array_equal(x, saved[0])
    np.testing.assert_array_equal(wt, saved[1])


@pytest.mark.parametrize("n, c, hw, k, s, pad, dm", DEPTHWISE_GRID, ids=map(depthwise_id, DEPTHWISE_GRID))
def test_depthwise_conv2d_matches_reference(n, c, hw, k, s, pad, dm):
    _check_depthwise(n, c, hw, k, s, pad, dm)


@pytest.mark.parametrize("bias, activation", [(False, None), (True, "relu"), (False, "relu"), (True, "softmax")])
def test_depthwise_conv2d_bias_and_activation(bias, activation):
    _check_depthwise(2, 3, (7, 5), 3, 1, "same", 2, bias, activation)
    _check_depthwise(2, 8, (6, 6), 2, 2, "same", 1, bias, activation)


@pytest.mark.parametrize("case", [(5, 3, (7, 5), 3, 1, "same", 2), (5, 8, (6, 6), 2, 2, "same", 1),
                                  (5, 4, (9, 9), 3, 2, "valid", 1), (3, 3, (5, 5), 3, 1, "valid", 2)],
                         ids=map(depthwise_id, [(5, 3, (7, 5), 3, 1, "same", 2), (5, 8, (6, 6), 2, 2, "same", 1),
                                                (5, 4, (9, 9), 3, 2, "valid", 1), (3, 3, (5, 5), 3, 1, "valid", 2)]))
def test_depthwise_conv2d_an_image_at_a_time(monkeypatch, case):
    """The depthwise ops work a chunk of images at a time: with chunks of one image (stride 1 and 2, the input
    gradient gathered and scattered), forward and both gradients match the oracle, and a strided out= buffer
    gets the values."""
    monkeypatch.setattr(ops, "CHUNK_BYTES", 1)
    _check_depthwise(*case)
    x, wt, b, s, padding, rng = depthwise_case(*case)
    y_ref = ref.depthwise_conv2d_forward(x, wt, b, s, padding, None)
    out = np.empty(y_ref.shape[:-1] + (2 * y_ref.shape[-1],), F32)[..., ::2]
    assert ops.depthwise_conv2d_forward(x, wt, b, s, padding, None, {}, out=out) is out
    assert_close(out, y_ref)
    dy = normal(rng, y_ref.shape)
    dx = np.empty(x.shape[:-1] + (2 * x.shape[-1],), F32)[..., ::2]
    assert ops.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding, {}, out=dx) is dx
    assert_close(dx, ref.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding))


@pytest.mark.parametrize("extra", [0, 1], ids=["by-taps", "einsum"])
@pytest.mark.parametrize("pad", ["same", "valid"])
def test_depthwise_conv2d_both_stride_1_paths(extra, pad, monkeypatch):
    """One filter per channel at stride 1 runs tap by tap up to DEPTHWISE_TAPS_MAX_CHANNELS channels, by einsum
    above (the grid's few channels take the first): both against the oracle, in bands of 2 rows (the last one
    shorter) and in one."""
    c = ops.DEPTHWISE_TAPS_MAX_CHANNELS + extra
    assert ops._depthwise_by_taps_applies((3, 3, c, 1), (1, 1)) == (extra == 0)
    assert not ops._depthwise_by_taps_applies((3, 3, c, 2), (1, 1))
    assert not ops._depthwise_by_taps_applies((3, 3, c, 1), (2, 2))
    _check_depthwise(2, c, (7, 6), 3, 1, pad, 1)
    monkeypatch.setattr(ops, "DEPTHWISE_BAND_VALUES", 2 * 6 * c)  # 2 rows of 6 outputs: bands of 2, 2, 2, 1
    _check_depthwise(2, c, (7, 6), 3, 1, pad, 1)


def test_depthwise_conv2d_out_buffers():
    x, wt, b, s, padding, rng = depthwise_case(2, 3, (7, 5), 3, 2, "same", 2)
    y_ref = ref.depthwise_conv2d_forward(x, wt, b, s, padding, "relu")
    out = np.full(y_ref.shape, np.nan, F32)
    assert ops.depthwise_conv2d_forward(x, wt, b, s, padding, "relu", {}, out=out) is out
    assert_close(out, y_ref)
    dy = normal(rng, y_ref.shape)
    dx = np.full(x.shape, np.nan, F32)
    assert ops.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding, {}, out=dx) is dx
    assert_close(dx, ref.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding))
    dw, db = np.full(wt.shape, np.nan, F32), np.full(b.shape, np.nan, F32)
    got = ops.depthwise_conv2d_backward_filter(dy, x, wt.shape, s, padding, {}, out_w=dw, out_b=db)
    assert got[0] is dw and got[1] is db
    for g, want in zip(got, ref.depthwise_conv2d_backward_filter(dy, x, wt.shape, s, padding)):
        assert_close(g, want)


def test_depthwise_conv2d_window_larger_than_the_input():
    x, wt = np.zeros((1, 3, 3, 2), F32), np.zeros((5, 5, 2, 1), F32)
    with pytest.raises(ValueError, match="does not fit the 3x3 input"):
        ops.depthwise_conv2d_forward(x, wt, None, (1, 1), VALID, None)
    with pytest.raises(ValueError, match="expects 3"):
        ops.depthwise_conv2d_forward(x, np.zeros((1, 1, 3, 1), F32), None, (1, 1), VALID, None)


def test_separable_conv2d_is_depthwise_then_a_1x1_conv2d():
    """SeparableConv2D's two parts on the NumPy engine, forward and backward, against the oracle's."""
    rng = np.random.default_rng(27)
    x, wd, wp, b = normal(rng, (2, 9, 8, 3)), normal(rng, (3, 3, 3, 2)), normal(rng, (1, 1, 6, 5)), normal(rng, (5,))
    stride, pad = (2, 2), padding_for("same", 9, 8, (3, 3), (2, 2))
    ctx_d, ctx_p = {}, {}
    mid = ops.depthwise_conv2d_forward(x, wd, None, stride, pad, None, ctx_d)
    y = ops.conv2d_forward(mid, wp, b, (1, 1), VALID, "relu", ctx_p)
    mid_ref = ref.depthwise_conv2d_forward(x, wd, None, stride, pad, None)
    y_ref = ref.conv2d_forward(mid_ref, wp, b, (1, 1), VALID, "relu")
    assert_close(y, y_ref)
    dy = f32(ref.activation_backward(normal(rng, y.shape), y_ref, "relu"))
    dmid = ops.conv2d_backward_data(dy, wp, mid.shape, (1, 1), VALID, ctx_p)
    dmid_ref = ref.conv2d_backward_data(dy, wp, mid.shape, (1, 1), VALID)
    assert_close(dmid, dmid_ref)
    for got, want in zip(ops.conv2d_backward_filter(dy, mid, wp.shape, (1, 1), VALID, ctx_p),
                         ref.conv2d_backward_filter(dy, mid_ref, wp.shape, (1, 1), VALID)):
        assert_close(got, want)
    dmid = f32(dmid_ref)
    assert_close(ops.depthwise_conv2d_backward_data(dmid, wd, x.shape, stride, pad, ctx_d),
                 ref.depthwise_conv2d_backward_data(dmid, wd, x.shape, stride, pad))
    assert_close(ops.depthwise_conv2d_backward_filter(dmid, x, wd.shape, stride, pad, ctx_d)[0],
                 ref.depthwise_conv2d_backward_filter(dmid, x, wd.shape, stride, pad)[0])


@pytest.mark.parametrize("layout", ["slice", "transpose", "fortran", "reversed"])
def test_non_contiguous_inputs_to_the_new_ops(layout):
    rng = np.random.default_rng(28)
    x, wt, b = normal(rng, (2, 7, 5, 3)), normal(rng, (3, 2, 3, 2)), normal(rng, (6,))
    padding = padding_for("same", 7, 5, (3, 2), (1, 2))
    y = ops.depthwise_conv2d_forward(x, wt, b, (1, 2), padding, "relu", {})
    dy = normal(rng, y.shape)
    _same_in_layout(layout, lambda *a: ops.depthwise_conv2d_forward(*a, (1, 2), padding, "relu", {}), x, wt, b)
    _same_in_layout(layout, lambda *a: ops.depthwise_conv2d_backward_data(*a, x.shape, (1, 2), padding, {}), dy, wt)
    _same_in_layout(layout, lambda *a: ops.depthwise_conv2d_backward_filter(*a, wt.shape, (1, 2), padding, {}),
                    dy, x, exact=False)
    _same_in_layout(layout, ops.global_maxpool2d_forward, x)
    _same_in_layout(layout, lambda a: ops.zero_padding2d_forward(a, (1, 2, 0, 3)), x)
    _same_in_layout(layout, lambda a: ops.zero_padding2d_backward(a, (2, 4, 2, 3), (1, 2, 0, 3)), x)
    xb, gamma, beta, mm, mv, _ = bn_case((2, 7, 5, 3))
    _same_in_layout(layout, lambda *a: ops.batchnorm_forward_inference(*a, 1e-3), xb, gamma, beta, mm, mv,
                    exact=False)
    _same_in_layout(layout, lambda *a: ops.batchnorm_forward_training(*a, 0.99, 1e-3)[:2], xb, gamma, beta,
                    mm.copy(), mv.copy(), exact=False)
    y, mean, inv_std = ops.batchnorm_forward_training(xb, gamma, beta, mm.copy(), mv.copy(), 0.99, 1e-3)
    _same_in_layout(layout, lambda *a: ops.batchnorm_backward(*a, True), normal(rng, xb.shape), xb, gamma, mean,
                    inv_std, exact=False)


# ===================================================================================== repeated calls
def test_second_backward_call_gives_the_same_result():
    rng = np.random.default_rng(24)
    x, wt, b = normal(rng, (2, 7, 5, 3)), normal(rng, (3, 3, 3, 4)), normal(rng, (4,))
    padding = padding_for("same", 7, 5, (3, 3), (2, 2))
    ctx = {}
    y = ops.conv2d_forward(x, wt, b, (2, 2), padding, None, ctx)
    saved_ctx = {k: np.array(v, copy=True) for k, v in ctx.items()}
    dy = normal(rng, y.shape)
    dy_saved = dy.copy()
    # a returned gradient may live in ctx until the next backward: copy it before calling again
    def backward():
        return (ops.conv2d_backward_data(dy, wt, x.shape, (2, 2), padding, ctx),
                *ops.conv2d_backward_filter(dy, x, wt.shape, (2, 2), padding, ctx))

    first = tuple(np.array(a, copy=True) for a in backward())
    second = backward()
    for a, c in zip(first, second):
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(dy, dy_saved)
    for k, v in saved_ctx.items():
        np.testing.assert_array_equal(ctx[k], v)

    xp = f32(rng.permutation(2 * 7 * 5 * 3).reshape(2, 7, 5, 3))
    pool, stride, padding = (3, 3), (2, 2), padding_for("same", 7, 5, (3, 3), (2, 2))
    y, idx = ops.maxpool2d_forward(xp, pool, stride, padding)
    idx_saved, dy = idx.copy(), normal(rng, y.shape)
    dx1 = ops.maxpool2d_backward(dy, idx, xp.shape, pool, stride, padding).copy()
    dx2 = ops.maxpool2d_backward(dy, idx, xp.shape, pool, stride, padding)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(idx, idx_saved)
    a1 = ops.avgpool2d_backward(dy, xp.shape, pool, stride, padding).copy()
    a2 = ops.avgpool2d_backward(dy, xp.shape, pool, stride, padding)
    np.testing.assert_array_equal(a1, a2)


def test_conv2d_ctx_reused_across_steps_and_batch_sizes():
    # one ctx for a layer's whole life, as the layers keep it: work arrays kept there from one step to
    # the next (and resized when the batch changes) must not leak into the next step's results
    ctx = {}
    rng = np.random.default_rng(31)
    wt, b = normal(rng, (3, 3, 3, 4)), normal(rng, (4,))
    padding = padding_for("same", 7, 5, (3, 3), (1, 1))
    for n in (2, 2, 7, 1, 2):
        x = normal(rng, (n, 7, 5, 3))
        y = ops.conv2d_forward(x, wt, b, (1, 1), padding, "relu", ctx)
        y_ref = ref.conv2d_forward(x, wt, b, (1, 1), padding, "relu")
        assert_close(y, y_ref)
        dy = f32(ref.activation_backward(normal(rng, y.shape), y_ref, "relu"))
        assert_close(ops.conv2d_backward_data(dy, wt, x.shape, (1, 1), padding, ctx),
                     ref.conv2d_backward_data(dy, wt, x.shape, (1, 1), padding))
        for got, want in zip(ops.conv2d_backward_filter(dy, x, wt.shape, (1, 1), padding, ctx),
                             ref.conv2d_backward_filter(dy, x, wt.shape, (1, 1), padding)):
            assert_close(got, want)


@pytest.mark.parametrize("stride", [(2, 2), (1, 1)])  # the non-overlapping and the overlapping code paths
def test_maxpool2d_backward_non_finite_gradient_stays_on_the_max(stride):
    x = f32(np.random.default_rng(32).permutation(16).reshape(1, 4, 4, 1))
    y, idx = ops.maxpool2d_forward(x, (2, 2), stride, VALID)
    dy = np.ones(y.shape, F32)
    dy[0, 0, 0, 0], dy[0, -1, -1, 0] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        dx = ops.maxpool2d_backward(dy, idx, x.shape, (2, 2), stride, VALID)
    assert_exact(dx, ref.maxpool2d_backward(dy, idx, x.shape, (2, 2), stride, VALID))


# ===================================================================================== conv2d + max-pool
def _check_idx(idx, y_ref, idx_ref, z, activation):
    """idx names a tap holding the window's maximum; where the maximum is clear of the runner-up (and, after
    a relu, above 0: below, any tap gets no gradient), it is the oracle's tap."""
    windows = window_taps(z, y_ref.shape[1], y_ref.shape[2])
    got = idx.astype(np.int64)
    assert ((got >= 0) & (got < 4)).all()
    chosen = np.take_along_axis(windows, got[..., None], axis=-1)[..., 0]
    live = y_ref > 0 if activation == "relu" else np.ones(y_ref.shape, bool)
    np.testing.assert_allclose(chosen[live], y_ref[live], rtol=1e-5, atol=1e-5 * float(np.abs(z).max()))
    top2 = np.sort(windows, axis=-1)[..., -2:]
    clear = live & ((top2[..., 1] - top2[..., 0]) > 1e-4 * (1 + np.abs(top2[..., 1])))
    assert clear.any()
    np.testing.assert_array_equal(got[clear], idx_ref[clear])


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-2"])
@pytest.mark.parametrize("case", CONV_POOL_GRID, ids=conv_pool_id)
def test_conv2d_maxpool_matches_reference(case, chunked, monkeypatch):
    """The fused op against the oracle's conv2d then max-pooling (forward), and against its maxpool, activation
    and conv backward routed through the op's own window indices (backward); need_dx=False writes the same
    weight gradients and returns None; the backward also works without the forward's ctx. ``chunked``: the op
    works 2 images at a time (the last chunk shorter for an odd batch)."""
    n, c, hw, k, s, pad, f, activation, bias = case
    x, wt, b, s, pads, rng = _conv_case(n, c, hw, k, s, pad, f, bias)
    if chunked:
        pooled = ref.conv2d_maxpool_forward(x, wt, b, s, pads, activation)[0].shape
        winograd = ops._winograd_applies(wt.shape, s)
        monkeypatch.setattr(ops, "CHUNK_BYTES", 2 * 4 * ops._pooled_values(wt.shape, pooled[1], pooled[2], winograd))
        monkeypatch.setattr(ops, "WHOLE_BATCH_BYTES", 0)
    saved = (x.copy(), wt.copy())
    ctx = {}
    y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, activation, ctx)
    y_ref, idx_ref, z = ref.conv2d_maxpool_forward(x, wt, b, s, pads, activation)
    assert y.shape == y_ref.shape and idx.dtype == np.int8
    sizes = sorted({min(2, n - start) for start in range(0, n, 2)}) if chunked else [n]
    assert sorted(key[1] for key in ctx if key[0] == "chunk") == sizes
    assert_close(y, y_ref)
    _check_idx(idx, y_ref, idx_ref, z, activation)

    dy = normal(rng, y.shape)
    dx_ref, dw_ref, db_ref = ref.conv2d_maxpool_backward(dy, idx.astype(np.int64), z, x, wt, s, pads, activation)
    dw, db = np.full(wt.shape, np.nan, F32), (np.full((f,), np.nan, F32) if bias else None)
    dx = ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, activation, ctx, out_w=dw, out_b=db)
    assert dx.shape == x.shape
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)
    if bias:
        assert_close(db, db_ref)
    dw2 = np.full(wt.shape, np.nan, F32)
    assert ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, activation, ctx, out_w=dw2,
                                       need_dx=False) is None
    np.testing.assert_array_equal(dw2, dw)
    dw3 = np.full(wt.shape, np.nan, F32)
    dx3 = ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, activation, None, out_w=dw3)
    assert_close(dx3, dx_ref)
    assert_close(dw3, dw_ref)
    np.testing.assert_array_equal(x, saved[0])  # inputs not written to
    np.testing.assert_array_equal(wt, saved[1])


def _pool_in_chunks_of_2(monkeypatch, wt, pooled_hw):
    """Make conv2d_maxpool work 2 images at a time for this kernel and pooled size."""
    winograd = ops._winograd_applies(wt.shape, (1, 1))
    monkeypatch.setattr(ops, "CHUNK_BYTES", 2 * 4 * ops._pooled_values(wt.shape, *pooled_hw, winograd))
    monkeypatch.setattr(ops, "WHOLE_BATCH_BYTES", 0)


@pytest.mark.parametrize("activation, bias", [("relu", True), (None, False), (None, True)])
@pytest.mark.parametrize("c", [3, 8], ids=["im2col", "winograd"])
def test_conv2d_maxpool_in_chunks_matches_reference(monkeypatch, c, activation, bias):
    """Over a batch of 5 in chunks of 2 (2 + 2 + 1): y, idx, dx, dw and db against the oracle, through both paths,
    with and without relu and bias; y, idx and dx into out= buffers, C-contiguous (written there) or strided
    (copied there), give the same values."""
    x, wt, b, s, pads, rng = _conv_case(5, c, (9, 9), 3, 1, "valid", 4, bias)
    _pool_in_chunks_of_2(monkeypatch, wt, (3, 3))
    ctx = {}
    y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, activation, ctx)
    assert sorted(key[1] for key in ctx if key[0] == "chunk") == [1, 2]
    y_ref, idx_ref, z = ref.conv2d_maxpool_forward(x, wt, b, s, pads, activation)
    assert_close(y, y_ref)
    _check_idx(idx, y_ref, idx_ref, z, activation)
    dy = normal(rng, y.shape)
    dx_ref, dw_ref, db_ref = ref.conv2d_maxpool_backward(dy, idx.astype(np.int64), z, x, wt, s, pads, activation)
    dw, db = np.empty_like(wt), np.empty((4,), F32)
    dx = ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, activation, ctx, out_w=dw, out_b=db).copy()
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)
    for strided in (False, True):
        def buffer(shape, dtype=F32):
            return np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2] if strided else np.empty(shape, dtype)
        out, out_idx, out_dx = buffer(y.shape), buffer(y.shape, np.int8), buffer(x.shape)
        got = ops.conv2d_maxpool_forward(x, wt, b, s, pads, activation, ctx, out=out, out_idx=out_idx)
        assert got[0] is out and got[1] is out_idx
        np.testing.assert_array_equal(out, y)
        np.testing.assert_array_equal(out_idx, idx)
        assert ops.conv2d_maxpool_backward(dy, out, out_idx, x, wt, s, pads, activation, ctx, out_w=dw,
                                           out=out_dx) is out_dx
        np.testing.assert_array_equal(out_dx, dx)


@pytest.mark.parametrize("c", [3, 8], ids=["im2col", "winograd"])
def test_conv2d_maxpool_non_finite_values_in_some_chunks(monkeypatch, c):
    """A NaN input in one chunk and inf / NaN gradients in others: y, idx and dx are those of the batch in one
    chunk (the NaN scan runs per chunk, the gradient's finiteness is the whole batch's)."""
    x, wt, b, s, pads, rng = _conv_case(5, c, (9, 9), 3, 1, "valid", 4, True)
    x[3, 4, 4, 1] = np.nan
    dy = normal(rng, (5, 3, 3, 4))
    dy[0, 1, 1, 2], dy[4, 0, 2, 0] = np.inf, np.nan
    whole = []
    for chunked in (False, True):
        if chunked:
            _pool_in_chunks_of_2(monkeypatch, wt, (3, 3))
        ctx = {}
        with np.errstate(invalid="ignore"):
            y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, None, ctx)
            dx = ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, None, ctx, out_w=np.empty_like(wt))
        assert (sorted(key[1] for key in ctx if key[0] == "chunk") == [1, 2]) == chunked
        got = (y.copy(), idx.copy(), dx.copy())
        if chunked:
            for a, want in zip(got, whole):
                np.testing.assert_array_equal(np.isnan(a), np.isnan(want))
                np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6)
        whole = got
    assert np.isnan(whole[0][3]).any() and not np.isnan(whole[0][[0, 1, 2, 4]]).any()


def test_conv2d_maxpool_of_an_empty_batch():
    """No images: empty y, idx and dx (not None) and zero weight gradients."""
    x, wt, b, s, pads, _ = _conv_case(1, 8, (9, 9), 3, 1, "valid", 4, True)
    x = x[:0]
    y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, "relu", {})
    assert y.shape == idx.shape == (0, 3, 3, 4)
    dw, db = np.full(wt.shape, np.nan, F32), np.full((4,), np.nan, F32)
    dx = ops.conv2d_maxpool_backward(y, y, idx, x, wt, s, pads, "relu", {}, out_w=dw, out_b=db)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_conv2d_maxpool_ties_and_zeros_take_the_first_tap():
    """Constant inputs (every window a 4-way tie, as on MNIST's blank borders), linear and relu: the first
    tap wins and alone gets the gradient, as in the unfused pair."""
    x = np.ones((2, 6, 6, 3), F32)
    wt = np.full((3, 3, 3, 4), 0.25, F32)
    for activation, bias in ((None, np.array([0.5, -9.0, 0.0, 1.0], F32)), ("relu", np.full((4,), 0.5, F32))):
        y, idx = ops.conv2d_maxpool_forward(x, wt, bias, (1, 1), VALID, activation, {})
        np.testing.assert_array_equal(idx, 0)
        y_ref, idx_ref, z = ref.conv2d_maxpool_forward(x, wt, bias, (1, 1), VALID, activation)
        assert_exact(y, y_ref)
        dy = normal(np.random.default_rng(3), y.shape)
        dw = np.empty(wt.shape, F32)
        dx = ops.conv2d_maxpool_backward(dy, y, idx, x, wt, (1, 1), VALID, activation, {}, out_w=dw,
                                         out_b=np.empty((4,), F32))
        dx_ref, dw_ref, _ = ref.conv2d_maxpool_backward(dy, idx_ref, z, x, wt, (1, 1), VALID, activation)
        assert_close(dx, dx_ref)
        assert_close(dw, dw_ref)


def test_conv2d_maxpool_nan_and_inf():
    """A NaN input makes its windows NaN (the first NaN tap wins, as in maxpool2d_forward); a non-finite
    pooled gradient stays on its window's maximum instead of spreading NaN over the window (0 · inf)."""
    x, wt, b, s, pads, rng = _conv_case(2, 2, (8, 8), 1, 1, "valid", 3, True)
    x[0, 2, 3, 1] = np.nan
    y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, None, {})
    y_ref, idx_ref, _ = ref.conv2d_maxpool_forward(x, wt, b, s, pads, None)
    assert np.isnan(y[0, 1, 1]).all() and np.isnan(y).sum() == 3
    np.testing.assert_array_equal(idx[0, 1, 1], idx_ref[0, 1, 1])
    x, wt, b, s, pads, rng = _conv_case(1, 2, (6, 6), 3, 1, "valid", 2, True)
    ctx = {}
    y, idx = ops.conv2d_maxpool_forward(x, wt, b, s, pads, None, ctx)
    y_ref, idx_ref, z = ref.conv2d_maxpool_forward(x, wt, b, s, pads, None)
    dy = np.ones(y.shape, F32)
    dy[0, 0, 0, 0], dy[0, 1, 1, 1] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        dw = np.empty(wt.shape, F32)
        ops.conv2d_maxpool_backward(dy, y, idx, x, wt, s, pads, None, ctx, out_w=dw, out_b=np.empty((2,), F32))
    dz = ctx[("chunk", 1)]["z"]  # each window tap's gradient (in the forward's z): non-finite on the maximum's tap
    assert np.isinf(dz[idx[0, 0, 0, 0], 0, 0, 0, 0]) and np.isnan(dz[idx[0, 1, 1, 1], 0, 1, 1, 1])
    assert np.isfinite(np.delete(dz[:, 0, 0, 0, 0], idx[0, 0, 0, 0])).all()
    assert np.isfinite(np.delete(dz[:, 0, 1, 1, 1], idx[0, 1, 1, 1])).all()


WINOGRAD_CASES = [case for case in CONV_POOL_GRID if ops._winograd_applies(
    (case[3], case[3], case[1], case[6]) if isinstance(case[3], int) else case[3] + (case[1], case[6]),
    (case[4], case[4]) if isinstance(case[4], int) else case[4])]


def test_the_grid_covers_both_numpy_paths_of_the_fused_op():
    """3x3 kernels at stride 1 over 8+ channels take the Winograd path (its tiles kept in the chunk's work dict),
    the rest the im2col path (its matrix kept there): the grid above checks both against the oracle."""
    assert len(WINOGRAD_CASES) >= 3 and len(WINOGRAD_CASES) < len(CONV_POOL_GRID) - 3
    for case in CONV_POOL_GRID:
        n, c, hw, k, s, pad, f, activation, bias = case
        x, wt, b, s, pads, _ = _conv_case(n, c, hw, k, s, pad, f, bias)
        ctx = {}
        ops.conv2d_maxpool_forward(x, wt, b, s, pads, activation, ctx)
        work = ctx[("chunk", n)]  # the grid's batches are one chunk
        assert ("wino_v" in work) == (case in WINOGRAD_CASES) and ("cols" in work) != (case in WINOGRAD_CASES)


@pytest.mark.parametrize("m", [2, 3])
def test_winograd_matrices_give_the_outputs_of_a_3x3_correlation(m):
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A of one (m+2)x(m+2) tile and one 3x3 kernel, with the Kronecker forms acting
    on blocks flattened row by row, is the m x m valid correlation (float64 arithmetic on the float32
    matrices)."""
    rng = np.random.default_rng(4)
    d, g = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
    tile, kernel, out = (a.astype(np.float64) for a in ops._WINOGRAD[m])
    assert tile.shape == ((m + 2) ** 2,) * 2 and kernel.shape == ((m + 2) ** 2, 9) and out.shape == (m * m,
                                                                                                  (m + 2) ** 2)
    y = (out @ ((kernel @ g.ravel()) * (tile @ d.ravel()))).reshape(m, m)
    want = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)


def test_plain_3x3_convolutions_over_many_channels_take_the_winograd_path():
    """conv2d_forward works chunk by chunk, through Winograd's tiles exactly where _plain_winograd_applies (3x3,
    stride 1, PLAIN_WINOGRAD_MIN_CHANNELS or more), else through im2col rows, and keeps no whole-batch matrix.
    The grid (up to 8 channels) checks the im2col path against the oracle; test_conv2d_in_chunks_of_images and
    the two calls below (the seed model's third layer) the Winograd path."""
    many = ops.PLAIN_WINOGRAD_MIN_CHANNELS
    for c, k, s in ((many, 3, 1), (many - 1, 3, 1), (many, 3, 2), (many, 5, 1)):
        x, wt, b, s, padding, _ = _conv_case(2, c, (7, 5), k, s, "same")
        ctx = {}
        ops.conv2d_forward(x, wt, b, s, padding, "relu", ctx)
        chunks = [work for key, work in ctx.items() if isinstance(key, tuple) and key[0] == "chunk"]
        assert chunks and "cols" not in ctx
        winograd = c == many and k == 3 and s == (1, 1)
        assert all(("wino_v" in work) == winograd != ("cols_plain" in work) for work in chunks)
    _check_conv(2, 64, (5, 5), 3, 1, "valid", f=64)
    _check_conv(3, 64, (8, 10), 3, 1, "valid", f=5, bias=False)  # 6x8 outputs: tiles past the bottom and right


def test_winograd_nan_input_makes_the_same_windows_nan():
    """A NaN input reaches every window whose tile holds it: the windows the direct convolution makes NaN."""
    x, wt, b, s, pads, _ = _conv_case(2, 8, (11, 12), 3, 1, "valid", 3, True)
    for r, c in ((0, 0), (4, 5), (5, 4), (10, 11), (7, 7)):
        xn = x.copy()
        xn[1, r, c, 2] = np.nan
        with np.errstate(invalid="ignore"):
            y, idx = ops.conv2d_maxpool_forward(xn, wt, b, s, pads, None, {})
        y_ref, _, _ = ref.conv2d_maxpool_forward(xn, wt, b, s, pads, None)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
        assert np.isnan(y_ref).any() == (r != 10)  # the last row feeds no window


def test_first_max_of_four_taps_is_the_general_scan():
    """The 2x2 shortcut of _first_max (pairs, then pairs of pairs) against the general scan, on values with
    many ties and -inf (the padding of "same" pooling)."""
    rng = np.random.default_rng(8)
    taps = [f32(rng.integers(-2, 3, size=(5, 7, 3)).astype(np.float64)) for _ in range(4)]
    taps[2][0] = -np.inf
    y4, idx4 = ops._first_max(taps)
    general = taps + [np.full_like(taps[0], -np.inf)]  # a fifth tap that never wins: the general scan
    y5, idx5 = ops._first_max(general)
    assert_exact(y4, y5)
    np.testing.assert_array_equal(idx4, idx5)
    stacked = np.stack(taps, axis=-1)
    np.testing.assert_array_equal(idx4, np.argmax(stacked, axis=-1))  # NumPy's argmax: the first maximum


# ===================================================================================== non-contiguous inputs
def _layouts(a):
    """The same values as ``a`` in other memory layouts: a strided slice, a transpose, Fortran order and
    a reversed view."""
    big = np.zeros(tuple(2 * d + 1 for d in a.shape), a.dtype)
    sl = tuple(slice(1, 2 * d + 1, 2) for d in a.shape)
    big[sl] = a
    rev_axes = tuple(range(a.ndim))[::-1]
    transposed = np.ascontiguousarray(a.transpose(rev_axes)).transpose(rev_axes)
    flipped = a[(slice(None, None, -1),) * a.ndim].copy()[(slice(None, None, -1),) * a.ndim]
    views = {"slice": big[sl], "transpose": transposed, "fortran": np.asfortranarray(a), "reversed": flipped}
    for name, v in views.items():
        np.testing.assert_array_equal(v, a)
        assert a.ndim < 2 or not v.flags.c_contiguous, name
    return views


def _same_in_layout(layout, fn, *args, exact=True):
    """fn on the arrays of ``args`` as given, and on the same values in another memory layout."""
    def call(view):
        out = fn(*(_layouts(a)[layout] if view and isinstance(a, np.ndarray) else a for a in args))
        return [np.array(o, copy=True) for o in (out if isinstance(out, tuple) else (out,))]

    for got, want in zip(call(True), call(False)):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:  # a reduction NumPy or BLAS may order differently for another layout
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.mark.parametrize("layout", ["slice", "transpose", "fortran", "reversed"])
def test_non_contiguous_inputs_give_the_contiguous_result(layout):
    rng = np.random.default_rng(25)
    x, wt, b = normal(rng, (2, 7, 5, 3)), normal(rng, (3, 2, 3, 4)), normal(rng, (4,))
    for padding in (padding_for("same", 7, 5, (3, 2), (1, 2)), VALID):
        y = ops.conv2d_forward(x, wt, b, (1, 2), padding, "relu", {})
        dy = normal(rng, y.shape)
        _same_in_layout(layout, lambda *a: ops.conv2d_forward(*a, (1, 2), padding, "relu", {}), x, wt, b)
        _same_in_layout(layout, lambda *a: ops.conv2d_backward_data(*a, x.shape, (1, 2), padding, {}), dy, wt)
        _same_in_layout(layout, lambda *a: ops.conv2d_backward_filter(*a, wt.shape, (1, 2), padding, None),
                        dy, x)

        pool, stride = (3, 3), (2, 2)
        y, idx = ops.maxpool2d_forward(x, pool, stride, padding)
        dy = normal(rng, y.shape)
        _same_in_layout(layout, lambda a: ops.maxpool2d_forward(a, pool, stride, padding), x)
        _same_in_layout(layout, lambda *a: ops.maxpool2d_backward(*a, x.shape, pool, stride, padding),
                        dy, idx)
        _same_in_layout(layout, lambda a: ops.avgpool2d_forward(a, pool, stride, padding), x)
        _same_in_layout(layout, lambda a: ops.avgpool2d_backward(a, x.shape, pool, stride, padding), dy)
    _same_in_layout(layout, ops.global_avgpool2d_forward, x, exact=False)
    _same_in_layout(layout, lambda a: ops.global_avgpool2d_backward(a, x.shape), normal(rng, (2, 3)))

    # BLAS and NumPy's SIMD loops may take another path for strided operands: to float32 rounding
    xd, wd, bd = normal(rng, (5, 6)), normal(rng, (6, 4)), normal(rng, (4,))
    for act in (None, "relu", "softmax"):
        y = ops.dense_forward(xd, wd, bd, act)
        _same_in_layout(layout, lambda *a: ops.dense_forward(*a, act), xd, wd, bd, exact=False)
        _same_in_layout(layout, lambda *a: ops.activation_forward(*a, act), xd, exact=False)
        _same_in_layout(layout, lambda *a: ops.activation_backward(*a, act), normal(rng, y.shape), y,
                        exact=False)
    dyd = normal(rng, (5, 4))
    _same_in_layout(layout, ops.dense_backward_data, dyd, wd, exact=False)
    _same_in_layout(layout, ops.dense_backward_weights, dyd, xd, exact=False)


# ===================================================================================== activations, dense
def _away_from_zero(a, gap=1e-2):
    return f32(np.sign(a) * (np.abs(a) + 2 * gap))


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("shape", [(1, 10), (7, 3), (2, 5, 5, 8)])
def test_activations_match_reference(activation, shape):
    rng = np.random.default_rng(26)
    x = _away_from_zero(rng.normal(size=shape) * 3)
    y = ops.activation_forward(x, activation)
    y_ref = ref.activation_forward(x, activation)
    assert_close(y, y_ref, rtol=1e-6, atol_scale=1e-6)
    dy = normal(rng, shape)
    assert_close(ops.activation_backward(dy, y, activation), ref.activation_backward(dy, y, activation),
                 rtol=1e-5, atol_scale=1e-6)


def test_unknown_activation_raises():
    x = np.zeros((2, 3), F32)
    with pytest.raises(ValueError, match="mish.*known: relu, softmax, sigmoid, tanh"):
        ops.activation_forward(x, "mish")
    with pytest.raises(ValueError, match="mish"):
        ops.activation_backward(x, x, "mish")


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("n, n_in, units, bias", [(1, 5, 3, True), (2, 12, 10, False), (7, 64, 10, True),
                                                  (7, 576, 64, True)])
def test_dense_matches_reference(n, n_in, units, bias, activation):
    rng = np.random.default_rng([n, n_in, units, bias])
    x, w = normal(rng, (n, n_in)), normal(rng, (n_in, units), 1 / np.sqrt(n_in))
    b = normal(rng, (units,)) if bias else None
    y = ops.dense_forward(x, w, b, activation)
    assert_close(y, ref.dense_forward(x, w, b, activation))
    dy = normal(rng, y.shape)
    dz = ops.activation_backward(dy, y, activation)
    assert_close(dz, ref.activation_backward(dy, y, activation), atol_scale=1e-5)
    dz = f32(ref.activation_backward(dy, y, activation))
    assert_close(ops.dense_backward_data(dz, w), ref.dense_backward_data(dz, w))
    dw, db = ops.dense_backward_weights(dz, x)
    dw_ref, db_ref = ref.dense_backward_weights(dz, x)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)


# ===================================================================================== merging
@pytest.mark.parametrize("case", helpers.CONCAT_GRID, ids=helpers.concat_id)
def test_add_concat_and_split_match_reference(case):
    shapes, axis = case
    rng = np.random.default_rng(len(shapes) + axis)
    xs = [normal(rng, s) for s in shapes]
    assert_exact(ops.add(xs[0], xs[0][::-1].copy()), ref.add(xs[0], xs[0][::-1]))
    y = ops.concat(xs, axis)
    assert_exact(y, ref.concat(xs, axis))
    dy = normal(rng, y.shape)
    sizes = [s[axis] for s in shapes]
    for got, want in zip(ops.split(dy, sizes, axis), ref.split(dy, sizes, axis)):
        assert_exact(np.ascontiguousarray(got), want)
    outs = [np.full(s, np.nan, F32) for s in shapes]  # into kept buffers, as the CUDA engine's layers pass them
    assert ops.split(dy, sizes, axis, outs=outs) is outs
    for got, want in zip(outs, ref.split(dy, sizes, axis)):
        assert_exact(got, want)


# ===================================================================================== dropout
def seed_table(*seeds):
    """A one-row seed table (one slot per seed) and a step counter at row 0, as an eager step has them."""
    return np.array([seeds], np.uint64), np.zeros(1, np.int32)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8])
def test_dropout_mask(rate):
    rng = np.random.default_rng(27)
    x = normal(rng, (100, 40, 50))
    y, mask = ops.dropout_forward(x, rate, *seed_table(1234), 0)
    assert y.shape == mask.shape == x.shape and mask.dtype == F32
    kept = mask != 0
    np.testing.assert_allclose(mask[kept], 1 / (1 - rate), rtol=1e-6)
    assert abs(kept.mean() - (1 - rate)) < 0.005  # 200,000 draws: the standard error is < 0.0012
    np.testing.assert_array_equal(y, x * mask)
    y2, mask2 = ops.dropout_forward(x, rate, *seed_table(1235, 1234), 1)  # slot 1 holds the same seed
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_array_equal(y2, y)
    _, mask3 = ops.dropout_forward(x, rate, *seed_table(1235), 0)
    assert (mask3 != mask).any()
    table = np.array([[1235], [1234]], np.uint64)  # the step counter picks the row
    np.testing.assert_array_equal(ops.dropout_forward(x, rate, table, np.ones(1, np.int32), 0)[1], mask)
    dy = normal(rng, x.shape)
    assert_exact(ops.dropout_backward(dy, mask), ref.dropout_backward(dy, mask))


@pytest.mark.parametrize("first", [0, 1, 3, 7])
def test_dropout_of_a_part_of_a_batch_is_that_part_of_the_batchs_mask(first):
    """offset: the images first.. of a batch (the second half of a split step) draw their rows of the whole
    batch's mask; the first images alone draw its first rows."""
    x = normal(np.random.default_rng(29), (8, 5, 3))
    _, whole = ops.dropout_forward(x, 0.5, *seed_table(99), 0)
    _, tail = ops.dropout_forward(x[first:], 0.5, *seed_table(99), 0, offset=first)
    np.testing.assert_array_equal(tail, whole[first:])
    _, head = ops.dropout_forward(x[:first], 0.5, *seed_table(99), 0)
    np.testing.assert_array_equal(head, whole[:first])


def test_dropout_rate_zero_keeps_everything():
    x = normal(np.random.default_rng(28), (4, 6))
    y, mask = ops.dropout_forward(x, 0.0, *seed_table(7), 0)
    np.testing.assert_array_equal(mask, 1.0)
    np.testing.assert_array_equal(y, x)


# ===================================================================================== losses
def _labels(rng, n, k, sparse):
    ints = rng.integers(0, k, size=n)
    return ints if sparse else f32(np.eye(k)[ints])


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("n, k", [(1, 2), (7, 10), (64, 10)])
def test_crossentropy_matches_reference(n, k, sparse):
    rng = np.random.default_rng([n, k, sparse])
    labels = _labels(rng, n, k, sparse)
    p = f32(ref.activation_forward(rng.normal(size=(n, k)) * 2, "softmax"))
    assert_close(ops.crossentropy_forward(p, labels, sparse), ref.crossentropy_forward(p, labels, sparse))
    assert_close(ops.softmax_crossentropy_backward(p, labels, sparse),
                 ref.softmax_crossentropy_backward(p, labels, sparse), rtol=1e-6, atol_scale=1e-7)
    q = f32(rng.uniform(0.05, 1.0, size=(n, k)))  # not normalised, away from the clip
    assert_close(ops.crossentropy_forward(q, labels, sparse), ref.crossentropy_forward(q, labels, sparse))
    assert_close(ops.crossentropy_backward(q, labels, sparse), ref.crossentropy_backward(q, labels, sparse))


def test_crossentropy_clipping():
    p = f32([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1e-12, 0.5, 0.5], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 0, 2])
    got = ops.crossentropy_forward(p, labels, True)
    want = ref.crossentropy_forward(p, labels, True)
    # -log(1e-7) = 16.1; float32 cannot hold 1 - 1e-7 exactly, so the perfect row is ~1.2e-7, not 1e-7
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    dp = ops.crossentropy_backward(p, labels, True)
    assert dp.dtype == F32
    np.testing.assert_array_equal(dp[2], 0.0)  # the true class is clipped: no gradient
    np.testing.assert_allclose(dp[3], ref.crossentropy_backward(p, labels, True)[3], rtol=1e-5)
    assert np.isfinite(dp).all()


def test_count_correct_matches_reference():
    rng = np.random.default_rng(29)
    p = f32(rng.integers(0, 3, size=(50, 4)))  # many ties: the first maximum counts
    for sparse in (True, False):
        labels = _labels(rng, 50, 4, sparse)
        got = ops.count_correct(p, labels, sparse)
        want = ref.count_correct(p, labels, sparse)
        assert int(got) == want
        assert 0 < want < 50
    p = f32([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    assert int(ops.count_correct(p, np.array([1, 2]), True)) == 1
    assert int(ops.count_correct(p, np.array([0, 2]), True)) == 2


# ===================================================================================== optimizers
STEPS = 5


def _opt_start(shape=(40,), seed=30):
    rng = np.random.default_rng(seed)
    return rng, normal(rng, shape)


def _assert_state(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def _rates(lr):
    """A table of a different rate per step (the updates must read their step's row) and the counter."""
    return (np.array([lr * (1 + 0.25 * k) for k in range(STEPS)], np.float32), np.zeros(1, np.int32))


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd_update_matches_reference(momentum, nesterov):
    rng, w = _opt_start()
    m = np.zeros_like(w)
    w_ref, m_ref = w.astype(np.float64), m.astype(np.float64)
    rates, step = _rates(0.01)
    for k in range(STEPS):
        g = normal(rng, w.shape)
        step[0] = k
        assert ops.sgd_update(w, g, m, rates, step, momentum, nesterov) is None  # in place
        w_ref, m_ref = ref.sgd_update(w_ref, g, m_ref, float(rates[k]), momentum, nesterov)
        _assert_state(w, w_ref)
        _assert_state(m, m_ref)


@pytest.mark.parametrize("lr, rho, eps, momentum, centered", [
    (0.001, 0.9, 1e-7, 0.0, False),
    (0.01, 0.9, 1e-7, 0.0, False),
    (0.01, 0.95, 1e-4, 0.0, False),
    (0.01, 0.9, 1e-7, 0.9, False),
    (0.01, 0.9, 1e-7, 0.0, True),
    (0.001, 0.8, 1e-6, 0.5, True),
])
def test_rmsprop_update_matches_reference(lr, rho, eps, momentum, centered):
    rng, w = _opt_start()
    v, mom, avg = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    w_ref, v_ref, mom_ref, avg_ref = (a.astype(np.float64) for a in (w, v, mom, avg))
    rates, step = _rates(lr)
    for k in range(STEPS):
        g = normal(rng, w.shape)
        step[0] = k
        ops.rmsprop_update(w, g, v, mom, avg, rates, step, rho, eps, momentum, centered)
        w_ref, v_ref, mom_ref, avg_ref = ref.rmsprop_update(w_ref, g, v_ref, mom_ref, avg_ref, float(rates[k]), rho,
                                                             eps, momentum, centered)
        for got, want in ((w, w_ref), (v, v_ref), (mom, mom_ref), (avg, avg_ref)):
            _assert_state(got, want)


def test_rmsprop_epsilon_inside_the_root_in_the_engine():
    # gradients of 1e-4 make g² comparable to epsilon: a sqrt(v) + eps placement would step ~10x further
    w, g = np.ones(3, F32), np.full(3, 1e-4, F32)
    v = np.zeros(3, F32)
    ops.rmsprop_update(w, g, v, None, None, np.array([0.01], F32), np.zeros(1, np.int32), 0.9, 1e-7, 0.0, False)
    inside = 1 - 0.01 * 1e-4 / np.sqrt(0.1 * 1e-8 + 1e-7)
    np.testing.assert_allclose(w, inside, rtol=1e-6)


@pytest.mark.parametrize("lr, wd", [(0.001, 0.004), (0.1, 0.5), (0.01, 0.0)])
def test_weight_decay_matches_reference(lr, wd):
    """Each step's factor from its table row (a different rate per step)."""
    rng, w = _opt_start()
    w_ref = w.astype(np.float64)
    rates, step = _rates(lr)
    factors = np.array([ops.weight_decay_factor(r, wd) for r in rates], np.float32)
    for k in range(STEPS):
        step[0] = k
        assert ops.weight_decay(w, factors, step) is None  # in place
        w_ref = ref.weight_decay(w_ref, float(rates[k]), wd)
        _assert_state(w, w_ref)


@pytest.mark.parametrize("lr, b1, b2, eps", [(0.001, 0.9, 0.999, 1e-7), (0.01, 0.8, 0.99, 1e-3)])
def test_adam_update_matches_reference(lr, b1, b2, eps):
    rng, w = _opt_start()
    m, v = np.zeros_like(w), np.zeros_like(w)
    w_ref, m_ref, v_ref = (a.astype(np.float64) for a in (w, m, v))
    alphas = np.array([ops.adam_step_size(lr, b1, b2, t) for t in range(1, STEPS + 1)], F32)
    step = np.zeros(1, np.int32)
    for t in range(1, STEPS + 1):
        g = normal(rng, w.shape)
        step[0] = t - 1  # the counter picks step t's size from the table
        ops.adam_update(w, g, m, v, alphas, step, b1, b2, eps)
        w_ref, m_ref, v_ref = ref.adam_update(w_ref, g, m_ref, v_ref, lr, b1, b2, eps, t)
        for got, want in ((w, w_ref), (m, m_ref), (v, v_ref)):
            _assert_state(got, want)
