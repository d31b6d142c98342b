"""The CUDA engine's ops for deeper convnets (batch normalization, depthwise conv2d, global max-pooling, zero
padding: gpucnn/engines/cuda_ops.py, kernels/batchnorm.cu, depthwise_conv2d.cu, pool2d.cu, zero_padding.cu)
against the float64 oracle (tests/reference.py), as tests/test_gpu.py checks the others.

Marked ``gpu`` and skipped as a whole, with the backend's reason, where CuPy or a CUDA device is not usable
(tests/test_kernels_emulated.py runs this file on the CPU emulator). Inputs are drawn in float64, rounded to
float32 once, and the same values go to the kernels and the oracle. Tolerances as tests/test_gpu.py: rtol
1e-4 and atol 1e-4 · max|ref| (dW 1e-3); max-pooling and padding exact. Batch normalization's checks shared with
the NumPy engine are tests/checks_batchnorm.py's.
"""
import numpy as np
import pytest

import helpers
import reference as ref
from checks_batchnorm import BatchNormChecks
from helpers import (DEPTHWISE_GRID, F32, VALID, bn_case, depthwise_case, depthwise_id, expected_hw, f32, normal,
                     padding_for)
from gpucnn import backend

pytestmark = pytest.mark.gpu

_usable, _reason = backend.gpu_status()
if not _usable:
    pytest.skip(f"no usable GPU: {_reason}", allow_module_level=True)

import cupy  # noqa: E402

from gpucnn.engines import cuda_ops as ops, numpy_ops as ops_numpy  # noqa: E402
from test_gpu import _CountingAllocator, assert_close, assert_exact, dev, host  # noqa: E402


# ===================================================================================== global max-pooling
@pytest.mark.parametrize("shape", [(1, 5, 5, 1), (7, 7, 5, 3), (2, 28, 28, 8), (3, 1, 1, 2), (2, 3, 4, 300)])
def test_global_maxpool2d_exact(shape):
    rng = np.random.default_rng(list(shape))
    x = normal(rng, shape)
    y, idx = ops.global_maxpool2d_forward(dev(x))
    y_ref, idx_ref = ref.global_maxpool2d_forward(x)
    assert_exact(y, y_ref)
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(host(idx), idx_ref)
    dy = normal(rng, y.shape)
    assert_exact(ops.global_maxpool2d_backward(dev(dy), idx, shape), ref.global_maxpool2d_backward(dy, idx_ref, shape))


def test_global_maxpool2d_ties_and_nan_agree_with_the_numpy_engine():
    x = f32(np.random.default_rng(50).integers(0, 3, size=(2, 5, 4, 3)))  # many ties
    x[1, 2, 1, 2], x[1, 3, 0, 2], x[0, 4, 3, 0] = np.nan, np.nan, np.nan
    y, idx = ops.global_maxpool2d_forward(dev(x))
    y_np, idx_np = ops_numpy.global_maxpool2d_forward(x)
    np.testing.assert_array_equal(host(y), y_np)
    np.testing.assert_array_equal(host(idx), idx_np)
    np.testing.assert_array_equal(host(idx), ref.global_maxpool2d_forward(x)[1])
    dy = f32(np.arange(1, 7).reshape(2, 3))
    np.testing.assert_array_equal(host(ops.global_maxpool2d_backward(dev(dy), idx, x.shape)),
                                  ops_numpy.global_maxpool2d_backward(dy, idx_np, x.shape))
    with pytest.raises(ValueError, match="no maximum"):
        ops.global_maxpool2d_forward(cupy.zeros((2, 0, 3, 1), F32))
    with pytest.raises(ValueError, match="must be"):
        ops.global_maxpool2d_backward(dev(dy), idx, (2, 5, 4, 4))


# ===================================================================================== zero padding
@pytest.mark.parametrize("padding", [(1, 1, 1, 1), (0, 2, 3, 0), (0, 0, 0, 0), (3, 1, 0, 2)])
def test_zero_padding2d_exact(padding):
    rng = np.random.default_rng(sum(padding) + 1)
    x = normal(rng, (2, 5, 4, 3))
    y = ops.zero_padding2d_forward(dev(x), padding)
    assert_exact(y, ref.zero_padding2d_forward(x, padding))
    dy = normal(rng, y.shape)
    assert_exact(ops.zero_padding2d_backward(dev(dy), x.shape, padding),
                 ref.zero_padding2d_backward(dy, x.shape, padding))
    with pytest.raises(ValueError, match="dy must be"):
        ops.zero_padding2d_backward(dev(dy), (2, 5, 5, 3), padding)
    with pytest.raises(ValueError, match="non-negative ints"):
        ops.zero_padding2d_forward(dev(x), (1, -1, 0, 0))


