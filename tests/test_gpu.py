"""The CUDA engine (gpucnn/engines/cuda_ops.py and kernels/*.cu) against the float64 oracle (tests/reference.py).

Marked ``gpu``, and skipped as a whole, with the backend's reason, where CuPy or a CUDA device is not usable.
Test plan rows 4-9 (the shape grid, pooling, ties and NaN, even kernels, big grids, non-contiguous inputs),
15 (determinism), 18 (launch errors) and 24 (out of memory), plus the engine's own promises: results stay
on the device, and with ``out=`` buffers and a reused ``ctx`` a training step allocates nothing and can
be captured in a CUDA graph.

Inputs are drawn in float64, rounded to float32 once, and the same values go to the kernels and the
oracle. Tolerances: rtol 1e-4 and atol 1e-4 · max|ref| (dW: 1e-3), pooling exact.
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
from gpucnn import backend

pytestmark = pytest.mark.gpu

_usable, _reason = backend.gpu_status()
if not _usable:
    pytest.skip(f"no usable GPU: {_reason}", allow_module_level=True)

import cupy  # noqa: E402

from gpucnn.engines import cuda_loader as cuda, numpy_ops as ops_numpy  # noqa: E402
from gpucnn.engines import cuda_ops as ops  # noqa: E402

RTOL, ATOL_SCALE = 1e-4, 1e-4


def dev(a):
    """A device copy of a host array (None stays None)."""
    return None if a is None else cupy.asarray(a)


def host(a):
    assert isinstance(a, cupy.ndarray), type(a)
    return cupy.asnumpy(a)


def assert_close(got, want, rtol=RTOL, atol_scale=ATOL_SCALE):
    """Device float32 ``got`` against the float64 oracle ``want``."""
    helpers.assert_close(host(got), want, rtol, atol_scale)


def assert_exact(got, want):
    """Equal after casting the oracle to float32 (NaNs in the same places)."""
    helpers.assert_exact(host(got), want)


# ===================================================================================== conv2d grid (row 4)
def _check_conv(n, c, hw, k, s, pad, f=4, bias=True, activation=None):
    x, wt, b, s, padding, rng = _conv_case(n, c, hw, k, s, pad, f, bias)
    xd, wd, bd = dev(x), dev(wt), dev(b)
    ctx = {}
    y = ops.conv2d_forward(xd, wd, bd, s, padding, activation, ctx)
    y_ref = ref.conv2d_forward(x, wt, b, s, padding, activation)
    assert y.shape == (n,) + expected_hw(pad, hw[0], hw[1], wt.shape[:2], s) + (f,)
    assert_close(y, y_ref)

    dy = normal(rng, y_ref.shape)
    dyd = dev(dy)
    assert_close(ops.conv2d_backward_data(dyd, wd, x.shape, s, padding, ctx),
                 ref.conv2d_backward_data(dy, wt, x.shape, s, padding))
    dw, db = ops.conv2d_backward_filter(dyd, xd, wt.shape, s, padding, ctx)
    dw_ref, db_ref = ref.conv2d_backward_filter(dy, x, wt.shape, s, padding)
    assert_close(dw, dw_ref, atol_scale=1e-3)
    assert_close(db, db_ref)
    dw2, db2 = ops.conv2d_backward_filter(dyd, xd, wt.shape, s, padding, None)  # without a ctx
    np.testing.assert_array_equal(host(dw2), host(dw))
    np.testing.assert_array_equal(host(db2), host(db))
    dx, dw3, db3 = ops.conv2d_backward(dyd, xd, wd, s, padding, ctx)  # both in one call (the layer's)
    np.testing.assert_array_equal(host(dx), host(ops.conv2d_backward_data(dyd, wd, x.shape, s, padding, ctx)))
    np.testing.assert_array_equal(host(dw3), host(dw))
    np.testing.assert_array_equal(host(db3), host(db))
    assert ops.conv2d_backward(dyd, xd, wd, s, padding, ctx, need_dx=False)[0] is None
    np.testing.assert_array_equal(host(xd), x)  # inputs not written to
    np.testing.assert_array_equal(host(wd), wt)
    np.testing.assert_array_equal(host(dyd), dy)


@pytest.mark.parametrize("n, c, hw, k, s, pad", CONV_GRID + EXTRA_CONV, ids=map(_conv_id, CONV_GRID + EXTRA_CONV))
def test_conv2d_matches_reference(n, c, hw, k, s, pad):
    _check_conv(n, c, hw, k, s, pad)


@pytest.mark.parametrize("n, c, hw, k, s, pad, f", [
    (2, 40, (9, 9), 5, 2, "same", 70),   # channels in two shared-memory chunks, filters in three tiles
    (1, 3, (30, 17), 3, 1, "same", 33),  # several output tiles per image, a partial filter tile
    (3, 16, (12, 12), 3, 1, "valid", 64),  # more than BWF_TILE_R im2col rows
    (2, 1, (11, 11), 11, 1, "valid", 2),   # one output pixel per image
])
def test_conv2d_tile_edges(n, c, hw, k, s, pad, f):
    _check_conv(n, c, hw, k, s, pad, f=f)


@pytest.mark.parametrize("f, bias", [(1, True), (16, False), (3, False)])
def test_conv2d_filters_and_no_bias(f, bias):
    _check_conv(2, 3, (7, 5), 3, 1, "same", f=f, bias=bias)
    _check_conv(2, 3, (5, 5), 2, 2, "same", f=f, bias=bias)


@pytest.mark.parametrize("activation", ["relu", "softmax"])
def test_conv2d_fused_activation(activation):
    x, wt, b, s, padding, _ = _conv_case(2, 3, (7, 5), 3, 1, "same", f=5)
    y = ops.conv2d_forward(dev(x), dev(wt), dev(b), s, padding, activation, {})
    y_ref = ref.conv2d_forward(x, wt, b, s, padding, activation)
    assert_close(y, y_ref)
    if activation == "relu":
        assert (y_ref == 0).any() and (y_ref > 0).any()


def test_conv2d_asymmetric_explicit_padding():
    rng = np.random.default_rng(11)
    x, wt, b = normal(rng, (2, 6, 5, 2)), normal(rng, (3, 2, 2, 3)), normal(rng, (3,))
    padding, s = (0, 2, 1, 0), (2, 1)
    y = ops.conv2d_forward(dev(x), dev(wt), dev(b), s, padding, None, {})
    assert_close(y, ref.conv2d_forward(x, wt, b, s, padding, None))
    dy = normal(rng, y.shape)
    assert_close(ops.conv2d_backward_data(dev(dy), dev(wt), x.shape, s, padding, {}),
                 ref.conv2d_backward_data(dy, wt, x.shape, s, padding))
    for got, want, atol in zip(ops.conv2d_backward_filter(dev(dy), dev(x), wt.shape, s, padding, {}),
                               ref.conv2d_backward_filter(dy, x, wt.shape, s, padding), (1e-3, ATOL_SCALE)):
        assert_close(got, want, atol_scale=atol)


# ===================================================================================== pooling (rows 5, 6)
def _check_maxpool(x, pool, stride, padding, dy_values=(-8, 9)):
    rng = np.random.default_rng(x.size)
    y, idx = ops.maxpool2d_forward(dev(x), pool, stride, padding)
    y_ref, idx_ref = ref.maxpool2d_forward(x, pool, stride, padding)
    assert_exact(y, y_ref)
    assert idx.dtype == np.int8
    np.testing.assert_array_equal(host(idx).astype(np.int64), idx_ref)
    dy = f32(rng.integers(*dy_values, size=y.shape))  # small integers: overlapping windows sum exactly
    dx = ops.maxpool2d_backward(dev(dy), idx, x.shape, pool, stride, padding)
    assert_exact(dx, ref.maxpool2d_backward(dy, idx_ref, x.shape, pool, stride, padding))
    return host(y), host(idx), host(dx), dy


@pytest.mark.parametrize("hw, p, s, pad", POOL_GRID, ids=map(_pool_id, POOL_GRID))
def test_maxpool2d_exact(hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng([hw[0], hw[1], pool[0], pool[1], stride[0], stride[1], pad == "same"])
    x = normal(rng, (2,) + hw + (3,))
    y, _, _, _ = _check_maxpool(x, pool, stride, padding)
    assert y.shape == (2,) + expected_hw(pad, hw[0], hw[1], pool, stride) + (3,)


@pytest.mark.parametrize("hw, p, s, pad", POOL_GRID, ids=map(_pool_id, POOL_GRID))
def test_avgpool2d_exact(hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng([hw[0], hw[1], pool[0], pool[1], stride[0], stride[1], pad == "same", 1])
    # integer inputs: window sums are exact in float32, and one rounded division matches the oracle's
    x = f32(rng.integers(-50, 51, size=(2,) + hw + (3,)))
    y = ops.avgpool2d_forward(dev(x), pool, stride, padding)
    assert y.shape == (2,) + expected_hw(pad, hw[0], hw[1], pool, stride) + (3,)
    assert_exact(y, ref.avgpool2d_forward(x, pool, stride, padding))
    # dy a multiple of 2520 (divisible by every window count up to 10): every share is an integer
    dy = f32(2520 * rng.integers(-4, 5, size=y.shape))
    assert_exact(ops.avgpool2d_backward(dev(dy), x.shape, pool, stride, padding),
                 ref.avgpool2d_backward(dy, x.shape, pool, stride, padding))
    xf, dyf = normal(rng, x.shape), normal(rng, y.shape)
    assert_close(ops.avgpool2d_forward(dev(xf), pool, stride, padding),
                 ref.avgpool2d_forward(xf, pool, stride, padding), rtol=1e-6, atol_scale=1e-6)
    assert_close(ops.avgpool2d_backward(dev(dyf), x.shape, pool, stride, padding),
                 ref.avgpool2d_backward(dyf, x.shape, pool, stride, padding), rtol=1e-6, atol_scale=1e-6)


@pytest.mark.parametrize("hw, p, s, pad", POOL_GRID[::4], ids=map(_pool_id, POOL_GRID[::4]))
def test_pooling_agrees_with_the_numpy_engine_bit_for_bit(hw, p, s, pad):
    # both engines add in the same order: general floats give the same bits
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng(40)
    x = normal(rng, (3,) + hw + (2,))
    y_np, idx_np = ops_numpy.maxpool2d_forward(x, pool, stride, padding)
    y, idx = ops.maxpool2d_forward(dev(x), pool, stride, padding)
    np.testing.assert_array_equal(host(y), y_np)
    np.testing.assert_array_equal(host(idx), idx_np)
    dy = normal(rng, y_np.shape)
    np.testing.assert_array_equal(host(ops.maxpool2d_backward(dev(dy), idx, x.shape, pool, stride, padding)),
                                  ops_numpy.maxpool2d_backward(dy, idx_np, x.shape, pool, stride, padding))
    np.testing.assert_array_equal(host(ops.avgpool2d_forward(dev(x), pool, stride, padding)),
                                  ops_numpy.avgpool2d_forward(x, pool, stride, padding))
    np.testing.assert_array_equal(host(ops.avgpool2d_backward(dev(dy), x.shape, pool, stride, padding)),
                                  ops_numpy.avgpool2d_backward(dy, x.shape, pool, stride, padding))


@pytest.mark.parametrize("kind", ["constant", "duplicates"])
@pytest.mark.parametrize("hw, p, s, pad", [((5, 5), 2, 1, "same"), ((7, 5), 3, 2, "same"), ((11, 11), 3, 1, "valid"),
                                           ((5, 5), 3, 3, "same")])
def test_maxpool2d_ties_go_to_the_first_maximum(kind, hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    rng = np.random.default_rng(21)
    shape = (2,) + hw + (3,)
    x = np.full(shape, 1.5, F32) if kind == "constant" else f32(rng.integers(0, 3, size=shape))
    _, idx, dx, dy = _check_maxpool(x, pool, stride, padding, dy_values=(1, 9))
    assert dx.sum() == dy.sum()  # every window's gradient lands on exactly one cell
    if kind == "constant" and pad == "valid":
        assert not idx.any()  # the first tap of every window


@pytest.mark.parametrize("hw, p, s, pad", [((5, 5), 2, 2, "same"), ((7, 5), 3, 1, "same"), ((5, 5), 3, 2, "valid")])
def test_maxpool2d_nan_propagates_and_takes_the_gradient(hw, p, s, pad):
    pool, stride, padding = _pool_args(hw, p, s, pad)
    x = normal(np.random.default_rng(22), (2,) + hw + (2,))
    x[0, 1, 1, 0] = np.nan
    x[0, 1, 2, 0] = np.nan  # two NaNs that share windows: the first in scan order wins
    x[0, 2, 1, 0] = 1e30    # a large value next to them must not win
    x[1, hw[0] - 1, hw[1] - 1, 1] = np.nan  # in the bottom-right corner (next to "same" padding)
    y, _, _, _ = _check_maxpool(x, pool, stride, padding, dy_values=(1, 9))
    assert np.isnan(y).any()


@pytest.mark.parametrize("stride", [(2, 2), (1, 1)])
def test_maxpool2d_backward_non_finite_gradient_stays_on_the_max(stride):
    # a gather adds dy only where idx points: an inf/NaN dy reaches the max cell and no other
    x = f32(np.random.default_rng(32).permutation(16).reshape(1, 4, 4, 1))
    y, idx = ops.maxpool2d_forward(dev(x), (2, 2), stride, VALID)
    dy = np.ones(y.shape, F32)
    dy[0, 0, 0, 0], dy[0, -1, -1, 0] = np.inf, np.nan
    dx = ops.maxpool2d_backward(dev(dy), idx, x.shape, (2, 2), stride, VALID)
    assert_exact(dx, ref.maxpool2d_backward(dy, host(idx), x.shape, (2, 2), stride, VALID))


def test_global_avgpool2d_matches_reference():
    rng = np.random.default_rng(23)
    for shape in [(1, 5, 5, 1), (7, 7, 5, 3), (2, 28, 28, 8), (3, 4, 4, 300)]:
        x = normal(rng, shape)
        y = ops.global_avgpool2d_forward(dev(x))
        assert_close(y, ref.global_avgpool2d_forward(x), rtol=1e-5, atol_scale=1e-5)
        dy = normal(rng, y.shape)
        assert_close(ops.global_avgpool2d_backward(dev(dy), shape), ref.global_avgpool2d_backward(dy, shape),
                     rtol=1e-6, atol_scale=1e-7)


def test_second_backward_call_gives_the_same_result():
    rng = np.random.default_rng(24)
    x = f32(rng.permutation(2 * 7 * 5 * 3).reshape(2, 7, 5, 3))
    pool, stride, padding = (3, 3), (2, 2), padding_for("same", 7, 5, (3, 3), (2, 2))
    y, idx = ops.maxpool2d_forward(dev(x), pool, stride, padding)
    idx_saved, dy = host(idx), dev(normal(rng, y.shape))
    dx1 = host(ops.maxpool2d_backward(dy, idx, x.shape, pool, stride, padding))
    dx2 = host(ops.maxpool2d_backward(dy, idx, x.shape, pool, stride, padding))
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(host(idx), idx_saved)


# ===================================================================================== big grids (row 8)
def test_batch_times_channels_beyond_the_grid_limits():
    # 70,000 images: more than the 65,535 blocks grid y and z allow
    rng = np.random.default_rng(33)
    n = 70_000
    x = normal(rng, (n, 3, 3, 1))
    wt, b = normal(rng, (2, 2, 1, 2)), normal(rng, (2,))
    y = ops.conv2d_forward(dev(x), dev(wt), dev(b), (1, 1), VALID, "relu", {})
    y_ref = ref.conv2d_forward(x, wt, b, (1, 1), VALID, "relu")
    assert_close(y, y_ref)
    dy = normal(rng, y.shape)
    assert_close(ops.conv2d_backward_data(dev(dy), dev(wt), x.shape, (1, 1), VALID, {}),
                 ref.conv2d_backward_data(dy, wt, x.shape, (1, 1), VALID))
    dw, db = ops.conv2d_backward_filter(dev(dy), dev(x), wt.shape, (1, 1), VALID, {})
    dw_ref, db_ref = ref.conv2d_backward_filter(dy, x, wt.shape, (1, 1), VALID)
    assert_close(dw, dw_ref, atol_scale=1e-3)
    assert_close(db, db_ref)

    xp = f32(rng.integers(-50, 51, size=(n, 2, 2, 1)))
    _check_maxpool(xp, (2, 2), (2, 2), VALID)
    assert_exact(ops.avgpool2d_forward(dev(xp), (2, 2), (1, 1), VALID),
                 ref.avgpool2d_forward(xp, (2, 2), (1, 1), VALID))
    dyp = f32(4 * rng.integers(-4, 5, size=(n, 1, 1, 1)))
    assert_exact(ops.avgpool2d_backward(dev(dyp), xp.shape, (2, 2), (1, 1), VALID),
                 ref.avgpool2d_backward(dyp, xp.shape, (2, 2), (1, 1), VALID))

    # batch x channels = 70,400 for the global pool; many rows for dense and the row kernels
    xg = normal(rng, (1100, 2, 2, 64))
    assert_close(ops.global_avgpool2d_forward(dev(xg)), ref.global_avgpool2d_forward(xg))
    dyg = normal(rng, (1100, 64))
    assert_close(ops.global_avgpool2d_backward(dev(dyg), xg.shape), ref.global_avgpool2d_backward(dyg, xg.shape))
    xd, wd = normal(rng, (n, 3)), normal(rng, (3, 2))
    assert_close(ops.dense_forward(dev(xd), dev(wd), None, "softmax"), ref.dense_forward(xd, wd, None, "softmax"))


def test_dense_column_tiles_beyond_the_grid_y_limit():
    # dense_backward_data's columns are the layer's inputs: a Dense after a large Flatten has more than
    # 65,535 column tiles (2,097,120 inputs), so the grid's y is capped and the kernels loop over the rest.
    # Checked with small grids (1 and 2 column blocks for 5 column tiles) against the full one.
    assert ops._gemm_grid(70, 3 * 2**21) == (3, 65535)
    rng = np.random.default_rng(38)
    n, n_in, units = 37, 150, 70
    x, w, b = normal(rng, (n, n_in)), normal(rng, (n_in, units)), normal(rng, (units,))
    dy = normal(rng, (n, units))
    cases = [("dense_forward", (dev(x), dev(w), dev(b)), (n, units), (n, n_in, units, ops._fused("relu")),
              ref.dense_forward(x, w, b, "relu")),
             ("dense_backward_data", (dev(dy), dev(w)), (n, n_in), (n, n_in, units), ref.dense_backward_data(dy, w)),
             ("dense_backward_weights", (dev(dy), dev(x)), (n_in, units), (n, n_in, units),
              ref.dense_backward_weights(dy, x)[0])]
    for name, arrays, shape, sizes, want in cases:
        full = ops._gemm_grid(shape[0], shape[1])
        results = []
        for grid_y in (full[1], 1, 2):
            out = cupy.full(shape, SENTINEL, F32)
            cuda.launch(name, (full[0], grid_y), ops._GEMM_BLOCK, arrays + (out,) + sizes)
            results.append(host(out))
        helpers.assert_close(results[0], want, RTOL, ATOL_SCALE)
        for got in results[1:]:
            np.testing.assert_array_equal(got, results[0], err_msg=name)


# ===================================================================================== non-contiguous (row 9)
def _layouts(a):
    """The same values as device array ``a`` in other memory layouts."""
    big = cupy.zeros(tuple(2 * d + 1 for d in a.shape), a.dtype)
    sl = tuple(slice(1, 2 * d + 1, 2) for d in a.shape)
    big[sl] = a
    rev = tuple(range(a.ndim))[::-1]
    views = {"slice": big[sl], "transpose": cupy.ascontiguousarray(a.transpose(rev)).transpose(rev),
             "fortran": cupy.asfortranarray(a),
             "reversed": a[(slice(None, None, -1),) * a.ndim].copy()[(slice(None, None, -1),) * a.ndim]}
    for name, v in views.items():
        np.testing.assert_array_equal(host(v), host(a))
        assert a.ndim < 2 or not v.flags.c_contiguous, name
    return views


@pytest.mark.parametrize("layout", ["slice", "transpose", "fortran", "reversed"])
def test_non_contiguous_inputs_give_the_contiguous_result(layout):
    rng = np.random.default_rng(25)
    x, wt, b = dev(normal(rng, (2, 7, 5, 3))), dev(normal(rng, (3, 2, 3, 4))), dev(normal(rng, (4,)))
    v = lambda a: _layouts(a)[layout]  # noqa: E731
    padding = padding_for("same", 7, 5, (3, 2), (1, 2))
    same = np.testing.assert_array_equal  # the same kernels on the same values: the same bits
    y = ops.conv2d_forward(x, wt, b, (1, 2), padding, "relu", {})
    same(host(ops.conv2d_forward(v(x), v(wt), v(b), (1, 2), padding, "relu", {})), host(y))
    dy = dev(normal(rng, y.shape))
    same(host(ops.conv2d_backward_data(v(dy), v(wt), x.shape, (1, 2), padding, {})),
         host(ops.conv2d_backward_data(dy, wt, x.shape, (1, 2), padding, {})))
    for got, want in zip(ops.conv2d_backward_filter(v(dy), v(x), wt.shape, (1, 2), padding, None),
                         ops.conv2d_backward_filter(dy, x, wt.shape, (1, 2), padding, None)):
        same(host(got), host(want))
    yp, idx = ops.maxpool2d_forward(x, (3, 3), (2, 2), padding)
    ypv, idxv = ops.maxpool2d_forward(v(x), (3, 3), (2, 2), padding)
    same(host(ypv), host(yp))
    same(host(idxv), host(idx))
    dyp = dev(normal(rng, yp.shape))
    same(host(ops.maxpool2d_backward(v(dyp), v(idx), x.shape, (3, 3), (2, 2), padding)),
         host(ops.maxpool2d_backward(dyp, idx, x.shape, (3, 3), (2, 2), padding)))
    same(host(ops.avgpool2d_forward(v(x), (3, 3), (2, 2), padding)),
         host(ops.avgpool2d_forward(x, (3, 3), (2, 2), padding)))
    same(host(ops.avgpool2d_backward(v(dyp), x.shape, (3, 3), (2, 2), padding)),
         host(ops.avgpool2d_backward(dyp, x.shape, (3, 3), (2, 2), padding)))
    same(host(ops.global_avgpool2d_forward(v(x))), host(ops.global_avgpool2d_forward(x)))

    xd, wd, bd = dev(normal(rng, (5, 6))), dev(normal(rng, (6, 4))), dev(normal(rng, (4,)))
    for act in (None, "relu", "softmax"):
        y = ops.dense_forward(xd, wd, bd, act)
        same(host(ops.dense_forward(v(xd), v(wd), v(bd), act)), host(y))
        dy = dev(normal(rng, y.shape))
        same(host(ops.activation_backward(v(dy), v(y), act)), host(ops.activation_backward(dy, y, act)))
    dyd = dev(normal(rng, (5, 4)))
    same(host(ops.dense_backward_data(v(dyd), v(wd))), host(ops.dense_backward_data(dyd, wd)))
    for got, want in zip(ops.dense_backward_weights(v(dyd), v(xd)), ops.dense_backward_weights(dyd, xd)):
        same(host(got), host(want))
    p = ops.activation_forward(dev(normal(rng, (6, 5))), "softmax")
    labels = dev(np.eye(5, dtype=F32)[[0, 1, 2, 3, 4, 0]])
    same(host(ops.crossentropy_forward(v(p), v(labels), False)), host(ops.crossentropy_forward(p, labels, False)))


# ===================================================================================== activations, dense
def _away_from_zero(a, gap=1e-2):
    return f32(np.sign(a) * (np.abs(a) + 2 * gap))


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("shape", [(1, 10), (7, 3), (2, 5, 5, 8)])
def test_activations_match_reference(activation, shape):
    rng = np.random.default_rng(26)
    x = _away_from_zero(rng.normal(size=shape) * 3)
    y = ops.activation_forward(dev(x), activation)
    y_ref = ref.activation_forward(x, activation)
    assert_close(y, y_ref, rtol=1e-5, atol_scale=1e-6)
    dy = normal(rng, shape)
    assert_close(ops.activation_backward(dev(dy), y, activation), ref.activation_backward(dy, host(y), activation),
                 rtol=1e-5, atol_scale=1e-6)


def test_activations_in_place_and_nan():
    x = dev(f32([[1.0, -2.0, np.nan, 0.5]]))
    assert ops.activation_forward(x, "relu", out=x) is x
    np.testing.assert_array_equal(host(x), f32([[1.0, 0.0, np.nan, 0.5]]))  # relu keeps a NaN, as NumPy
    s = dev(f32([[1.0, 2.0, 3.0], [1.0, np.nan, 0.0]]))
    ops.activation_forward(s, "softmax", out=s)
    assert_close(s[:1], ref.activation_forward(f32([[1.0, 2.0, 3.0]]), "softmax"))
    assert np.isnan(host(s[1])).all()
    with pytest.raises(ValueError, match="mish.*known: relu, softmax, sigmoid, tanh"):
        ops.activation_forward(x, "mish")


@pytest.mark.parametrize("activation", [None, "relu", "softmax"])
@pytest.mark.parametrize("n, n_in, units, bias", [(1, 5, 3, True), (2, 12, 10, False), (7, 64, 10, True),
                                                  (7, 576, 64, True), (65, 33, 70, True)])
def test_dense_matches_reference(n, n_in, units, bias, activation):
    rng = np.random.default_rng([n, n_in, units, bias])
    x, w = normal(rng, (n, n_in)), normal(rng, (n_in, units), 1 / np.sqrt(n_in))
    b = normal(rng, (units,)) if bias else None
    y = ops.dense_forward(dev(x), dev(w), dev(b), activation)
    assert_close(y, ref.dense_forward(x, w, b, activation))
    dy = normal(rng, y.shape)
    assert_close(ops.activation_backward(dev(dy), y, activation), ref.activation_backward(dy, host(y), activation),
                 atol_scale=1e-5)
    dz = f32(ref.activation_backward(dy, host(y), activation))
    assert_close(ops.dense_backward_data(dev(dz), dev(w)), ref.dense_backward_data(dz, w))
    dw, db = ops.dense_backward_weights(dev(dz), dev(x))
    dw_ref, db_ref = ref.dense_backward_weights(dz, x)
    assert_close(dw, dw_ref, atol_scale=1e-3)
    assert_close(db, db_ref)


# ===================================================================================== merging
@pytest.mark.parametrize("case", helpers.CONCAT_GRID, ids=helpers.concat_id)
def test_add_concat_and_split_match_reference(case):
    shapes, axis = case
    rng = np.random.default_rng(len(shapes) + axis)
    xs = [normal(rng, s) for s in shapes]
    b = xs[0][::-1].copy()
    assert_exact(ops.add(dev(xs[0]), dev(b)), ref.add(xs[0], b))
    a = dev(xs[0])
    assert ops.add(a, dev(b), out=a) is a  # in place, as Add sums its inputs
    assert_exact(a, ref.add(xs[0], b))
    y = ops.concat([dev(x) for x in xs], axis)
    assert_exact(y, ref.concat(xs, axis))
    dy = normal(rng, y.shape)
    sizes = [sh[axis] for sh in shapes]
    for got, want in zip(ops.split(dev(dy), sizes, axis), ref.split(dy, sizes, axis)):
        assert_exact(got, want)
    with pytest.raises(ValueError, match="do not join"):
        ops.concat([dev(xs[0]), dev(normal(rng, (1, 2)))], axis)
    with pytest.raises(ValueError, match="do not add up"):
        ops.split(dev(dy), [1], axis)


# ===================================================================================== dropout
def seed_table(*seeds):
    """A one-row seed table (one slot per seed) and a step counter at row 0, as an eager step has them."""
    return dev(np.array([seeds], np.uint64)), dev(np.zeros(1, np.int32))


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8])
def test_dropout_mask(rate):
    rng = np.random.default_rng(27)
    x = dev(normal(rng, (100, 40, 50)))
    y, mask = ops.dropout_forward(x, rate, *seed_table(1234), 0)
    assert y.shape == mask.shape == x.shape and mask.dtype == F32
    m = host(mask)
    kept = m != 0
    np.testing.assert_array_equal(m[kept], F32(1) / F32(1 - rate))
    assert abs(kept.mean() - (1 - rate)) < 0.005  # 200,000 draws: the standard error is < 0.0012
    np.testing.assert_array_equal(host(y), host(x) * m)
    y2, mask2 = ops.dropout_forward(x, rate, *seed_table(1235, 1234), 1)  # the same seed: the same bits
    np.testing.assert_array_equal(host(mask2), m)
    np.testing.assert_array_equal(host(y2), host(y))
    _, mask3 = ops.dropout_forward(x, rate, *seed_table(1235), 0)
    assert (host(mask3) != m).any()
    dy = normal(rng, x.shape)
    assert_exact(ops.dropout_backward(dev(dy), mask), ref.dropout_backward(dy, m))


@pytest.mark.parametrize("first", [0, 1, 3, 7])
def test_dropout_of_a_part_of_a_batch_is_that_part_of_the_batchs_mask(first):
    x = dev(normal(np.random.default_rng(29), (8, 5, 3)))
    _, whole = ops.dropout_forward(x, 0.5, *seed_table(99), 0)
    _, tail = ops.dropout_forward(x[first:], 0.5, *seed_table(99), 0, offset=first)
    np.testing.assert_array_equal(host(tail), host(whole)[first:])
    _, head = ops.dropout_forward(x[:first], 0.5, *seed_table(99), 0)
    np.testing.assert_array_equal(host(head), host(whole)[:first])


def test_dropout_rate_zero_keeps_everything():
    x = dev(normal(np.random.default_rng(28), (4, 6)))
    y, mask = ops.dropout_forward(x, 0.0, *seed_table(7), 0)
    np.testing.assert_array_equal(host(mask), 1.0)
    np.testing.assert_array_equal(host(y), host(x))


# ===================================================================================== losses
def _labels(rng, n, k, sparse):
    ints = rng.integers(0, k, size=n)
    return ints if sparse else f32(np.eye(k)[ints])


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("n, k", [(1, 2), (7, 10), (64, 10), (300, 3)])
def test_crossentropy_matches_reference(n, k, sparse):
    rng = np.random.default_rng([n, k, sparse])
    labels = _labels(rng, n, k, sparse)
    p = f32(ref.activation_forward(rng.normal(size=(n, k)) * 2, "softmax"))
    loss = ops.crossentropy_forward(dev(p), dev(labels), sparse)
    assert loss.shape == (n,)
    assert_close(loss, ref.crossentropy_forward(p, labels, sparse))
    assert_close(ops.softmax_crossentropy_backward(dev(p), dev(labels), sparse),
                 ref.softmax_crossentropy_backward(p, labels, sparse), rtol=1e-6, atol_scale=1e-7)
    q = f32(rng.uniform(0.05, 1.0, size=(n, k)))  # not normalised, away from the clip
    assert_close(ops.crossentropy_forward(dev(q), dev(labels), sparse), ref.crossentropy_forward(q, labels, sparse))
    assert_close(ops.crossentropy_backward(dev(q), dev(labels), sparse), ref.crossentropy_backward(q, labels, sparse))


def test_crossentropy_clipping_and_label_dtypes():
    p = f32([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1e-12, 0.5, 0.5], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 0, 2])
    want = ref.crossentropy_forward(p, labels, True)
    for dtype in (np.int32, np.int64, np.uint8):
        got = ops.crossentropy_forward(dev(p), dev(labels.astype(dtype)), True)
        np.testing.assert_allclose(host(got), want, rtol=1e-5, atol=1e-6)
    onehot = np.eye(3)[labels]  # float64 one-hot rows, as to_categorical gives
    np.testing.assert_allclose(host(ops.crossentropy_forward(dev(p), dev(onehot), False)), want, rtol=1e-5, atol=1e-6)
    dp = host(ops.crossentropy_backward(dev(p), dev(labels), True))
    np.testing.assert_array_equal(dp[2], 0.0)  # the true class is clipped: no gradient
    np.testing.assert_allclose(dp[3], ref.crossentropy_backward(p, labels, True)[3], rtol=1e-5)
    assert np.isfinite(dp).all()


def test_out_of_range_sparse_label_gives_nan_for_its_row_only():
    p = dev(f32([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]))
    labels = dev(np.array([1, 2, -1], np.int32))
    loss = host(ops.crossentropy_forward(p, labels, True))
    assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()
    for grad in (ops.softmax_crossentropy_backward, ops.crossentropy_backward):
        g = host(grad(p, labels, True))
        assert np.isfinite(g[0]).all() and np.isnan(g[1:]).all()


def test_count_correct_is_a_device_integer():
    rng = np.random.default_rng(29)
    p = f32(rng.integers(0, 3, size=(50, 4)))  # many ties: the first maximum counts
    for sparse in (True, False):
        labels = _labels(rng, 50, 4, sparse)
        got = ops.count_correct(dev(p), dev(labels), sparse)
        assert isinstance(got, cupy.ndarray) and got.shape == () and got.dtype == np.int64
        assert int(got) == ref.count_correct(p, labels, sparse)
    q = dev(f32([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7], [0.1, np.nan, 0.7]]))  # a NaN wins, as numpy.argmax
    assert int(ops.count_correct(q, dev(np.array([1, 2, 1])), True)) == 2
    assert int(ops.count_correct(q, dev(np.array([0, 2, 2])), True)) == 2
    many = f32(rng.normal(size=(1000, 10)))
    labels = rng.integers(0, 10, size=1000)
    assert int(ops.count_correct(dev(many), dev(labels), True)) == ref.count_correct(many, labels, True)


# ===================================================================================== optimizers
STEPS = 5


def _assert_state(got, want):
    got = host(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def _rates(lr):
    """A table of a different rate per step (the updates must read their step's row)."""
    return np.array([lr * (1 + 0.25 * k) for k in range(STEPS)], F32)


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd_update_matches_reference(momentum, nesterov):
    rng = np.random.default_rng(30)
    w = dev(normal(rng, (1000,)))
    m = cupy.zeros_like(w)
    w_ref, m_ref = host(w).astype(np.float64), host(m).astype(np.float64)
    rates = _rates(0.01)
    for k in range(STEPS):
        g = normal(rng, w.shape)
        step = dev(np.array([k], np.int32))
        assert ops.sgd_update(w, dev(g), m, dev(rates), step, momentum, nesterov) is None  # in place
        w_ref, m_ref = ref.sgd_update(w_ref, g, m_ref, float(rates[k]), momentum, nesterov)
        _assert_state(w, w_ref)
        _assert_state(m, m_ref)


@pytest.mark.parametrize("lr, rho, eps, momentum, centered", [
    (0.001, 0.9, 1e-7, 0.0, False),
    (0.01, 0.95, 1e-4, 0.0, False),
    (0.01, 0.9, 1e-7, 0.9, False),
    (0.01, 0.9, 1e-7, 0.0, True),
    (0.001, 0.8, 1e-6, 0.5, True),
])
def test_rmsprop_update_matches_reference(lr, rho, eps, momentum, centered):
    rng = np.random.default_rng(31)
    w = dev(normal(rng, (1000,)))
    v, mom, avg = cupy.zeros_like(w), cupy.zeros_like(w), cupy.zeros_like(w)
    w_ref, v_ref, mom_ref, avg_ref = (host(a).astype(np.float64) for a in (w, v, mom, avg))
    rates = _rates(lr)
    for k in range(STEPS):
        g = normal(rng, w.shape)
        ops.rmsprop_update(w, dev(g), v, mom, avg, dev(rates), dev(np.array([k], np.int32)), rho, eps, momentum,
                           centered)
        w_ref, v_ref, mom_ref, avg_ref = ref.rmsprop_update(w_ref, g, v_ref, mom_ref, avg_ref, float(rates[k]), rho,
                                                             eps, momentum, centered)
        for got, want in ((w, w_ref), (v, v_ref), (mom, mom_ref), (avg, avg_ref)):
            _assert_state(got, want)


@pytest.mark.parametrize("lr, wd", [(0.001, 0.004), (0.1, 0.5)])
def test_weight_decay_matches_reference(lr, wd):
    rng = np.random.default_rng(33)
    w = dev(normal(rng, (1000,)))
    w_ref = host(w).astype(np.float64)
    rates = _rates(lr)
    factors = dev(np.array([ops.weight_decay_factor(r, wd) for r in rates], F32))
    for k in range(STEPS):
        assert ops.weight_decay(w, factors, dev(np.array([k], np.int32))) is None  # in place
        w_ref = ref.weight_decay(w_ref, float(rates[k]), wd)
        _assert_state(w, w_ref)


@pytest.mark.parametrize("lr, b1, b2, eps", [(0.001, 0.9, 0.999, 1e-7), (0.01, 0.8, 0.99, 1e-3)])
def test_adam_update_matches_reference(lr, b1, b2, eps):
    rng = np.random.default_rng(32)
    w = dev(normal(rng, (1000,)))
    m, v = cupy.zeros_like(w), cupy.zeros_like(w)
    w_ref, m_ref, v_ref = (host(a).astype(np.float64) for a in (w, m, v))
    alphas = dev(np.array([ops.adam_step_size(lr, b1, b2, t) for t in range(1, STEPS + 1)], F32))
    step = dev(np.array([0], np.int32))
    for t in range(1, STEPS + 1):
        g = normal(rng, w.shape)
        ops.adam_update(w, dev(g), m, v, alphas, step, b1, b2, eps)
        cuda.launch("step_advance", 1, 1, (step,))  # the counter picks the next step's size, as in a graph
        w_ref, m_ref, v_ref = ref.adam_update(w_ref, g, m_ref, v_ref, lr, b1, b2, eps, t)
        for got, want in ((w, w_ref), (m, m_ref), (v, v_ref)):
            _assert_state(got, want)
    assert host(step).tolist() == [STEPS]


def test_optimizer_state_must_be_contiguous():
    w = cupy.zeros((10, 4), F32)
    with pytest.raises(ValueError, match="C-contiguous"):
        ops.sgd_update(w.T, cupy.zeros((4, 10), F32), cupy.zeros((4, 10), F32), dev(np.array([0.1], F32)),
                       dev(np.zeros(1, np.int32)), 0.9, False)


# ===================================================================================== determinism (row 15)
def test_backward_passes_are_bitwise_reproducible():
    rng = np.random.default_rng(34)
    x, wt = dev(normal(rng, (64, 13, 13, 32))), dev(normal(rng, (3, 3, 32, 64)))
    dy = dev(normal(rng, (64, 11, 11, 64)))
    first = [host(a) for a in ops.conv2d_backward_filter(dy, x, wt.shape, (1, 1), VALID, {})]
    first.append(host(ops.conv2d_backward_data(dy, wt, x.shape, (1, 1), VALID)))
    for _ in range(3):
        again = [host(a) for a in ops.conv2d_backward_filter(dy, x, wt.shape, (1, 1), VALID, {})]
        again.append(host(ops.conv2d_backward_data(dy, wt, x.shape, (1, 1), VALID)))
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    xd, dyd = dev(normal(rng, (64, 576))), dev(normal(rng, (64, 64)))
    one = [host(a) for a in ops.dense_backward_weights(dyd, xd)]
    two = [host(a) for a in ops.dense_backward_weights(dyd, xd)]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


# ===================================================================================== no allocation, no sync
class _CountingAllocator:
    """Counts device allocations made through CuPy while installed; allocates with the allocator it replaced
    and puts that one back (not the default pool: under GPUCNN_NO_POOL=1 the run must stay without it)."""

    def __init__(self):
        self.previous, self.count = None, 0

    def __call__(self, size):
        self.count += 1
        return self.previous(size)

    def __enter__(self):
        self.previous = cupy.cuda.get_allocator()
        cupy.cuda.set_allocator(self)
        return self

    def __exit__(self, *exc):
        cupy.cuda.set_allocator(self.previous)


def _preallocated_step(bufs, ctx):
    """conv (relu) -> maxpool backward data path -> dense (softmax) -> loss gradient -> backward -> RMSprop,
    writing only into ``bufs`` (what a captured training step does)."""
    b = bufs
    ops.conv2d_forward(b["x"], b["w"], b["b"], (1, 1), VALID, "relu", ctx, out=b["y"])
    ops.avgpool2d_forward(b["y"], (2, 2), (2, 2), VALID, out=b["pooled"])
    ops.dense_forward(b["pooled"].reshape(b["pooled"].shape[0], -1), b["wd"], b["bd"], "softmax", out=b["p"])
    ops.softmax_crossentropy_backward(b["p"], b["labels"], True, out=b["dp"])
    ops.dense_backward_weights(b["dp"], b["pooled"].reshape(b["pooled"].shape[0], -1), out_w=b["dwd"], out_b=b["dbd"])
    ops.dense_backward_data(b["dp"], b["wd"], out=b["dpooled"].reshape(b["dpooled"].shape[0], -1))
    ops.avgpool2d_backward(b["dpooled"], b["y"].shape, (2, 2), (2, 2), VALID, out=b["dy"])
    ops.activation_backward(b["dy"], b["y"], "relu", out=b["dz"])
    ops.conv2d_backward_filter(b["dz"], b["x"], b["w"].shape, (1, 1), VALID, ctx, out_w=b["dw"], out_b=b["db"])
    ops.conv2d_backward_data(b["dz"], b["w"], b["x"].shape, (1, 1), VALID, ctx, out=b["dx"])
    ops.rmsprop_update(b["w"], b["dw"], b["v"], None, None, b["rates"], b["counter"], 0.9, 1e-7, 0.0, False)


def _step_buffers(rng):
    n = 8
    shapes = {"x": (n, 10, 10, 3), "w": (3, 3, 3, 8), "b": (8,), "y": (n, 8, 8, 8), "pooled": (n, 4, 4, 8),
              "wd": (128, 10), "bd": (10,), "p": (n, 10), "dp": (n, 10), "dwd": (128, 10), "dbd": (10,),
              "dpooled": (n, 4, 4, 8), "dy": (n, 8, 8, 8), "dz": (n, 8, 8, 8), "dw": (3, 3, 3, 8), "db": (8,),
              "dx": (n, 10, 10, 3), "v": (3, 3, 3, 8)}
    bufs = {k: dev(normal(rng, s, 0.3)) for k, s in shapes.items()}
    bufs["v"][...] = 0
    bufs["labels"] = dev(rng.integers(0, 10, size=n).astype(np.int32))
    bufs["rates"], bufs["counter"] = dev(np.array([0.001], F32)), dev(np.zeros(1, np.int32))
    return bufs


def test_a_step_with_out_buffers_and_ctx_allocates_nothing():
    bufs, ctx = _step_buffers(np.random.default_rng(35)), {}
    _preallocated_step(bufs, ctx)  # compiles the kernels, fills ctx
    cupy.cuda.Device().synchronize()
    with _CountingAllocator() as counter:
        _preallocated_step(bufs, ctx)
    assert counter.count == 0


def test_a_step_can_be_captured_in_a_cuda_graph():
    rng = np.random.default_rng(36)
    eager, captured = _step_buffers(rng), None
    captured = {k: v.copy() for k, v in eager.items()}
    ctx_eager, ctx_graph = {}, {}
    stream = cupy.cuda.Stream(non_blocking=True)
    # the buffers were filled on the default stream, which a non-blocking stream does not wait for
    cupy.cuda.Device().synchronize()
    with stream:
        _preallocated_step({k: v.copy() for k, v in eager.items()}, ctx_graph)  # warm up: compile, fill ctx
        stream.synchronize()
        stream.begin_capture()
        _preallocated_step(captured, ctx_graph)  # a host sync or an allocation here would fail the capture
        graph = stream.end_capture()
        for _ in range(2):
            graph.launch(stream)
        stream.synchronize()
    for _ in range(2):
        _preallocated_step(eager, ctx_eager)
    for k in ("w", "v", "dw", "dx", "p"):
        np.testing.assert_array_equal(host(captured[k]), host(eager[k]), err_msg=k)


# ===================================================================================== empty outputs (row 10)
def _empty(*shape, dtype=F32):
    return cupy.zeros(shape, dtype)


_W, _B, _V = cupy.ones((3, 3, 2, 4), F32), cupy.ones(4, F32), VALID
_EMPTY_OUTPUTS = {  # op -> call whose output has no elements, and that output's shape (or shapes)
    "relu": (lambda: ops.activation_forward(_empty(0, 5), "relu"), (0, 5)),
    "softmax, no columns": (lambda: ops.activation_forward(_empty(3, 0), "softmax"), (3, 0)),
    "relu backward": (lambda: ops.activation_backward(_empty(0, 5), _empty(0, 5), "relu"), (0, 5)),
    "softmax backward": (lambda: ops.activation_backward(_empty(0, 5), _empty(0, 5), "softmax"), (0, 5)),
    "conv, empty batch": (lambda: ops.conv2d_forward(_empty(0, 5, 5, 2), _W, _B, (1, 1), _V, "relu"), (0, 3, 3, 4)),
    "conv, no filters": (lambda: ops.conv2d_forward(_empty(1, 5, 5, 2), _empty(3, 3, 2, 0), None, (1, 1), _V,
                                                    None), (1, 3, 3, 0)),
    "conv backward data": (lambda: ops.conv2d_backward_data(_empty(0, 3, 3, 4), _W, (0, 5, 5, 2), (1, 1), _V),
                           (0, 5, 5, 2)),
    "conv backward filter, no filters": (
        lambda: ops.conv2d_backward_filter(_empty(1, 3, 3, 0), _empty(1, 5, 5, 2), (3, 3, 2, 0), (1, 1), _V),
        ((3, 3, 2, 0), (0,))),
    "max pool": (lambda: ops.maxpool2d_forward(_empty(0, 4, 4, 2), (2, 2), (2, 2), _V), ((0, 2, 2, 2),) * 2),
    "max pool, no channels": (lambda: ops.maxpool2d_forward(_empty(2, 4, 4, 0), (2, 2), (2, 2), _V),
                              ((2, 2, 2, 0),) * 2),
    "max pool backward": (lambda: ops.maxpool2d_backward(_empty(0, 2, 2, 2), _empty(0, 2, 2, 2, dtype=np.int8),
                                                         (0, 4, 4, 2), (2, 2), (2, 2), _V), (0, 4, 4, 2)),
    "average pool": (lambda: ops.avgpool2d_forward(_empty(0, 4, 4, 2), (2, 2), (2, 2), _V), (0, 2, 2, 2)),
    "average pool backward": (lambda: ops.avgpool2d_backward(_empty(0, 2, 2, 2), (0, 4, 4, 2), (2, 2), (2, 2), _V),
                              (0, 4, 4, 2)),
    "global average pool": (lambda: ops.global_avgpool2d_forward(_empty(0, 4, 4, 2)), (0, 2)),
    "global average pool backward": (lambda: ops.global_avgpool2d_backward(_empty(3, 0), (3, 4, 4, 0)),
                                     (3, 4, 4, 0)),
    "conv + pool, one convolution row": (  # 3x6 input, 3x3 kernel: a 1x4 convolution output pools to 0x2
        lambda: ops.conv2d_maxpool_forward(_empty(2, 3, 6, 2), _W, _B, (1, 1), _V, "relu"), ((2, 0, 2, 4),) * 2),
    "conv + pool, empty batch": (lambda: ops.conv2d_maxpool_forward(_empty(0, 6, 6, 2), _W, _B, (1, 1), _V, None),
                                 ((0, 2, 2, 4),) * 2),
    "dense": (lambda: ops.dense_forward(_empty(0, 6), cupy.ones((6, 3), F32), None, "relu"), (0, 3)),
    "dense, no units": (lambda: ops.dense_forward(_empty(2, 6), _empty(6, 0), None, None), (2, 0)),
    "dense backward data": (lambda: ops.dense_backward_data(_empty(0, 3), cupy.ones((6, 3), F32)), (0, 6)),
    "dense backward weights, no units": (lambda: ops.dense_backward_weights(_empty(2, 0), _empty(2, 6)),
                                         ((6, 0), (0,))),
    "dropout": (lambda: ops.dropout_forward(_empty(0, 4), 0.5, *seed_table(1), 0), ((0, 4),) * 2),
    "dropout backward": (lambda: ops.dropout_backward(_empty(0, 4), _empty(0, 4)), (0, 4)),
    "cross-entropy": (lambda: ops.crossentropy_forward(_empty(0, 3), _empty(0, dtype=np.int32), True), (0,)),
    "softmax cross-entropy backward": (
        lambda: ops.softmax_crossentropy_backward(_empty(0, 3), _empty(0, 3), False), (0, 3)),
    "cross-entropy backward": (lambda: ops.crossentropy_backward(_empty(0, 3), _empty(0, dtype=np.int32), True),
                               (0, 3)),
    "sgd": (lambda: ops.sgd_update(_empty(0), _empty(0), _empty(0), *_rate_table(), 0.9, True), None),
    "rmsprop": (lambda: ops.rmsprop_update(_empty(0), _empty(0), _empty(0), _empty(0), _empty(0), *_rate_table(),
                                           0.9, 1e-7, 0.5, True), None),
    "adam": (lambda: ops.adam_update(_empty(0), _empty(0), _empty(0), _empty(0), *_rate_table(), 0.9, 0.999, 1e-7),
             None),
    "weight decay": (lambda: ops.weight_decay(_empty(0), *_rate_table()), None),
    "add": (lambda: ops.add(_empty(0, 3), _empty(0, 3)), (0, 3)),
    "concat": (lambda: ops.concat([_empty(0, 2), _empty(0, 3)], 1), (0, 5)),
    "split": (lambda: ops.split(_empty(0, 5), [2, 3], 1), ((0, 2), (0, 3))),
    "sigmoid": (lambda: ops.activation_forward(_empty(0, 5), "sigmoid"), (0, 5)),
    "gelu backward": (lambda: ops.activation_backward(_empty(0, 5), None, "gelu", x=_empty(0, 5)), (0, 5)),
    "binary cross-entropy": (lambda: ops.binary_crossentropy_forward(_empty(0, 1), _empty(0, 1), False), (0,)),
    "binary cross-entropy backward": (
        lambda: ops.binary_crossentropy_backward(_empty(0, 1), _empty(0, 1), False), (0, 1)),
    "sigmoid binary cross-entropy backward": (
        lambda: ops.sigmoid_binary_crossentropy_backward(_empty(0, 1), _empty(0, 1)), (0, 1)),
    "global max pool backward": (lambda: ops.global_maxpool2d_backward(_empty(0, 2), _empty(0, 2, dtype=np.int32),
                                                                       (0, 4, 4, 2)), (0, 4, 4, 2)),
    "zero padding": (lambda: ops.zero_padding2d_forward(_empty(0, 4, 4, 2), (1, 1, 1, 1)), (0, 6, 6, 2)),
    "zero padding backward": (lambda: ops.zero_padding2d_backward(_empty(0, 6, 6, 2), (0, 4, 4, 2), (1, 1, 1, 1)),
                              (0, 4, 4, 2)),
    "batch normalization, inference": (
        lambda: ops.batchnorm_forward_inference(_empty(0, 3), None, None, _empty(3), cupy.ones(3, F32), 1e-3),
        ((0, 3), (3,))),
    "depthwise conv": (lambda: ops.depthwise_conv2d_forward(_empty(0, 5, 5, 2), cupy.ones((3, 3, 2, 1), F32), None,
                                                            (1, 1), _V, None), (0, 3, 3, 2)),
    "depthwise conv backward data": (
        lambda: ops.depthwise_conv2d_backward_data(_empty(0, 3, 3, 2), cupy.ones((3, 3, 2, 1), F32), (0, 5, 5, 2),
                                                   (1, 1), _V), (0, 5, 5, 2)),
    "rescale": (lambda: ops.rescale(_empty(0, 4, 4, 3), 1 / 255, 0.0), (0, 4, 4, 3)),
    "flip": (lambda: ops.flip(_empty(0, 4, 4, 3), _empty(0, dtype=bool), None), (0, 4, 4, 3)),
    "affine transform": (lambda: ops.affine_transform(_empty(0, 4, 4, 3), _empty(0, 8)), (0, 4, 4, 3)),
    "contrast": (lambda: ops.adjust_contrast(_empty(0, 4, 4, 3), _empty(0)), (0, 4, 4, 3)),
}


def _rate_table():
    return cupy.ones(1, F32), cupy.zeros(1, np.int32)


@pytest.mark.parametrize("op", list(_EMPTY_OUTPUTS))
def test_an_output_without_elements_launches_nothing(op, monkeypatch):
    """Every launcher returns an empty output without launching (its grid would have a zero-sized
    dimension, or a kernel would divide by a zero tile count)."""
    launched, launch = [], cuda.launch
    monkeypatch.setattr(cuda, "launch", lambda name, *args, **kwargs: (launched.append(name),
                                                                       launch(name, *args, **kwargs)))
    run, shape = _EMPTY_OUTPUTS[op]
    result = run()
    assert launched == [], op
    shapes = None if result is None else (result.shape if isinstance(result, cupy.ndarray)
                                          else tuple(r.shape for r in result))
    assert shapes == shape


def test_empty_inputs_of_non_empty_outputs_still_write_them():
    """Outputs with elements are written even when there is nothing to sum: zero gradients for an empty
    batch, and the bias gradient of a convolution without input channels."""
    rng = np.random.default_rng(41)
    dy = normal(rng, (2, 3, 3, 4))
    dw, db = ops.conv2d_backward_filter(dev(dy), _empty(2, 5, 5, 0), (3, 3, 0, 4), (1, 1), VALID)
    assert dw.shape == (3, 3, 0, 4)
    assert_close(db, dy.sum(axis=(0, 1, 2), dtype=np.float64))
    dw, db = ops.conv2d_backward_filter(_empty(0, 3, 3, 4), _empty(0, 5, 5, 2), (3, 3, 2, 4), (1, 1), VALID)
    assert not host(dw).any() and not host(db).any()
    dw, db = ops.dense_backward_weights(_empty(0, 3), _empty(0, 6))
    assert dw.shape == (6, 3) and not host(dw).any() and not host(db).any()
    assert int(ops.count_correct(_empty(0, 3), _empty(0, dtype=np.int32), True)) == 0
    assert int(ops.count_binary_correct(_empty(0, 1), _empty(0, 1))) == 0


@pytest.mark.parametrize("pp, pq", [(0, 2), (2, 0)])
def test_the_fused_kernel_launched_without_pooled_output_writes_nothing(pp, pq):
    """kernels/conv_pool.cu launched directly with no pooled rows or columns (its launcher launches nothing
    then): every block leaves at once, with no division by the zero tile count."""
    f, tpq, fused = 32, ops._FUSED["FUSED_TILE_PQ"], ops._FUSED
    x, w = cupy.ones((1, 6, 6, 2), F32), cupy.ones((3, 3, 2, f), F32)
    y, idx = cupy.full((1, 2, 2, f), SENTINEL, F32), cupy.full((1, 2, 2, f), -1, np.int8)
    patch = ((2 * fused["FUSED_TILE_PP"] - 1) + 3) * ((2 * tpq - 1) + 3) * 4
    cuda.launch("conv2d_relu_maxpool_forward", (1, 1), (fused["FUSED_TILE_F"], tpq),
                (x, w, None, y, idx, 1, 6, 6, 2, 3, 3, f, pp, pq, 1, 1, 0, 0, 1, 2), shared_mem=patch * 2)
    assert (host(y) == SENTINEL).all() and (host(idx) == -1).all()


# ===================================================================================== launch errors (row 18)
def test_bad_launch_configuration_names_the_kernel():
    x = cupy.zeros(4, F32)
    with pytest.raises(cuda.KernelLaunchError, match="relu_forward.*block"):
        cuda.launch("relu_forward", 1, 2048, (x, x, 4))  # more threads than a block can have
    with pytest.raises(cuda.KernelLaunchError, match="relu_forward"):
        cuda.launch("relu_forward", (1, 70_000), 256, (x, x, 4))  # grid y over 65,535
    with pytest.raises(cuda.KernelLaunchError, match="conv2d_forward"):  # refused by the driver
        xd, wd = cupy.zeros((1, 4, 4, 1), F32), cupy.zeros((3, 3, 1, 1), F32)
        y = cupy.zeros((1, 2, 2, 1), F32)
        cuda.launch("conv2d_forward", (1, 1), (32, 8),
                    (xd, wd, None, y, 1, 4, 4, 1, 3, 3, 1, 2, 2, 1, 1, 0, 0, 0, 1), shared_mem=1 << 30)
    assert issubclass(cuda.KernelLaunchError, RuntimeError)


def test_bad_arguments_name_the_kernel_and_the_argument():
    x, xi = cupy.zeros(4, F32), cupy.zeros(4, np.int32)
    with pytest.raises(TypeError, match="relu_forward.*x.*float32"):
        cuda.launch("relu_forward", 1, 256, (xi, x, 4))
    with pytest.raises(ValueError, match="relu_forward.*C-contiguous"):
        cuda.launch("relu_forward", 1, 256, (cupy.zeros(8, F32)[::2], x, 4))
    with pytest.raises(TypeError, match="relu_forward.*3 arguments"):
        cuda.launch("relu_forward", 1, 256, (x, x))
    with pytest.raises(TypeError, match="relu_forward.*None"):
        cuda.launch("relu_forward", 1, 256, (None, x, 4))
    with pytest.raises(ValueError, match="conv2d_backward_data.*N"):
        cuda.launch("conv2d_backward_data", 1, 256, (x, x, x) + (2**31,) + (1,) * 12)
    with pytest.raises(TypeError, match="numpy"):
        ops.activation_forward(np.zeros(4, F32), "relu")  # a host array is not moved silently
    with pytest.raises(KeyError, match="no kernel"):
        cuda.launch("conv3d_forward", 1, 1, ())


# ===================================================================================== out of memory (row 24)
def test_out_of_memory_gives_a_clear_error_and_later_work_succeeds():
    dy = cupy.ones((2**20, 1), F32)
    huge = (2**20, 2**10, 2**10, 1)  # 4 TiB of float32
    with pytest.raises(cuda.DeviceOutOfMemoryError, match="batch_size") as info:
        ops.global_avgpool2d_backward(dy, huge)
    assert isinstance(info.value, MemoryError)
    assert "MiB" in str(info.value)
    x = dev(normal(np.random.default_rng(37), (2, 5, 5, 3)))
    assert_close(ops.global_avgpool2d_forward(x), ref.global_avgpool2d_forward(host(x)))


def test_out_of_memory_without_the_memory_pool_is_reported_the_same_way():
    # GPUCNN_NO_POOL=1 (tests/conftest.py, the sanitizer runs) allocates with cudaMalloc directly, whose
    # failure CuPy raises as CUDARuntimeError cudaErrorMemoryAllocation, not OutOfMemoryError
    previous = cupy.cuda.get_allocator()
    cupy.cuda.set_allocator(None)
    try:
        with pytest.raises(cuda.DeviceOutOfMemoryError, match="batch_size"):
            cuda.empty((2**20, 2**10, 2**10), F32)  # 4 TiB
    finally:
        cupy.cuda.set_allocator(previous)
    assert int(cuda.empty((3,), F32).size) == 3


# ===================================================================================== fast-path kernels
# kernels/conv_pool.cu and kernels/train_step.cu, launched one by one exactly as gpucnn/models/fastpath.py launches
# them inside its captured step (same grids, blocks, shared memory and arguments), against the oracle.
# Outputs start filled with a sentinel, so an element a kernel should not write stays visible.
_TRAIN = cuda.kernel_constants("train_step.cu")
SENTINEL = -7.25


def _cdiv(a, b):
    return -(-a // b)


def _conv_relu_maxpool(xd, wd, bd, stride, pads, activation, n, h, wdt, c, kh, kw, f, pp, pq):
    """ops.conv2d_maxpool_forward (kernels/conv_pool.cu) into outputs that start as a sentinel → (y, idx)."""
    y = cupy.full((n, pp, pq, f), SENTINEL, F32)
    idx = cupy.full((n, pp, pq, f), -1, np.int8)
    ops.conv2d_maxpool_forward(xd, wd, bd, stride, pads, activation, ctx={}, out=y, out_idx=idx)
    return y, idx


def _conv_pool_case(n, c, hw, k, s, pad, f, activation, bias):
    k = (k, k) if isinstance(k, int) else k
    s = (s, s) if isinstance(s, int) else s
    x, wt, b, s, pads, rng = _conv_case(n, c, hw, k, s, pad, f, bias)
    z = ref.conv2d_forward(x, wt, b, s, pads, activation)
    _, p, q, _ = z.shape
    return x, wt, b, s, pads, z, p // 2, q // 2, rng


@pytest.mark.parametrize("case", CONV_POOL_GRID, ids=conv_pool_id)
def test_conv2d_relu_maxpool_forward_matches_reference(case):
    x, wt, b, s, pads, z, pp, pq, _ = _conv_pool_case(*case)
    n, h, wdt, c = x.shape
    kh, kw, _, f = wt.shape
    y, idx = _conv_relu_maxpool(dev(x), dev(wt), dev(b), s, pads, case[7], n, h, wdt, c, kh, kw, f, pp, pq)
    zc = z[:, :2 * pp, :2 * pq]  # the rows and columns some 2x2 window reads
    y_ref, idx_ref = ref.maxpool2d_forward(zc, (2, 2), (2, 2), VALID)
    assert_close(y, y_ref)
    got = host(idx).astype(np.int64)
    assert got.dtype == np.int64 and ((got >= 0) & (got < 4)).all()
    # the tap the kernel chose holds the window's maximum (up to float32 rounding); where the oracle's
    # maximum is clear of the runner-up, it is the oracle's tap
    windows = window_taps(zc, pp, pq)
    chosen = np.take_along_axis(windows, got[..., None], axis=-1)[..., 0]
    atol = ATOL_SCALE * float(np.abs(zc).max()) if zc.size else 0.0
    np.testing.assert_allclose(chosen, y_ref, rtol=RTOL, atol=atol)
    top2 = np.sort(windows, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 10 * (atol + RTOL * np.abs(top2[..., 1]))
    np.testing.assert_array_equal(got[clear], idx_ref[clear])


@pytest.mark.parametrize("case", CONV_POOL_GRID[1:8:2], ids=conv_pool_id)
def test_conv2d_relu_maxpool_forward_is_bitwise_the_unfused_pair(case):
    """kernels/conv_pool.cu promises the same bits as conv2d_forward followed by maxpool2d_forward (the same
    8x8 convolution tile and channel chunks, so the same summation order)."""
    x, wt, b, s, pads, z, pp, pq, _ = _conv_pool_case(*case)
    n, h, wdt, c = x.shape
    kh, kw, _, f = wt.shape
    xd, wd, bd = dev(x), dev(wt), dev(b)
    y, idx = _conv_relu_maxpool(xd, wd, bd, s, pads, case[7], n, h, wdt, c, kh, kw, f, pp, pq)
    conv = ops.conv2d_forward(xd, wd, bd, s, pads, case[7])
    y_pair, idx_pair = ops.maxpool2d_forward(conv, (2, 2), (2, 2), VALID)
    np.testing.assert_array_equal(host(y), host(y_pair))
    np.testing.assert_array_equal(host(idx), host(idx_pair))


@pytest.mark.parametrize("case", CONV_POOL_GRID, ids=conv_pool_id)
def test_conv2d_maxpool_backward_matches_reference(case):
    """ops.conv2d_maxpool_backward (maxpool2d_relu_backward, then the convolution's backward kernels) against
    the oracle, routed through the forward's own window indices; need_dx=False writes the same weight
    gradients and returns None."""
    x, wt, b, s, pads, z, pp, pq, rng = _conv_pool_case(*case)
    activation, n, f = case[7], x.shape[0], wt.shape[3]
    xd, wd, bd = dev(x), dev(wt), dev(b)
    ctx = {}
    y, idx = ops.conv2d_maxpool_forward(xd, wd, bd, s, pads, activation, ctx=ctx)
    dy = normal(rng, (n, pp, pq, f))
    dx_ref, dw_ref, db_ref = ref.conv2d_maxpool_backward(dy, host(idx).astype(np.int64), z, x, wt, s, pads,
                                                         activation)
    dw, db = cupy.full(wt.shape, SENTINEL, F32), cupy.full((f,), SENTINEL, F32)
    dx = ops.conv2d_maxpool_backward(dev(dy), y, idx, xd, wd, s, pads, activation, ctx=ctx, out_w=dw,
                                     out_b=db)
    assert_close(dx, dx_ref)
    assert_close(dw, dw_ref)
    assert_close(db, db_ref)
    dw2 = cupy.full(wt.shape, SENTINEL, F32)
    assert ops.conv2d_maxpool_backward(dev(dy), y, idx, xd, wd, s, pads, activation, ctx=ctx, out_w=dw2,
                                       out_b=cupy.empty((f,), F32), need_dx=False) is None
    np.testing.assert_array_equal(host(dw2), host(dw))


@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("hw, pool, stride, pad", [
    ((11, 11), (2, 2), (2, 2), "valid"),   # the fast path's pool, odd input: the last row/column gets 0
    ((8, 6), (2, 2), (2, 2), "valid"),
    ((7, 5), (3, 3), (2, 2), "same"),      # overlapping windows with padding ("any pooling geometry")
    ((6, 7), (2, 2), (1, 1), "valid"),
])
def test_maxpool2d_relu_backward_matches_reference(hw, pool, stride, pad, activation):
    rng = np.random.default_rng([hw[0], hw[1], pool[0], stride[0], pad == "same", activation is None])
    n, c = 3, 5
    h, w = hw
    z = normal(rng, (n, h, w, c))
    if activation == "relu":
        z = np.maximum(z, F32(0))  # the convolution's output after the relu: many zeros, ties included
    pads = padding_for(pad, h, w, pool, stride)
    y_ref, idx_ref = ref.maxpool2d_forward(z, pool, stride, pads)
    _, p, q, _ = y_ref.shape
    dy = normal(rng, y_ref.shape)
    want = ref.maxpool2d_backward(dy, idx_ref, z.shape, pool, stride, pads)
    if activation == "relu":
        want = ref.activation_backward(want, z, "relu")
    idx = dev(idx_ref.astype(np.int8))
    dz = cupy.full(z.shape, SENTINEL, F32)
    cuda.launch("maxpool2d_relu_backward", ops._image_grid(h * w * c, n), ops._THREADS,
                (dev(dy), idx, dev(f32(y_ref)), dz, n, h, w, c, p, q, pool[0], pool[1], stride[0], stride[1],
                 pads[0], pads[2], ops._fused(activation)))
    overlapping = pool[0] > stride[0] or pool[1] > stride[1]
    if overlapping:
        assert_close(dz, want)
    else:
        assert_exact(dz, want)  # one window per element: no sum
    # the same values as maxpool2d_backward followed by relu_backward (the unfused pair)
    pair = ops.maxpool2d_backward(dev(dy), idx, z.shape, pool, stride, pads)
    if activation == "relu":
        pair = ops.activation_backward(pair, dev(z), "relu")
    np.testing.assert_array_equal(host(dz), host(pair))


def _gather(x_u8, x_f32, onehot, labels, perm, step, n_total, batch, rows, per_image, k, grid=None):
    """gather_batch as fastpath.Trainer._program launches it → (xb, onehot_b or labels_b)."""
    xb = cupy.full((batch, per_image), SENTINEL, F32)
    yb = cupy.full((batch, k), SENTINEL, F32) if labels is None else cupy.full((batch,), -3, np.int32)
    if grid is None:
        grid = (ops._blocks(per_image), min(rows, 65535))
    cuda.launch("gather_batch", grid, ops._THREADS,
                (x_u8, x_f32, onehot, labels, perm, step, xb[:rows], yb[:rows] if labels is None else None,
                 yb[:rows] if labels is not None else None, n_total, batch, rows, per_image, k))
    return host(xb), host(yb)


@pytest.mark.parametrize("source", ["uint8", "float32"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("per_image, grid", [(300, None), (784, None), (600, (1, 2))])  # (1, 2): loops go round
def test_gather_batch_copies_the_steps_rows(source, sparse, per_image, grid):
    rng = np.random.default_rng([per_image, sparse, source == "uint8"])
    n_total, batch, k = 29, 8, 6
    u8 = rng.integers(0, 256, size=(n_total, per_image)).astype(np.uint8)
    x = u8.astype(F32) / F32(255) if source == "uint8" else normal(rng, (n_total, per_image))
    classes = rng.integers(0, k, size=n_total)
    labels = classes.astype(np.int32) if sparse else f32(np.eye(k)[classes])
    perm = rng.permutation(n_total).astype(np.int32)
    x_u8, x_f32 = (dev(u8), None) if source == "uint8" else (None, dev(x))
    y_dev = dev(labels)
    for step in range(_cdiv(n_total, batch)):  # the last step has 5 rows
        rows = min(batch, n_total - step * batch)
        xb, yb = _gather(x_u8, x_f32, None if sparse else y_dev, y_dev if sparse else None, dev(perm),
                         dev(np.array([step], np.int32)), n_total, batch, rows, per_image, k, grid)
        src = perm[step * batch:step * batch + rows]
        np.testing.assert_array_equal(xb[:rows], x[src])  # uint8 / 255: the same bits as NumPy's division
        np.testing.assert_array_equal(yb[:rows], labels[src])
        assert (xb[rows:] == SENTINEL).all() and ((yb[rows:] == -3) if sparse else (yb[rows:] == SENTINEL)).all()


_MASK64 = (1 << 64) - 1


def _mix64(z):
    """common.cuh's mix64, on Python integers."""
    z ^= z >> 30
    z = (z * 0xbf58476d1ce4e5b9) & _MASK64
    z ^= z >> 27
    z = (z * 0x94d049bb133111eb) & _MASK64
    return z ^ (z >> 31)


def _permutation_keys(n, seed, grid=None):
    keys = cupy.zeros(n, np.uint64)
    cuda.launch("permutation_keys", grid or ops._blocks(n), ops._THREADS, (keys, n, seed))
    return keys


def test_permutation_keys_give_a_seeded_permutation():
    n = 1000
    seed = 2**62 + 12345
    keys = _permutation_keys(n, seed)
    got = host(keys)
    mixed = _mix64((seed + 0x9e3779b97f4a7c15) & _MASK64)
    want = [(_mix64((mixed + i) & _MASK64) & 0xffffffff80000000) | i for i in range(n)]
    assert got.tolist() == want  # the bits kernels/train_step.cu documents
    order = host(cupy.argsort(keys))
    assert sorted(order.tolist()) == list(range(n))   # distinct keys: argsort is a permutation
    assert (order == np.arange(n)).mean() < 0.02      # and a shuffled one
    np.testing.assert_array_equal(host(_permutation_keys(n, seed, grid=1)), got)  # any grid, the same keys
    np.testing.assert_array_equal(host(cupy.argsort(_permutation_keys(n, seed))), order)  # same seed, order
    other = host(cupy.argsort(_permutation_keys(n, seed + 1)))
    assert (other != order).mean() > 0.9


def test_step_advance_adds_one_once():
    step = dev(np.array([5], np.int32))
    cuda.launch("step_advance", 1, 1, (step,))
    assert host(step).tolist() == [6]
    cuda.launch("step_advance", 3, 64, (step,))  # only thread 0 of block 0 writes
    assert host(step).tolist() == [7]


def _separated_logits(rng, n, k, ties=0):
    """Logits whose largest entry is clear of the runner-up (float32 and float64 agree on the arg-max),
    plus ``ties`` rows with exactly tied maxima (the first one counts)."""
    z = rng.normal(size=(n, k)) * 2
    top = z.argmax(axis=1)
    z[np.arange(n), top] += 0.05
    for r in range(min(ties, n)):
        if k > 1:
            z[r, :] = np.round(z[r, :])
            z[r, k - 1] = z[r, 0] = z[r].max()
    return f32(z)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("n, k", [(1, 2), (7, 10), (64, 10), (300, 3)])  # 300: more rows than THREADS
def test_softmax_crossentropy_step_matches_reference(n, k, sparse, from_logits, smoothing):
    """The captured step's loss, gradient and count: of a softmax output, or (from_logits: a linear output under a
    from_logits loss) of the logits themselves, as the plain path computes each."""
    rng = np.random.default_rng([n, k, sparse, 40])
    logits = _separated_logits(rng, n, k, ties=3)
    if from_logits:
        logits[-1, 0] = 60.0  # a saturated row: no clip from logits
    labels = _labels(rng, n, k, sparse)
    labels[:2] = 0 if sparse else np.eye(k, dtype=F32)[0]  # tie rows whose first maximum is the label
    steps, step = 4, 2
    loss_steps = cupy.full(steps, SENTINEL, F32)
    correct_steps = cupy.full(steps, -3, np.int32)
    dz = cupy.full((n, k), SENTINEL, F32)
    name = "softmax_crossentropy_step_sparse" if sparse else "softmax_crossentropy_step_onehot"
    lab = dev(labels.astype(np.int32) if sparse else labels)
    s = 0.0 if sparse else smoothing  # (no smoothing of class indices, as Keras)
    cuda.launch(name, 1, ops._THREADS, (dev(logits), lab, dz, loss_steps, correct_steps,
                                         dev(np.array([step], np.int32)), n, k, from_logits, F32(1 - s), F32(s / k)))
    p = ref.activation_forward(logits, "softmax")
    loss, correct = host(loss_steps), host(correct_steps)
    targets = labels if sparse else labels * (1 - s) + s / k  # the loss's targets; the count reads the labels
    if from_logits:
        want_loss = ref.crossentropy_forward(logits, targets, sparse, from_logits=True).sum()
        want_correct, want_dz = ref.count_correct(logits, labels, sparse), ref.crossentropy_backward(
            logits, targets, sparse, from_logits=True)
    else:
        want_loss, want_correct = ref.crossentropy_forward(p, targets, sparse).sum(), ref.count_correct(p, labels, sparse)
        want_dz = ref.softmax_crossentropy_backward(p, targets, sparse)
    np.testing.assert_allclose(loss[step], want_loss, rtol=1e-4)
    assert correct[step] == want_correct
    assert (np.delete(loss, step) == SENTINEL).all() and (np.delete(correct, step) == -3).all()
    # p comes from the kernel's own expf here (not given, as in test_crossentropy_matches_reference)
    assert_close(dz, want_dz, atol_scale=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("n, u", [(1, 1), (9, 1), (300, 2)])
def test_sigmoid_binary_crossentropy_step_matches_reference(n, u, from_logits, smoothing):
    """The captured step of a sigmoid output (or, from_logits, of logits) under a binary cross-entropy: the loss as
    the plain path computes it (clipped probabilities, or the logits' formula), dz = (sigmoid(z) - y) / (N·U), and
    the count of (output > 0.5) == y, the output being the probability or the logit (Keras's threshold)."""
    rng = np.random.default_rng([n, u, from_logits, 41])
    logits = f32(rng.normal(size=(n, u)) * 4)
    logits[0, 0] = 0.3  # between the two thresholds: p > 0.5 but z < 0.5
    if n > 1:
        logits[1, 0] = -40.0  # saturated: clipped as a probability, not from logits
    labels = f32(rng.integers(0, 2, (n, u)))
    steps, step = 3, 1
    loss_steps, correct_steps = cupy.full(steps, SENTINEL, F32), cupy.full(steps, -3, np.int32)
    dz = cupy.full((n, u), SENTINEL, F32)
    cuda.launch("sigmoid_binary_crossentropy_step", 1, ops._THREADS,
                (dev(logits), dev(labels), dz, loss_steps, correct_steps, dev(np.array([step], np.int32)), n, u,
                 from_logits, F32(1 - smoothing), F32(0.5 * smoothing)))
    p = ref.activation_forward(logits, "sigmoid")
    out = logits if from_logits else p
    np.testing.assert_allclose(host(loss_steps)[step],
                               ref.binary_crossentropy_forward(out, labels, from_logits, smoothing).sum(), rtol=1e-4)
    assert host(correct_steps)[step] == ref.count_binary_correct(out, labels)  # the labels as given
    assert_close(dz, ref.sigmoid_binary_crossentropy_backward(p, labels, smoothing), atol_scale=1e-5)


def test_softmax_crossentropy_step_sparse_out_of_range_label_is_nan():
    logits = dev(f32([[0.2, 0.8], [0.6, 0.4], [0.5, 0.1]]))
    loss_steps, correct_steps = cupy.zeros(1, F32), cupy.zeros(1, np.int32)
    dz = cupy.zeros((3, 2), F32)
    cuda.launch("softmax_crossentropy_step_sparse", 1, ops._THREADS,
                (logits, dev(np.array([1, 2, 0], np.int32)), dz, loss_steps, correct_steps,
                 dev(np.array([0], np.int32)), 3, 2, False, F32(1), F32(0)))
    assert np.isnan(host(loss_steps)[0])  # the step's loss: a NaN row makes the sum NaN (divergence shows)
    g = host(dz)
    assert np.isfinite(g[[0, 2]]).all() and np.isnan(g[1]).all()


@pytest.mark.parametrize("rate", [0.25, 0.5])
def test_dropout_reads_the_seed_of_its_step_and_slot(rate):
    """The seed table as a captured step reads it: row step[0], column slot (grid-stride loops included)."""
    rng = np.random.default_rng(41)
    x = dev(normal(rng, (64, 1000)))
    steps, slots = 3, 2
    seeds = rng.integers(0, 2**63, size=(steps, slots), dtype=np.uint64)
    scale = F32(1) / F32(1 - rate)
    for step, slot, grid in ((0, 0, None), (2, 1, None), (1, 0, 3)):  # grid 3: a grid-stride loop
        y, mask = cupy.full(x.shape, SENTINEL, F32), cupy.full(x.shape, SENTINEL, F32)
        cuda.launch("dropout_forward", grid or ops._blocks(x.size), ops._THREADS,
                    (x, y, mask, x.size, F32(rate), scale, dev(seeds), dev(np.array([step], np.int32)), slot,
                     slots, 0))
        # a one-row table holding that seed: the same mask and output, bit for bit
        y_one, mask_one = ops.dropout_forward(x, rate, *seed_table(int(seeds[step, slot])), 0)
        np.testing.assert_array_equal(host(mask), host(mask_one))
        np.testing.assert_array_equal(host(y), host(y_one))
        m = host(mask)
        assert set(np.unique(m).tolist()) <= {0.0, float(scale)}
        assert abs((m != 0).mean() - (1 - rate)) < 0.01  # 64,000 draws
        np.testing.assert_array_equal(host(y), host(x) * m)


def test_a_model_called_on_data_returns_host_arrays_as_predict_does():
    """What the book does with a called model's output (``numpy()``, ``np.argmax``, Matplotlib) needs host arrays:
    CuPy's refuse ``np.asarray``."""
    import gpucnn as keras
    backend.set_engine("gpu")
    try:
        model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3, activation="relu"),
                                  keras.layers.Flatten(), keras.layers.Dense(4, activation="softmax")])
        x = normal(np.random.default_rng(0), (5, 6, 6, 2))
        out, layer_out = model(x), model.layers[0](x)
        assert not backend.is_engine_array(out) and not backend.is_engine_array(layer_out)
        np.testing.assert_allclose(np.asarray(out), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
        assert out.numpy().shape == (5, 4) and np.argmax(out, axis=1).shape == (5,)
    finally:
        backend.set_engine("auto")
