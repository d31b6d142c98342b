"""Shapes, inputs and comparisons shared by the engine tests (test_ops_numpy.py, test_gpu.py)."""
import numpy as np
import pytest

import reference as ref

F32 = np.float32
VALID = (0, 0, 0, 0)


def f32(a):
    return np.asarray(a, dtype=F32)


def normal(rng, shape, scale=1.0):
    return f32(rng.normal(size=shape) * scale)


def assert_close(got, want, rtol, atol_scale):
    """float32 ``got`` (a NumPy array) against the float64 oracle: rtol, plus an atol of
    atol_scale · max|want| for entries that cancel to near zero."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == F32, got.dtype
    atol = atol_scale * float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_exact(got, want):
    """Equal after casting the oracle to float32 (NaNs in the same places)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == F32, got.dtype
    np.testing.assert_array_equal(got, f32(want))


def padding_for(kind, h, w, k, s):
    if kind == "valid":
        return VALID
    return ref.same_padding(h, k[0], s[0]) + ref.same_padding(w, k[1], s[1])


def expected_hw(kind, h, w, k, s):
    if kind == "same":
        return -(-h // s[0]), -(-w // s[1])
    return (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1


# ===================================================================================== shape grids
# The full cross product of test plan row 3: batch × channels × kernel × stride × padding × size.
CONV_GRID = [(n, c, hw, k, s, pad) for hw in ((5, 5), (7, 5), (28, 28)) for n in (1, 2, 7) for c in (1, 3, 8)
             for k in (1, 2, 3, 5) for s in (1, 2) for pad in ("valid", "same")]
EXTRA_CONV = [  # even and non-square kernels, mixed strides (plan row 7)
    (2, 3, (6, 6), (4, 4), (1, 1), "same"),
    (2, 3, (5, 7), (4, 4), (2, 2), "same"),
    (1, 2, (6, 5), (2, 3), (1, 2), "same"),
    (3, 2, (7, 6), (1, 5), (2, 1), "same"),
    (2, 4, (9, 8), (4, 2), (2, 3), "same"),
    (2, 4, (9, 8), (4, 2), (2, 3), "valid"),
    (2, 8, (9, 8), (4, 2), (2, 3), "same"),   # 8 channels: the one-copy im2col with mixed strides
]


# Conv2D + MaxPooling2D((2, 2)) as one op (ops.conv2d_maxpool_*): (n, c, hw, k, s, pad, f, activation, bias).
# Odd convolution outputs (a row and column no window reads), several tiles of pooled outputs, more filters
# than a GPU block's 32, input channels in chunks on the GPU, few channels and many (the NumPy engine's two
# im2col copies), strides and "same" padding.
CONV_POOL_GRID = [
    (1, 1, (5, 5), 3, 1, "valid", 4, "relu", True),       # 3x3 -> 1x1
    (2, 3, (11, 11), 1, 1, "valid", 4, "relu", True),     # 11x11 -> 5x5
    (7, 3, (11, 11), 3, 1, "same", 8, "relu", False),     # 11x11 -> 5x5, zero padding
    (2, 32, (11, 11), 3, 1, "valid", 8, None, True),      # 9x9 -> 4x4, linear
    (7, 1, (28, 28), 3, 1, "valid", 32, "relu", True),    # the seed model's first layer: 26x26 -> 13x13
    (2, 32, (13, 13), 3, 1, "valid", 64, "relu", True),   # its second: 11x11 -> 5x5, two filter tiles
    (2, 32, (16, 16), 5, 2, "same", 4, "relu", True),     # a large patch: channels in two chunks
    (1, 3, (7, 5), 2, 1, "same", 33, None, False),        # 7x5 -> 3x2, 33 filters
    (2, 3, (12, 9), (3, 2), (2, 1), "valid", 5, "relu", True),  # mixed strides: 5x8 -> 2x4
    (7, 2, (9, 10), (2, 3), (3, 2), "same", 3, "relu", True),   # 3x5 -> 1x2, stride 3
    (2, 8, (10, 9), 3, 2, "same", 6, "relu", True),       # 8 channels, stride 2: 5x5 -> 2x2
    (2, 8, (12, 9), (3, 2), (2, 1), "valid", 5, "relu", True),  # 8 channels, mixed strides: 5x8 -> 2x4
    (3, 8, (12, 9), 3, 1, "same", 5, "relu", True),       # NumPy's Winograd path, zero padding: 12x9 -> 6x4
    (2, 16, (8, 11), 3, 1, "valid", 3, None, False),      # Winograd, linear, no bias: 6x9 -> 3x4
]


def window_taps(z, pp, pq):
    """The 2x2 windows at stride 2 over the first 2·pp x 2·pq outputs of z (N, P, Q, F), as (N, pp, pq, F, 4),
    the taps in scan order."""
    n, f = z.shape[0], z.shape[3]
    return z[:, :2 * pp, :2 * pq].reshape(n, pp, 2, pq, 2, f).transpose(0, 1, 3, 5, 2, 4).reshape(n, pp, pq, f, 4)


def conv_pool_id(case):
    return "-".join(map(str, case)).replace(" ", "")


def conv_case(n, c, hw, k, s, pad, f=4, bias=True):
    h, w = hw
    k = (k, k) if isinstance(k, int) else k
    s = (s, s) if isinstance(s, int) else s
    rng = np.random.default_rng([n, c, h, w, k[0], k[1], s[0], s[1], pad == "same", f])
    x = normal(rng, (n, h, w, c))
    wt = normal(rng, k + (c, f), 0.5)
    b = normal(rng, (f,)) if bias else None
    return x, wt, b, s, padding_for(pad, h, w, k, s), rng


def conv_id(case):
    n, c, (h, w), k, s, pad = case
    return f"n{n}-c{c}-{h}x{w}-k{k}-s{s}-{pad}".replace(" ", "")


POOL_GRID = [(hw, p, s, pad) for hw in ((5, 5), (7, 5), (11, 11)) for p in (2, 3) for s in (1, 2, 3)
             for pad in ("valid", "same")]
POOL_GRID += [((7, 5), (2, 3), (1, 2), "same"), ((11, 11), (3, 2), (2, 1), "valid")]


def pool_id(case):
    (h, w), p, s, pad = case
    return f"{h}x{w}-p{p}-s{s}-{pad}".replace(" ", "")


def pool_args(hw, p, s, pad):
    p = (p, p) if isinstance(p, int) else p
    s = (s, s) if isinstance(s, int) else s
    return p, s, padding_for(pad, hw[0], hw[1], p, s)


# Merging ops (ops.add / concat / split): (shapes of the parts, axis of the whole array) — channels, rows,
# columns, flat vectors, parts of size 1 and a batch of one.
CONCAT_GRID = [
    ([(2, 5, 5, 3), (2, 5, 5, 4)], 3),
    ([(7, 3, 5, 2), (7, 1, 5, 2), (7, 4, 5, 2)], 1),
    ([(1, 4, 2, 8), (1, 4, 3, 8)], 2),
    ([(3, 6), (3, 1)], 1),
    ([(2, 28, 28, 1), (2, 28, 28, 1)], 3),
]


def concat_id(case):
    shapes, axis = case
    return "+".join("x".join(map(str, s)) for s in shapes) + f"-axis{axis}"


# ===================================================================================== depthwise conv2d, batch norm
def depth_multiplier(k, s):
    """The depth multiplier of a grid case, from its kernel and stride: each kernel size and each stride of
    the conv grid meets several of 1, 2 and 3."""
    first = lambda v: v if isinstance(v, int) else v[0]  # noqa: E731
    return 1 + (first(k) + first(s)) % 3


# The conv grid (test plan row 3), each case with a depth multiplier: (n, c, hw, k, s, pad, dm).
DEPTHWISE_GRID = [case + (depth_multiplier(case[3], case[4]),) for case in CONV_GRID + EXTRA_CONV]


def depthwise_case(n, c, hw, k, s, pad, dm, bias=True):
    """(x, w (KH, KW, C, DM), b (C·DM,) or None, stride, padding, rng) of a depthwise grid case."""
    h, w = hw
    k = (k, k) if isinstance(k, int) else k
    s = (s, s) if isinstance(s, int) else s
    rng = np.random.default_rng([n, c, h, w, k[0], k[1], s[0], s[1], pad == "same", dm, 7])
    x = normal(rng, (n, h, w, c))
    wt = normal(rng, k + (c, dm), 0.5)
    b = normal(rng, (c * dm,)) if bias else None
    return x, wt, b, s, padding_for(pad, h, w, k, s), rng


def depthwise_id(case):
    return conv_id(case[:6]) + f"-dm{case[6]}"


# Batch normalization: images over batch × channels × size of test plan row 3, and Dense outputs (N, C).
BN_GRID = [(n, hw[0], hw[1], c) for hw in ((5, 5), (7, 5), (28, 28)) for n in (1, 2, 7) for c in (1, 3, 8)]
BN_GRID += [(1, 3), (2, 8), (7, 1), (64, 10), (3, 4, 5)]


def bn_case(shape, scale=True, center=True):
    """(x, gamma or None, beta or None, moving_mean, moving_var, rng): channels with their own offsets and
    spreads, moving statistics away from the batch's."""
    rng = np.random.default_rng(list(shape) + [scale, center])
    c = shape[-1]
    x = f32(rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=c) + rng.normal(size=c) * 2)
    gamma = f32(rng.uniform(0.5, 1.5, size=c)) if scale else None
    beta = normal(rng, (c,)) if center else None
    return x, gamma, beta, normal(rng, (c,)), f32(rng.uniform(0.5, 2.0, size=c)), rng


# batchnorm_fold: (kernel shape, bias, scale, center)
FOLD_CASES = [((3, 3, 8, 16), True, True, True), ((1, 1, 3, 5), False, True, True), ((5, 7), True, False, False),
              ((2, 3, 4, 1), False, False, True)]


def fold_case(w_shape, bias, scale, center):
    """(w, b or None, gamma or None, beta or None, moving_mean, moving_var) for batchnorm_fold."""
    rng = np.random.default_rng(list(w_shape) + [bias, scale, center])
    f = w_shape[-1]
    return (normal(rng, w_shape), normal(rng, (f,)) if bias else None, f32(rng.uniform(0.5, 2, f)) if scale else None,
            normal(rng, (f,)) if center else None, normal(rng, (f,)), f32(rng.uniform(0.2, 4, f)))


def summary_lines(model, **kwargs):
    """The lines ``model.summary(**kwargs)`` prints, right-stripped: Keras's (one call for the whole table) or
    gpucnn's (one call a line) alike."""
    lines = []
    model.summary(print_fn=lambda text, **_: lines.extend(text.rstrip("\n").split("\n")), **kwargs)
    return [line.rstrip() for line in lines]


# ===================================================================================== engines
class Engine:
    """How a shared check reaches one engine: its ops module, how a host array becomes an input (``dev``: a
    copy, as a device upload is) and how a result is read back (``host``)."""

    def __init__(self, ops, dev, host):
        self.ops, self.dev, self.host = ops, dev, host

    def close(self, got, want, rtol, atol_scale):
        assert_close(self.host(got), want, rtol, atol_scale)

    def exact(self, got, want):
        assert_exact(self.host(got), want)


def numpy_engine():
    from gpucnn.engines import numpy_ops

    return Engine(numpy_ops, dev=np.array, host=np.asarray)


def skip_module_without_gpu():
    """Skips the calling test module, with the backend's reason, where CuPy or a CUDA device is not usable."""
    from gpucnn import backend

    usable, reason = backend.gpu_status()
    if not usable:
        pytest.skip(f"no usable GPU: {reason}", allow_module_level=True)


def cuda_engine():
    """The CUDA engine (call skip_module_without_gpu first)."""
    import cupy
    from gpucnn.engines import cuda_ops

    def host(a):
        assert isinstance(a, cupy.ndarray), type(a)
        return cupy.asnumpy(a)

    return Engine(cuda_ops, dev=cupy.asarray, host=host)