# ===================================================================================== batch normalization
class TestCudaBatchNorm(BatchNormChecks):
    """tests/checks_batchnorm.py's tests on the CUDA engine; what this engine alone promises below."""
    engine = helpers.cuda_engine()
    rtol, atol_scale = 1e-4, 1e-4


def test_batchnorm_bad_inputs_and_an_empty_batch():
    x, gamma, beta, mm, mv, _ = (dev(a) if isinstance(a, np.ndarray) else a for a in bn_case((2, 3, 3, 4)))
    with pytest.raises(ValueError, match="gamma must be"):
        ops.batchnorm_forward_training(x, gamma[:3], beta, mm, mv, 0.99, 1e-3)
    with pytest.raises(ValueError, match="at least one row"):
        ops.batchnorm_forward_training(cupy.zeros((0, 4), F32), gamma, beta, mm, mv, 0.99, 1e-3)
    with pytest.raises(ValueError, match="dy"):
        ops.batchnorm_backward(cupy.zeros((2, 3, 3, 3), F32), x, gamma, mm, mv, True)
    with pytest.raises(ValueError, match="C-contiguous"):  # the moving statistics are written in place
        ops.batchnorm_forward_training(x, gamma, beta, cupy.zeros(8, F32)[::2], mv, 0.99, 1e-3)
    with pytest.raises(ValueError, match="NumPy engine's"):  # parts of a batch are the two-process CPU step's
        ops.batchnorm_forward_training(x, gamma, beta, mm, mv, 0.99, 1e-3, exchange=lambda mine: [mine])
    with pytest.raises(ValueError, match="NumPy engine's"):
        ops.batchnorm_backward(x, x, gamma, mm, mv, True, exchange=lambda mine: [mine])
    y, _ = ops.batchnorm_forward_inference(cupy.zeros((0, 4), F32), gamma, beta, mm, mv, 1e-3)
    assert y.shape == (0, 4)
    dx, dgamma, dbeta = ops.batchnorm_backward(cupy.zeros((0, 4), F32), cupy.zeros((0, 4), F32), gamma, mm, mv,
                                               False)
    assert dx.shape == (0, 4)
    np.testing.assert_array_equal(host(dgamma), 0)
    np.testing.assert_array_equal(host(dbeta), 0)


def test_batchnorm_is_bitwise_reproducible():
    x, gamma, beta, mm, mv, rng = bn_case((7, 28, 28, 8))
    dy = dev(normal(rng, x.shape))

    def run():
        y, mean, inv_std = ops.batchnorm_forward_training(dev(x), dev(gamma), dev(beta), dev(mm), dev(mv), 0.99,
                                                          1e-3, {})
        return [host(a) for a in (y, mean, inv_std) + ops.batchnorm_backward(dy, dev(x), dev(gamma), mean,
                                                                             inv_std, True, {})]

    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


# ===================================================================================== depthwise conv2d
def _check_depthwise(n, c, hw, k, s, pad, dm, bias=True, activation=None):
    x, wt, b, s, padding, rng = depthwise_case(n, c, hw, k, s, pad, dm, bias)
    xd, wd, bd = dev(x), dev(wt), dev(b)
    ctx = {}
    y = ops.depthwise_conv2d_forward(xd, wd, bd, s, padding, activation, ctx)
    y_ref = ref.depthwise_conv2d_forward(x, wt, b, s, padding, activation)
    assert y.shape == (n,) + expected_hw(pad, hw[0], hw[1], wt.shape[:2], s) + (c * dm,)
    assert_close(y, y_ref)
    dy = normal(rng, y_ref.shape)
    if activation is not None:
        dy = f32(ref.activation_backward(dy, y_ref, activation))
    dyd = dev(dy)
    assert_close(ops.depthwise_conv2d_backward_data(dyd, wd, x.shape, s, padding, ctx),
                 ref.depthwise_conv2d_backward_data(dy, wt, x.shape, s, padding))
    dw, db = ops.depthwise_conv2d_backward_filter(dyd, xd, wt.shape, s, padding, ctx)
    dw_ref, db_ref = ref.depthwise_conv2d_backward_filter(dy, x, wt.shape, s, padding)
    assert_close(dw, dw_ref, atol_scale=1e-3)
    assert_close(db, db_ref)
    np.testing.assert_array_equal(host(xd), x)  # inputs not written to
    np.testing.assert_array_equal(host(wd), wt)
    np.testing.assert_array_equal(host(dyd), dy)


@pytest.mark.parametrize("n, c, hw, k, s, pad, dm", DEPTHWISE_GRID, ids=map(depthwise_id, DEPTHWISE_GRID))
def test_depthwise_conv2d_matches_reference(n, c, hw, k, s, pad, dm):
    _check_depthwise(n, c, hw, k, s, pad, dm)


DEPTHWISE_EDGES = [
    (2, 40, (9, 9), 3, 1, "same", 8),    # 320 output channels: several blocks of a slice's dw sums
    (7, 3, (28, 28), 3, 1, "same", 1),   # 5,488 output pixels: several slices
    (2, 1, (11, 11), 11, 1, "valid", 2),  # one output pixel per image
]


@pytest.mark.parametrize("n, c, hw, k, s, pad, dm", DEPTHWISE_EDGES, ids=map(depthwise_id, DEPTHWISE_EDGES))
def test_depthwise_conv2d_tile_edges(n, c, hw, k, s, pad, dm):
    _check_depthwise(n, c, hw, k, s, pad, dm)


@pytest.mark.parametrize("bias, activation", [(False, None), (True, "relu"), (False, "relu"), (True, "softmax")])
def test_depthwise_conv2d_bias_and_activation(bias, activation):
    _check_depthwise(2, 3, (7, 5), 3, 1, "same", 2, bias, activation)


def test_depthwise_conv2d_bad_shapes():
    x, wt = cupy.zeros((1, 3, 3, 2), F32), cupy.zeros((5, 5, 2, 1), F32)
    with pytest.raises(ValueError, match="does not fit the 3x3 input"):
        ops.depthwise_conv2d_forward(x, wt, None, (1, 1), VALID, None)
    with pytest.raises(ValueError, match="expects 3"):
        ops.depthwise_conv2d_forward(x, cupy.zeros((1, 1, 3, 1), F32), None, (1, 1), VALID, None)
    with pytest.raises(ValueError, match="bias must be"):
        ops.depthwise_conv2d_forward(x, cupy.zeros((1, 1, 2, 2), F32), cupy.zeros(2, F32), (1, 1), VALID, None)
    with pytest.raises(ValueError, match="dy must be"):
        ops.depthwise_conv2d_backward_data(cupy.zeros((1, 3, 3, 2), F32), cupy.zeros((1, 1, 2, 2), F32), x.shape,
                                           (1, 1), VALID)


def test_separable_conv2d_is_depthwise_then_a_1x1_conv2d():
    """SeparableConv2D's two parts on the CUDA engine (the pointwise part is conv2d's kernels with a 1x1
    kernel over 48 channels), forward and backward, against the oracle's."""
    rng = np.random.default_rng(51)
    x, wd, wp, b = normal(rng, (2, 9, 8, 16)), normal(rng, (3, 3, 16, 3)), normal(rng, (1, 1, 48, 40)), \
        normal(rng, (40,))
    stride, pad = (2, 2), padding_for("same", 9, 8, (3, 3), (2, 2))
    mid = ops.depthwise_conv2d_forward(dev(x), dev(wd), None, stride, pad, None, {})
    y = ops.conv2d_forward(mid, dev(wp), dev(b), (1, 1), VALID, "relu", {})
    mid_ref = ref.depthwise_conv2d_forward(x, wd, None, stride, pad, None)
    y_ref = ref.conv2d_forward(mid_ref, wp, b, (1, 1), VALID, "relu")
    assert_close(y, y_ref)
    dy = f32(ref.activation_backward(normal(rng, y.shape), y_ref, "relu"))
    dmid = ops.conv2d_backward_data(dev(dy), dev(wp), mid.shape, (1, 1), VALID, {})
    assert_close(dmid, ref.conv2d_backward_data(dy, wp, mid.shape, (1, 1), VALID))
    for got, want, atol in zip(ops.conv2d_backward_filter(dev(dy), mid, wp.shape, (1, 1), VALID, {}),
                               ref.conv2d_backward_filter(dy, mid_ref, wp.shape, (1, 1), VALID), (1e-3, 1e-4)):
        assert_close(got, want, atol_scale=atol)
    dmid_ref = ref.conv2d_backward_data(dy, wp, mid.shape, (1, 1), VALID)
    dmid = f32(dmid_ref)
    assert_close(ops.depthwise_conv2d_backward_data(dev(dmid), dev(wd), x.shape, stride, pad, {}),
                 ref.depthwise_conv2d_backward_data(dmid, wd, x.shape, stride, pad))
    assert_close(ops.depthwise_conv2d_backward_filter(dev(dmid), dev(x), wd.shape, stride, pad, {})[0],
                 ref.depthwise_conv2d_backward_filter(dmid, x, wd.shape, stride, pad)[0], atol_scale=1e-3)


# ===================================================================================== layouts, empty batches
def test_non_contiguous_inputs_give_the_contiguous_result():
    rng = np.random.default_rng(52)
    x, wt, b = normal(rng, (2, 7, 5, 3)), normal(rng, (3, 2, 3, 2)), normal(rng, (6,))
    padding = padding_for("same", 7, 5, (3, 2), (1, 2))
    xt = cupy.asarray(np.ascontiguousarray(x.transpose(3, 2, 1, 0))).transpose(3, 2, 1, 0)
    assert not xt.flags.c_contiguous
    np.testing.assert_array_equal(host(ops.depthwise_conv2d_forward(xt, dev(wt), dev(b), (1, 2), padding, "relu")),
                                  host(ops.depthwise_conv2d_forward(dev(x), dev(wt), dev(b), (1, 2), padding, "relu")))
    np.testing.assert_array_equal(host(ops.global_maxpool2d_forward(xt)[0]),
                                  host(ops.global_maxpool2d_forward(dev(x))[0]))
    np.testing.assert_array_equal(host(ops.zero_padding2d_forward(xt, (1, 0, 2, 1))),
                                  host(ops.zero_padding2d_forward(dev(x), (1, 0, 2, 1))))
    gamma, beta, mm, mv = dev(f32(rng.uniform(0.5, 1.5, 3))), dev(normal(rng, (3,))), dev(normal(rng, (3,))), \
        dev(f32(rng.uniform(0.5, 2, 3)))
    np.testing.assert_array_equal(host(ops.batchnorm_forward_inference(xt, gamma, beta, mm, mv, 1e-3)[0]),
                                  host(ops.batchnorm_forward_inference(dev(x), gamma, beta, mm, mv, 1e-3)[0]))
    one = ops.batchnorm_forward_training(xt, gamma, beta, mm.copy(), mv.copy(), 0.99, 1e-3)
    two = ops.batchnorm_forward_training(dev(x), gamma, beta, mm.copy(), mv.copy(), 0.99, 1e-3)
    for a, c in zip(one, two):
        np.testing.assert_array_equal(host(a), host(c))


def test_an_empty_batch_reads_nothing():
    x = cupy.zeros((0, 5, 5, 3), F32)
    w, b = cupy.ones((3, 3, 3, 2), F32), cupy.ones(6, F32)
    pad = (1, 1, 1, 1)
    y = ops.depthwise_conv2d_forward(x, w, b, (1, 1), pad, "relu")
    assert y.shape == (0, 5, 5, 6)
    assert ops.depthwise_conv2d_backward_data(y, w, x.shape, (1, 1), pad).shape == x.shape
    dw, db = ops.depthwise_conv2d_backward_filter(y, x, w.shape, (1, 1), pad)
    np.testing.assert_array_equal(host(dw), 0)
    np.testing.assert_array_equal(host(db), 0)
    yg, idx = ops.global_maxpool2d_forward(x)
    assert yg.shape == (0, 3) and ops.global_maxpool2d_backward(yg, idx, x.shape).shape == x.shape
    yp = ops.zero_padding2d_forward(x, pad)
    assert yp.shape == (0, 7, 7, 3) and ops.zero_padding2d_backward(yp, x.shape, pad).shape == x.shape


# ===================================================================================== no allocation, graphs
def _block_step(bufs, ctx_d, ctx_bn):
    """depthwise conv (relu) -> batch norm (training) -> global max-pool, and back, writing only into bufs."""
    b = bufs
    ops.depthwise_conv2d_forward(b["x"], b["w"], b["b"], (1, 1), (1, 1, 1, 1), "relu", ctx_d, out=b["y"])
    ops.batchnorm_forward_training(b["y"], b["gamma"], b["beta"], b["mm"], b["mv"], 0.99, 1e-3, ctx_bn, out=b["z"],
                                   out_mean=b["mean"], out_inv_std=b["inv_std"])
    ops.global_maxpool2d_forward(b["z"], out=b["p"], out_idx=b["idx"])
    ops.global_maxpool2d_backward(b["dp"], b["idx"], b["z"].shape, out=b["dz"])
    ops.batchnorm_backward(b["dz"], b["y"], b["gamma"], b["mean"], b["inv_std"], True, ctx_bn, out=b["dy"],
                           out_gamma=b["dgamma"], out_beta=b["dbeta"])
    ops.activation_backward(b["dy"], b["y"], "relu", out=b["dy"])
    ops.depthwise_conv2d_backward_filter(b["dy"], b["x"], b["w"].shape, (1, 1), (1, 1, 1, 1), ctx_d, out_w=b["dw"],
                                         out_b=b["db"])
    ops.depthwise_conv2d_backward_data(b["dy"], b["w"], b["x"].shape, (1, 1), (1, 1, 1, 1), ctx_d, out=b["dx"])


def _block_buffers(rng):
    shapes = {"x": (4, 6, 6, 3), "w": (3, 3, 3, 2), "b": (6,), "y": (4, 6, 6, 6), "gamma": (6,), "beta": (6,),
              "mm": (6,), "mv": (6,), "z": (4, 6, 6, 6), "mean": (6,), "inv_std": (6,), "p": (4, 6), "dp": (4, 6),
              "dz": (4, 6, 6, 6), "dy": (4, 6, 6, 6), "dgamma": (6,), "dbeta": (6,), "dw": (3, 3, 3, 2), "db": (6,),
              "dx": (4, 6, 6, 3)}
    bufs = {k: dev(normal(rng, s, 0.5)) for k, s in shapes.items()}
    bufs["mv"][...] = 1
    bufs["idx"] = cupy.zeros((4, 6), np.int32)
    return bufs


def test_a_block_step_with_out_buffers_and_ctx_allocates_nothing():
    bufs, ctx_d, ctx_bn = _block_buffers(np.random.default_rng(53)), {}, {}
    _block_step(bufs, ctx_d, ctx_bn)  # compiles the kernels, fills the contexts
    cupy.cuda.Device().synchronize()
    with _CountingAllocator() as counter:
        _block_step(bufs, ctx_d, ctx_bn)
    assert counter.count == 0


def test_a_block_step_can_be_captured_in_a_cuda_graph():
    rng = np.random.default_rng(54)
    eager = _block_buffers(rng)
    captured = {k: v.copy() for k, v in eager.items()}
    ctx_graph = ({}, {})
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with stream:
        _block_step({k: v.copy() for k, v in eager.items()}, *ctx_graph)  # warm up: compile, fill the contexts
        stream.synchronize()
        stream.begin_capture()
        _block_step(captured, *ctx_graph)
        graph = stream.end_capture()
        for _ in range(2):
            graph.launch(stream)
        stream.synchronize()
    ctx_eager = ({}, {})
    for _ in range(2):
        _block_step(eager, *ctx_eager)
    for k in ("mm", "mv", "dw", "dgamma", "dx"):  # the moving statistics moved twice in both
        np.testing.assert_array_equal(host(captured[k]), host(eager[k]), err_msg=k)


# ===================================================================================== grid-stride loops
def test_grid_stride_loops_with_few_blocks(monkeypatch):
    """Grids capped at 2 blocks along x and 3 images along y: every grid-stride loop of these kernels goes
    round."""
    image_grid = ops._image_grid
    monkeypatch.setattr(ops, "_MAX_BLOCKS", 2)
    monkeypatch.setattr(ops, "_image_grid", lambda per, n: (min(image_grid(per, n)[0], 2), min(n, 3)))
    _check_depthwise(7, 8, (28, 28), 5, 1, "valid", 2)
    TestCudaBatchNorm().check((7, 28, 28, 8))
    TestCudaBatchNorm().check((300, 33))
    test_global_maxpool2d_exact((7, 7, 5, 3))
    test_zero_padding2d_exact((3, 1, 0, 2))
